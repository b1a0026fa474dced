"""ChatSession on the tiny llama: history through the template, and never a silent truncation."""

from __future__ import annotations

import pytest
import torch

from ffchat.errors import FfchatError
from ffchat.generate import Generator
from ffchat.model import load_model
from ffchat.reference_backend import ReferenceBackend
from ffchat.sampling import SamplingParams
from ffchat.session import ChatSession
from ffchat.tokenizer import Tokenizer


@pytest.fixture
def make_session(tiny_model_dir):
    directory = tiny_model_dir("llama")
    tokenizer = Tokenizer.from_dir(directory)

    def make(context_length: int, max_tokens: int = 8, system: str | None = "Be brief.", raw: bool = False):
        backend = ReferenceBackend(load_model(directory, max_seq_len=context_length))
        params = SamplingParams(temperature=0, repeat_penalty=1.0, max_tokens=max_tokens)
        notices: list[str] = []
        session = ChatSession(Generator(backend, tokenizer), tokenizer, params, system=system, raw=raw,
                              notice=notices.append)
        return session, notices

    return make


def answer(session: ChatSession, text: str) -> str:
    return "".join(session.ask(text))


def test_history_goes_through_the_template(make_session):
    session, notices = make_session(256)
    first = answer(session, "Hello there!")
    answer(session, "How are you?")
    assert [m["role"] for m in session.turns] == ["user", "assistant", "user", "assistant"]
    assert session.turns[1]["content"] == first
    prompt = session.tokenizer.encode_chat(session.messages(session.turns[:3]))
    assert session.last.prompt_tokens == len(prompt)
    assert not notices


def test_old_exchanges_are_dropped_with_a_notice_and_the_system_prompt_stays(make_session):
    session, notices = make_session(96, max_tokens=8)
    for text in ["Hello there! How are you today?", "The capital of France is Paris.",
                 "Numbers like 12345 appear in text too.", "Hello again, my friend."]:
        answer(session, text)
    assert notices and "dropped" in notices[0] and "96-token context" in notices[0]
    assert session.turns[0]["role"] == "user" and session.turns[-2]["content"] == "Hello again, my friend."
    assert len(session.turns) < 8
    prompt = session.tokenizer.encode_chat(session.messages(session.turns[:-1]))
    assert session.messages([])[0] == {"role": "system", "content": "Be brief."}
    assert len(prompt) + min(8, 96 // 4) <= 96


def test_a_single_message_longer_than_the_context_is_an_error(make_session):
    session, _ = make_session(64)
    with pytest.raises(FfchatError, match="64-token context"):
        answer(session, "word " * 100)
    assert session.turns == []


def test_clear_keeps_the_system_prompt(make_session):
    session, _ = make_session(256)
    answer(session, "Hello there!")
    session.clear()
    assert session.turns == []
    assert session.messages([]) == [{"role": "system", "content": "Be brief."}]


def test_raw_mode_keeps_no_history(make_session):
    session, _ = make_session(256, raw=True, system=None)
    answer(session, "The capital of")
    assert session.turns == []
    assert session.last.prompt_tokens == len(session.tokenizer.encode_raw("The capital of"))


def test_closing_an_answer_keeps_the_partial_turn(make_session):
    session, _ = make_session(256, max_tokens=50)
    stream = session.ask("Hello there!")
    next(stream)
    stream.close()
    assert session.last.finish_reason == "interrupted"
    assert session.turns[-1] == {"role": "assistant", "content": session.last.text}
    assert torch.is_tensor(session.generator.backend.decode(1))  # the cache is still usable
