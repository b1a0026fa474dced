"""InteractiveChat driven with scripted input: commands, multi-line input and Ctrl+C at any moment."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from ffchat.chat import InteractiveChat
from ffchat.generate import Generator
from ffchat.model import load_model
from ffchat.reference_backend import ReferenceBackend
from ffchat.sampling import SamplingParams
from ffchat.session import ChatSession
from ffchat.tokenizer import Tokenizer


@pytest.fixture
def session(tiny_model_dir):
    directory = tiny_model_dir("llama")
    tokenizer = Tokenizer.from_dir(directory)
    backend = ReferenceBackend(load_model(directory, max_seq_len=256))
    params = SamplingParams(temperature=0, repeat_penalty=1.0, max_tokens=6)
    return ChatSession(Generator(backend, tokenizer), tokenizer, params, system=None)


def drive(session: ChatSession, lines: list) -> str:
    """Run the loop on ``lines`` (an exception instance is raised in place of a line); return the console text."""
    script = iter(lines)

    def read_line(prompt: str) -> str:
        item = next(script)
        if isinstance(item, BaseException):
            raise item
        return item

    out = io.StringIO()
    InteractiveChat(session, Console(file=out, width=120), lambda: [("model", "tiny")], read_line=read_line).run()
    return out.getvalue()


def test_commands_answer_and_history(session, capsys):
    text = drive(session, ["Hello there!", "/set temperature 0.7", "/show", "/stats", "/clear", "/bye"])
    assert "temperature = 0.7" in text and "tiny" in text and "tok/s" in text and "conversation cleared" in text
    assert session.turns == [] and session.params.temperature == 0.7
    assert capsys.readouterr().out.strip()  # the answer streamed to stdout


def test_multi_line_input_is_one_message(session):
    drive(session, ['"""first line', "second line", 'third"""', "ends with \\", "continued", EOFError()])
    users = [turn["content"] for turn in session.turns if turn["role"] == "user"]
    assert users == ["first line\nsecond line\nthird", "ends with \ncontinued"]


def test_ctrl_c_before_the_answer_begins_stops_it_and_keeps_the_chat(session, monkeypatch):
    real_encode = session.tokenizer.encode_chat
    calls = []

    def interrupted_once(messages):
        calls.append(messages)
        if len(calls) == 1:
            raise KeyboardInterrupt  # Ctrl+C while the prompt is rendered, before any token
        return real_encode(messages)

    monkeypatch.setattr(session.tokenizer, "encode_chat", interrupted_once)
    text = drive(session, ["Hello there!", "Hello again!", "/bye"])
    assert "(stopped)" in text
    assert [turn["content"] for turn in session.turns if turn["role"] == "user"] == ["Hello again!"]


def test_ctrl_c_at_the_prompt_does_not_leave(session):
    text = drive(session, [KeyboardInterrupt(), "/bye"])
    assert "Ctrl+D or /bye to leave" in text
