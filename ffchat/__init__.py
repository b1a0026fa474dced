"""ffchat: fast local LLM chat on a single GPU."""

__version__ = "0.1.0"

# What `ffchat run` chats with when no model is named: small enough for any machine.
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
