"""The generation loop: prompt tokens in, streamed text out, one answer at a time.

The generator remembers which tokens the backend's KV cache holds, so a chat
turn only prefills what changed since the previous one. It never truncates a
prompt, holds back text that may turn out to be a stop string, and treats
Ctrl+C as the end of the answer rather than of the program.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Iterator, Literal, Sequence

import torch

from ffchat.backend import CHAIN_LENGTH, Backend
from ffchat.errors import FfchatError
from ffchat.sampling import Choices, Pick, Sampler, SamplingParams

if TYPE_CHECKING:
    from ffchat.tokenizer import StreamDecoder, Tokenizer

FinishReason = Literal["stop", "length", "context", "interrupted"]


@dataclass
class Completion:
    """One answer and how it went; ``completion_tokens`` excludes the end-of-sequence token."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    ttft_s: float  # prompt in -> first token chosen
    prefill_tokens_per_s: float  # over the tokens actually prefilled (a reused prefix costs nothing)
    decode_tokens_per_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class StopStrings:
    """Cuts text at the first stop string, holding back any tail that could still become one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [stop for stop in stops if stop]
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """The part of the text so far that is now safe to show."""
        if self.stopped:
            return ""
        self.pending += text
        cut = min((i for i in (self.pending.find(stop) for stop in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            shown, self.pending = self.pending[:cut], ""
            return shown
        split = len(self.pending) - self._undecided_tail()
        shown, self.pending = self.pending[:split], self.pending[split:]
        return shown

    def release(self) -> str:
        """At the end of the answer the held-back tail is just text."""
        shown, self.pending = self.pending, ""
        return shown

    def _undecided_tail(self) -> int:
        """Length of the longest tail of the pending text that begins some stop string."""
        for length in range(min(len(self.pending), max(map(len, self.stops), default=1) - 1), 0, -1):
            tail = self.pending[-length:]
            if any(stop.startswith(tail) for stop in self.stops):
                return length
        return 0


def _clock(device: torch.device) -> float:
    """perf_counter after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


class _Answer:
    """The state of one answer while it is generated."""

    def __init__(self, prompt: list[int], params: SamplingParams, decoder: StreamDecoder, stops: Sequence[str],
                 context_length: int, choices: Choices):
        self.prompt_length = len(prompt)
        self.tokens = list(prompt)  # prompt then answer: the repetition penalty looks at both
        self.sampler = Sampler(params, prompt, capacity=context_length, choices=choices)
        self.max_tokens = params.max_tokens
        self.decoder = decoder
        self.stops = StopStrings([*params.stop, *stops])
        self.shown: list[str] = []
        self.finish_reason: FinishReason = "interrupted"
        self.started = self.prefilled = self.first_token = self.last_token = 0.0
        self.prefill_count = self.sampled = 0

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_length

    def show(self, text: str) -> str:
        self.shown.append(text)
        return text

    def text_of(self, token: int) -> str:
        return self.show(self.stops.push(self.decoder.push(token)))

    def tail(self) -> str:
        """Whatever is left to show once generation has ended for a reason other than a stop string."""
        return self.show(self.stops.push(self.decoder.flush()) + self.stops.release())

    def completion(self) -> Completion:
        decode_s = self.last_token - self.first_token
        prefill_s = self.prefilled - self.started
        return Completion(
            text="".join(self.shown),
            prompt_tokens=self.prompt_length,
            completion_tokens=self.generated,
            finish_reason=self.finish_reason,
            ttft_s=self.first_token - self.started if self.sampled else 0.0,
            prefill_tokens_per_s=self.prefill_count / prefill_s if prefill_s > 0 else 0.0,
            decode_tokens_per_s=(self.sampled - 1) / decode_s if decode_s > 0 else 0.0,
        )


