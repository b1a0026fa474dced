"""A conversation with a model: history, system prompt, settings, and fitting it into the context.

The interactive chat and the piped mode both talk to the model through this
class, so both keep multi-turn history the same way and neither ever
truncates a prompt silently: old turns are dropped with a notice, and a single
message that cannot fit is an error.
"""

from __future__ import annotations

from typing import Callable, Iterator

from ffchat.errors import FfchatError
from ffchat.generate import Completion, Generator
from ffchat.sampling import SamplingParams
from ffchat.tokenizer import Tokenizer

# Tokens kept free for the answer when deciding whether old turns must go.
ANSWER_RESERVE = 512


class ChatSession:
    def __init__(
        self,
        generator: Generator,
        tokenizer: Tokenizer,
        params: SamplingParams,
        *,
        system: str | None = None,
        raw: bool = False,
        notice: Callable[[str], None] = lambda message: None,
    ):
        self.generator = generator
        self.tokenizer = tokenizer
        self.params = params
        self.system = system
        self.raw = raw
        self.notice = notice
        self.turns: list[dict[str, str]] = []  # user/assistant messages, oldest first
        self.last: Completion | None = None

    @property
    def context_length(self) -> int:
        return self.generator.backend.context_length

    def clear(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.turns.clear()

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    def messages(self, turns: list[dict[str, str]]) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + turns

    def ask(self, text: str) -> Iterator[str]:
        """Stream the answer to one user message; the exchange joins the history afterwards."""
        self.last = None
        if self.raw:
            prompt = self.tokenizer.encode_raw(text)
            self._check_fits(prompt)
            turns = []
        else:
            turns = self.turns + [{"role": "user", "content": text}]
            prompt, turns = self._fit(turns)
        try:
            yield from self.generator.stream(prompt, self.params)  # closing us closes it first
        finally:
            self.last = self.generator.last  # None when the answer failed: the turn is not kept
            if self.last is not None and not self.raw:
                self.turns = turns + [{"role": "assistant", "content": self.last.text}]

    def _fit(self, turns: list[dict[str, str]]) -> tuple[list[int], list[dict[str, str]]]:
        """Drop the oldest exchanges until the prompt leaves room for an answer."""
        reserve = min(self.params.max_tokens or ANSWER_RESERVE, self.context_length // 4)
        dropped = 0
        prompt = self.tokenizer.encode_chat(self.messages(turns))
        while len(prompt) + reserve > self.context_length and len(turns) > 2:
            turns = turns[2:]  # one user message and its answer; the newest message always stays
            dropped += 1
            prompt = self.tokenizer.encode_chat(self.messages(turns))
        self._check_fits(prompt)
        if dropped:
            self.notice(f"dropped the {dropped} oldest exchange(s) to fit the {self.context_length}-token context")
        return prompt, turns

    def _check_fits(self, prompt: list[int]) -> None:
        if len(prompt) >= self.context_length:
            raise FfchatError(
                f"the prompt is {len(prompt)} tokens, more than the {self.context_length}-token context",
                hint="shorten it or raise --ctx",
            )
