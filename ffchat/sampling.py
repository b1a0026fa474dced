"""Choosing the next token: sampling settings, logit filters, and a seeded draw.

The filters follow transformers' semantics and order (repetition penalty,
then temperature, top-k, top-p, min-p) so a model behaves here as its model
card describes. Everything runs on the logits' device: greedy decoding copies
only the chosen id to the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Mapping, Sequence

import torch

from ffchat.errors import FfchatError

# generation_config.json key -> SamplingParams field, for the keys a model may set.
GENERATION_CONFIG_KEYS = {
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "repetition_penalty": "repeat_penalty",
}

ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


@dataclass
class SamplingParams:
    """How to pick tokens; the defaults are Ollama's."""

    temperature: float = 0.8  # 0 = greedy
    top_k: int = 40  # 0 = off
    top_p: float = 0.9  # 1.0 = off
    min_p: float = 0.0  # 0 = off
    repeat_penalty: float = 1.1  # 1.0 = off
    repeat_last_n: int = 64  # 0 = off, -1 = the whole context
    seed: int | None = None  # None = a fresh random seed per answer
    max_tokens: int | None = None  # None = until the context is full
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for spec in fields(self):
            valid, requirement = RULES[spec.name]
            value = getattr(self, spec.name)
            if not valid(value):
                raise FfchatError(f"{spec.name} must be {requirement}, not {value!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_generation_config(cls, config: Mapping[str, Any] | None) -> "SamplingParams":
        """Defaults overlaid with the sampling values a model's generation_config.json sets."""
        overrides = {
            name: config[key]
            for key, name in GENERATION_CONFIG_KEYS.items()
            if config and config.get(key) is not None
        }
        return cls(**overrides)

    def set(self, key: str, value: str) -> None:
        """Apply one ``/set KEY VALUE``; bad keys or values raise FfchatError and change nothing."""
        if key == "stop":  # appends, so several stop strings can be set one by one
            parsed = [] if value.strip().lower() == "none" else [*self.stop, _unescape(value)]
        elif key in PARSERS:
            parsed = PARSERS[key](key, value.strip())
        else:
            raise FfchatError(f"unknown setting {key!r}", hint="one of " + ", ".join([*PARSERS, "stop"]))
        checked = replace(self, **{key: parsed})  # validates
        setattr(self, key, getattr(checked, key))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# field -> (is the value valid?, what a valid value is)
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "temperature": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "top_k": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "top_p": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "min_p": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "repeat_penalty": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "repeat_last_n": (lambda v: _is_int(v) and v >= -1, "an integer >= -1"),
    "seed": (lambda v: v is None or (_is_int(v) and 0 <= v < 2**63), "none or an integer in [0, 2^63)"),
    "max_tokens": (lambda v: v is None or (_is_int(v) and v >= 1), "none or an integer >= 1"),
    "stop": (lambda v: isinstance(v, list) and all(isinstance(s, str) and s for s in v), "a list of non-empty strings"),
}


def _parse_float(key: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise FfchatError(f"{key} takes a number, not {text!r}") from None


def _parse_int(key: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise FfchatError(f"{key} takes an integer, not {text!r}") from None


def _parse_optional_int(key: str, text: str) -> int | None:
    return None if text.lower() == "none" else _parse_int(key, text)


def _unescape(text: str) -> str:
    r"""Turn ``\n``, ``\t``, ``\r`` and ``\\`` into their characters, so a stop string can be a newline."""
    out, chars = [], iter(text)
    for char in chars:
        if char == "\\":
            following = next(chars, "")
            out.append(ESCAPES.get(following, char + following))
        else:
            out.append(char)
    return "".join(out)


PARSERS: dict[str, Callable[[str, str], Any]] = {
    "temperature": _parse_float,
    "top_k": _parse_int,
    "top_p": _parse_float,
    "min_p": _parse_float,
    "repeat_penalty": _parse_float,
    "repeat_last_n": _parse_int,
    "seed": _parse_optional_int,
    "max_tokens": _parse_optional_int,
}


def apply_repetition_penalty(
    logits: torch.Tensor, previous_tokens: Sequence[int], params: SamplingParams
) -> torch.Tensor:
    """Penalize each distinct recent token once: positive logits divided, negative multiplied."""
    window = _recent(previous_tokens, params.repeat_last_n)
    if params.repeat_penalty == 1.0 or not window:
        return logits
    distinct = sorted({t for t in window if 0 <= t < logits.shape[-1]})
    ids = torch.tensor(distinct, dtype=torch.long, device=logits.device)
    chosen = logits[ids]
    penalized = torch.where(chosen < 0, chosen * params.repeat_penalty, chosen / params.repeat_penalty)
    return logits.index_put((ids,), penalized)


def _recent(tokens: Sequence[int], last_n: int) -> Sequence[int]:
    if last_n == 0:
        return ()
    return tokens if last_n == -1 else tokens[-last_n:]


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p; removed tokens become -inf, kept ones keep their value."""
    if params.temperature > 0:
        logits = logits / params.temperature
    if params.top_k > 0:
        logits = _top_k(logits, params.top_k)
    if params.top_p < 1.0:
        logits = _top_p(logits, params.top_p)
    if params.min_p > 0:
        logits = _min_p(logits, params.min_p)
    return logits


def _top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits (and any tied with the k-th)."""
    kth_largest = torch.topk(logits, min(k, logits.shape[-1])).values[-1]
    return logits.masked_fill(logits < kth_largest, -math.inf)


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most probable tokens until the ones kept so far hold at least ``top_p`` of the mass.

    A token goes when the tokens less probable than it, itself included, hold at most 1 - top_p;
    the most probable token always stays.
    """
    ascending, order = torch.sort(logits)
    mass_up_to = torch.softmax(ascending, dim=-1).cumsum(dim=-1)
    drop_sorted = mass_up_to <= 1 - top_p
    drop_sorted[-1] = False
    drop = torch.empty_like(drop_sorted).scatter_(0, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def _min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens less probable than ``min_p`` times the most probable one.

    With min_p <= 1 the most probable token can never be dropped, so one token always stays.
    """
    probs = torch.softmax(logits, dim=-1)
    drop = probs < min_p * probs.max()
    return logits.masked_fill(drop, -math.inf)


class Sampler:
    """Picks tokens for one answer; a fixed seed gives the same tokens for the same logits."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self._generator: torch.Generator | None = None

    def sample(self, logits: torch.Tensor, previous_tokens: Sequence[int]) -> int:
        logits = apply_repetition_penalty(logits.float(), previous_tokens, self.params)
        if self.params.greedy:
            return int(torch.argmax(logits))
        probs = torch.softmax(filter_logits(logits, self.params), dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._rng(logits.device)))

    def _rng(self, device: torch.device) -> torch.Generator:
        """One generator per answer, on the logits' device, seeded once."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            if self.params.seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(self.params.seed)
        return self._generator
