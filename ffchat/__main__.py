from ffchat.cli import main

main()