class Generator:
    """Streams answers from a backend, reusing its KV cache across turns."""

    def __init__(self, backend: Backend, tokenizer: Tokenizer, chain_length: int | None = CHAIN_LENGTH):
        """``chain_length``: tokens a backend that chains steps (``ChainingBackend``) decodes a call, at most
        ``CHAIN_LENGTH``; None decodes one step a call whatever the backend (benchmarks compare the two), as
        a backend that does not chain always does."""
        if chain_length is not None and not 1 <= chain_length <= CHAIN_LENGTH:
            raise ValueError(f"chain_length must be None or 1 to {CHAIN_LENGTH}, not {chain_length}")
        self.backend = backend
        self.tokenizer = tokenizer
        self.chain_length = chain_length if hasattr(backend, "decode_chain") else None
        self.cached: list[int] = []  # the tokens in the backend's KV cache, in order
        self.choices = Choices()  # the sampler's device work, captured once per setting across answers
        self.last: Completion | None = None

    def stream(self, prompt_tokens: Sequence[int], params: SamplingParams, stop: Sequence[str] = ()) -> Iterator[str]:
        """Yield the answer's text as it comes; afterwards ``self.last`` describes it.

        ``stop`` adds stop strings to ``params.stop``. Ctrl+C, or closing the iterator, ends the
        answer with finish_reason "interrupted" instead of raising.
        """
        from ffchat.tokenizer import StreamDecoder  # lazily: importing Completion needs no tokenizers library

        self.last = None
        prompt = list(prompt_tokens)
        self._check_prompt(prompt)
        answer = _Answer(prompt, params, StreamDecoder(self.tokenizer), stop, self.backend.context_length,
                         self.choices)
        try:
            yield from self._generate(answer)
            self._resync()  # forget the step queued for the token that ended the answer
        except KeyboardInterrupt:
            answer.finish_reason = "interrupted"
            self._resync()
        except GeneratorExit:
            answer.finish_reason = "interrupted"
            self._resync()
            self.last = answer.completion()
            raise
        tail = "" if answer.stops.stopped else answer.tail()
        self.last = answer.completion()
        if tail:
            yield tail

    def _check_prompt(self, prompt: list[int]) -> None:
        if not prompt:
            raise FfchatError("the prompt is empty")
        if len(prompt) > self.backend.context_length:
            raise FfchatError(
                f"the prompt is {len(prompt)} tokens, more than the {self.backend.context_length}-token context",
                hint="shorten it or use a longer context",
            )

    def _generate(self, answer: _Answer) -> Iterator[str]:
        """Pick tokens on the device and queue the steps that read them before the host learns them.

        So the GPU computes the next tokens while the host shows these (and checks them for an end):
        the host's time per token hides behind the GPU's. Steps queued past a token that ends the
        answer are wasted work, forgotten by the rewind in ``stream``.
        """
        eos = set(self.tokenizer.eos_token_ids)
        pick = answer.sampler.pick(self._prefill(answer))
        while True:
            ahead = self._decode_ahead(answer, pick)
            for token in pick.values():
                self._timestamp(answer)
                if token in eos:
                    answer.finish_reason = "stop"
                    return
                answer.tokens.append(token)
                text = answer.text_of(token)
                if text:
                    yield text
                reason = self._finish_reason(answer)
                if reason:
                    answer.finish_reason = reason
                    return
                self.cached.append(token)
            assert ahead is not None, "_decode_ahead queues nothing only when these tokens end the answer"
            pick = ahead

    def _decode_ahead(self, answer: _Answer, pick: Pick) -> Pick | None:
        """Queue the decode of the last picked token and the picks after it, unless none can be needed: the
        answer's last token is picked, or the context is full. A backend that chains steps
        (``ChainingBackend``) decodes ``chain_length`` tokens a call while that many fit and are wanted."""
        known = answer.generated + len(pick.tokens)  # the answer's tokens once these are read
        room = self.backend.context_length - self.backend.position
        needed = room if answer.max_tokens is None else min(room, answer.max_tokens - known)
        if needed <= 0:
            return None
        if self.chain_length is None:
            return answer.sampler.pick(self.backend.decode(pick.last))
        # two chain lengths a setup (two graphs), and no steps wasted at the answer's end
        count = self.chain_length if needed >= self.chain_length else 1
        return Pick(self.backend.decode_chain(pick.last, answer.sampler.chooser(count), count))

    def _prefill(self, answer: _Answer) -> torch.Tensor:
        """Rewind to the longest cached prefix of the prompt and prefill the rest (at least one token)."""
        prompt = answer.tokens  # nothing generated yet
        answer.started = _clock(self.backend.device)
        self._resync()
        keep = min(_shared_prefix(self.cached, prompt), len(prompt) - 1)
        self.backend.rewind(keep)
        del self.cached[keep:]
        logits = self.backend.prefill(prompt[keep:])
        self.cached = list(prompt)
        answer.prefill_count = len(prompt) - keep
        answer.prefilled = _clock(self.backend.device)
        return logits

    def _timestamp(self, answer: _Answer) -> None:
        """When a token reached the host (without waiting for the step queued behind it)."""
        answer.last_token = time.perf_counter()
        if not answer.sampled:
            answer.first_token = answer.last_token
        answer.sampled += 1

    def _finish_reason(self, answer: _Answer) -> FinishReason | None:
        if answer.stops.stopped:
            return "stop"
        if answer.max_tokens is not None and answer.generated >= answer.max_tokens:
            return "length"
        if len(self.cached) >= self.backend.context_length:  # the answer's last token would not fit
            return "context"
        return None

    def _resync(self) -> None:
        """Trust only cached tokens whose backend call completed, and forget a step queued for a token that
        ended the answer (after Ctrl+C, at the end of an answer, or after a rewind by someone else)."""
        keep = min(self.backend.position, len(self.cached))
        if keep != self.backend.position:
            self.backend.rewind(keep)
        del self.cached[keep:]
