"""The two faces of `ffchat run`: an interactive terminal chat, and a quiet pipe.

Interactive: Rich banner and notices, streamed answers, slash commands in
Ollama's vocabulary, Ctrl+C stops an answer but keeps the chat, Ctrl+D or /bye
leaves. Piped: only answers on stdout (or one JSON object per answer), every
diagnostic on stderr.
"""

from __future__ import annotations

import json
import sys
from typing import Callable, Iterable, TextIO

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ffchat.errors import FfchatError
from ffchat.generate import Completion
from ffchat.session import ChatSession

HELP = """\
/help              this help
/bye               leave (Ctrl+D too)
/clear             forget the conversation (the system prompt stays)
/system TEXT       set the system prompt (empty TEXT removes it)
/set KEY VALUE     temperature, top_p, top_k, min_p, repeat_penalty, repeat_last_n,
                   seed, max_tokens, stop (`/set stop none` clears the stop strings)
/show              model, backend and settings
/stats             prompt tokens, time to first token and speed of the last answer
Multi-line input: start and end it with \"\"\", or end a line with \\ to continue.
Ctrl+C stops the current answer and keeps the chat."""

MULTILINE_FENCE = '"""'


def stream_answer(session: ChatSession, text: str, out: TextIO) -> Completion | None:
    """Write the answer to ``out`` as it comes; Ctrl+C ends the answer, not the program.

    None means Ctrl+C came before the answer began (while the prompt was prepared).
    """
    answer = session.ask(text)
    try:
        for piece in answer:
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        answer.close()
    return session.last


def timing_line(completion: Completion) -> str:
    return (
        f"prompt {completion.prompt_tokens} tokens at {completion.prefill_tokens_per_s:.1f} tok/s, "
        f"TTFT {completion.ttft_s * 1000:.0f} ms; answer {completion.completion_tokens} tokens at "
        f"{completion.decode_tokens_per_s:.1f} tok/s ({completion.finish_reason})"
    )


def run_piped(
    session: ChatSession, inputs: Iterable[str], *, as_json: bool, verbose: bool, err: Console, model: str,
    backend: str,
) -> None:
    """Answer each input; one user message per input, only answers (or JSON, naming model and backend) on stdout."""
    out = sys.stdout
    for text in inputs:
        if as_json:
            completion = _drain(session, text)
            out.write(json.dumps({"model": model, "backend": backend, **completion.to_dict()}, ensure_ascii=False) + "\n")
        else:
            completion = stream_answer(session, text, out)
            out.write("\n")
        out.flush()
        if verbose and completion is not None:
            err.print(timing_line(completion))
        if completion is None or completion.finish_reason == "interrupted":
            raise KeyboardInterrupt


def _drain(session: ChatSession, text: str) -> Completion:
    for _ in session.ask(text):
        pass
    assert session.last is not None
    return session.last


class InteractiveChat:
    """The terminal chat loop; ``read_line`` is injectable so tests can drive it."""

    def __init__(
        self,
        session: ChatSession,
        console: Console,
        describe: Callable[[], list[tuple[str, str]]],
        *,
        verbose: bool = False,
        read_line: Callable[[str], str] = input,
    ):
        self.session = session
        self.console = console
        self.describe = describe
        self.verbose = verbose
        self.read_line = read_line

    def run(self) -> None:
        self.console.print("[dim]Type a message, /help for commands, /bye or Ctrl+D to leave.[/]")
        while True:
            try:
                text = self.read_message()
            except EOFError:
                self.console.print()
                return
            except KeyboardInterrupt:
                self.console.print("\n[dim](Ctrl+D or /bye to leave)[/]")
                continue
            if not text.strip():
                continue
            if text.startswith("/"):
                if self.command(text.strip()) == "bye":
                    return
                continue
            self.answer(text)

    def read_message(self) -> str:
        """One user message: a line, a \\-continued line, or a \"\"\"-fenced block."""
        line = self.read_line(">>> ")
        if line.lstrip().startswith(MULTILINE_FENCE):
            lines = [line.lstrip()[len(MULTILINE_FENCE):]]
            while not lines[-1].rstrip().endswith(MULTILINE_FENCE):
                lines.append(self.read_line("... "))
            lines[-1] = lines[-1].rstrip()[: -len(MULTILINE_FENCE)]
            return "\n".join(lines).strip("\n")
        lines = [line]
        while lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1]
            lines.append(self.read_line("... "))
        return "\n".join(lines)

    def answer(self, text: str) -> None:
        try:
            completion = stream_answer(self.session, text, sys.stdout)
        except FfchatError as exc:
            self.console.print(f"[red]error:[/] {escape(str(exc))}")
            return
        sys.stdout.write("\n")
        sys.stdout.flush()
        if completion is None or completion.finish_reason == "interrupted":
            self.console.print("[dim](stopped)[/]")
            if completion is None:
                return
        elif completion.finish_reason == "context":
            self.console.print("[yellow]the context is full: /clear to start over[/]")
        if self.verbose:
            self.console.print(f"[dim]{timing_line(completion)}[/]")

    def command(self, line: str) -> str | None:
        name, _, argument = line.partition(" ")
        argument = argument.strip()
        if name in ("/bye", "/exit", "/quit"):
            return "bye"
        if name in ("/help", "/?"):
            self.console.print(escape(HELP))
        elif name == "/clear":
            self.session.clear()
            self.console.print("[dim]conversation cleared[/]")
        elif name == "/system":
            self.session.set_system(argument)
            self.session.clear()
            self.console.print("[dim]system prompt " + ("set" if argument else "removed") + "; conversation cleared[/]")
        elif name == "/set":
            self.set(argument)
        elif name == "/show":
            self.show()
        elif name == "/stats":
            self.stats()
        else:
            self.console.print(f"[red]unknown command {escape(name)}[/]: /help lists them")
        return None

    def set(self, argument: str) -> None:
        key, _, value = argument.partition(" ")
        if not key or not value.strip():
            self.console.print("[red]usage:[/] /set KEY VALUE (see /help)")
            return
        try:
            self.session.params.set(key, value.strip())
        except FfchatError as exc:
            self.console.print(f"[red]error:[/] {escape(str(exc))}")
            return
        self.console.print(f"[dim]{escape(key)} = {escape(value.strip())}[/]")

    def show(self) -> None:
        table = Table(box=None, show_header=False)
        table.add_column(style="bold")
        table.add_column()
        for key, value in self.describe():
            table.add_row(key, escape(value))
        table.add_row("system", escape(self.session.system or "(none)"))
        for key, value in vars(self.session.params).items():
            table.add_row(key, escape(str(value)))
        self.console.print(table)

    def stats(self) -> None:
        if self.session.last is None:
            self.console.print("[dim]no answer yet[/]")
            return
        self.console.print(timing_line(self.session.last))
