"""Choosing the next token: sampling settings, logit filters, and a seeded draw.

The filters follow transformers' semantics and order (repetition penalty,
then temperature, top-k, top-p, min-p) so a model behaves here as its model
card describes. Everything runs on the logits' device and nothing waits for the
host: the chosen id travels to the host on its own (``Pick``), so the generation
loop can queue the step that reads it first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Mapping, Sequence

import torch

from ffchat.backend import CHAIN_LENGTH
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


def apply_repetition_penalty(logits: torch.Tensor, ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalize each distinct token of ``ids`` (``RecentTokens.ids``) once: positive logits divided, negative
    multiplied.

    An id equal to the vocabulary size is an empty slot and changes nothing. A token repeated in ``ids``
    writes the same penalized value twice, so repeats need no deduplication (which would need the host
    to see the tokens).
    """
    if penalty == 1.0:
        return logits
    padded = torch.cat([logits, logits.new_zeros(1)])  # the empty slots' scratch logit
    chosen = padded[ids]
    return padded.index_put((ids,), torch.where(chosen < 0, chosen * penalty, chosen / penalty))[:-1]


class RecentTokens:
    """The last ``last_n`` tokens (-1: the whole ``capacity``-token context) on the device, for the penalty.

    An answer's prompt comes from the host once (``reset``); every picked token is written on the
    device, so choosing the next token never waits for the host to learn the last one. The penalty
    needs the set, not the order, so a ring of slots serves; empty slots hold the vocabulary size.
    Fixed shapes and device-side counting: the writes can be captured in a CUDA graph.
    """

    def __init__(self, last_n: int, vocab: int, capacity: int, device: torch.device):
        self.last_n, self.vocab = last_n, vocab
        self.size = capacity if last_n == -1 else last_n
        self.ids = torch.full((max(self.size, 1),), vocab, dtype=torch.long, device=device)
        self.count = torch.zeros((), dtype=torch.long, device=device)  # tokens written so far

    def reset(self, prompt: Sequence[int]) -> None:
        """Forget every token, then hold the window of ``prompt`` (which fits the capacity: it is in the context)."""
        window = list(prompt) if self.last_n == -1 else list(prompt)[-self.last_n:] if self.last_n > 0 else []
        known = [t for t in window if 0 <= t < self.vocab]  # an id outside the vocabulary has no logit to penalize
        if len(known) > self.size:
            raise ValueError(f"{len(known)} prompt tokens do not fit the {self.size} recent-token slots")
        self.ids.fill_(self.vocab)
        self.ids[:len(known)] = torch.tensor(known, dtype=torch.long)
        self.count.fill_(len(known))

    def append(self, token: torch.Tensor) -> None:
        """A token [1] that only the device knows yet (nothing to keep with ``last_n`` 0)."""
        if self.size:
            self.ids.index_copy_(0, (self.count % self.size).view(1), token)
            self.count += 1


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p; removed tokens become -inf, kept ones keep their value.

    The reference: transformers' warpers one by one over the whole vocabulary. Sampling runs
    ``candidates``, the same filters on a short sorted list, which the tests hold to this.
    """
    if params.temperature > 0:
        logits = logits / params.temperature
    if params.top_k > 0:
        logits = _top_k(logits, params.top_k)
    if params.top_p < 1.0:
        logits = _top_p(logits, params.top_p)
    if params.min_p > 0:
        logits = _min_p(logits, params.min_p)
    return logits


def candidates(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens ``filter_logits`` keeps, as (filtered values, ids) sorted by value, largest first; removed ones -inf.

    The same filters on a short list instead of the whole vocabulary: with top-k, the 2k largest
    scaled logits (so up to k ties at the k-th place stay, as ``filter_logits`` keeps them), else
    the whole sorted vocabulary. A draw from their softmax is a draw from ``filter_logits``'.
    """
    scaled = logits / params.temperature if params.temperature > 0 else logits
    vocab = scaled.shape[-1]
    if 0 < params.top_k < vocab:
        values, ids = torch.topk(scaled, min(2 * params.top_k, vocab))
        values = values.masked_fill(values < values[params.top_k - 1], -math.inf)
    else:
        values, ids = torch.sort(scaled, descending=True)
    if params.top_p < 1.0:
        values = values.masked_fill(_top_p_drops(values.flip(0), params.top_p).flip(0), -math.inf)
    if params.min_p > 0:
        values = _min_p(values, params.min_p)
    return values, ids


def _top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits (and any tied with the k-th)."""
    kth_largest = torch.topk(logits, min(k, logits.shape[-1])).values[-1]
    return logits.masked_fill(logits < kth_largest, -math.inf)


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most probable tokens until the ones kept so far hold at least ``top_p`` of the mass."""
    ascending, order = torch.sort(logits)
    drop = torch.empty_like(ascending, dtype=torch.bool).scatter_(0, order, _top_p_drops(ascending, top_p))
    return logits.masked_fill(drop, -math.inf)


def _top_p_drops(ascending: torch.Tensor, top_p: float) -> torch.Tensor:
    """Which of these logits (sorted ascending) top-p removes.

    A token goes when the tokens less probable than it, itself included, hold at most 1 - top_p;
    the most probable token always stays.
    """
    mass_up_to = torch.softmax(ascending, dim=-1).cumsum(dim=-1)
    drop = mass_up_to <= 1 - top_p
    drop[-1:].fill_(False)  # not `drop[-1] = False`: that copies from the host, which a CUDA graph cannot capture
    return drop


def _min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens less probable than ``min_p`` times the most probable one.

    With min_p <= 1 the most probable token can never be dropped, so one token always stays.
    """
    probs = torch.softmax(logits, dim=-1)
    drop = probs < min_p * probs.max()
    return logits.masked_fill(drop, -math.inf)


class Pick:
    """Tokens chosen on the device and on their way to the host; ``values()`` waits for that copy alone.

    The step that reads the last of them can be queued before the host has them (``Generator``).
    ``tokens`` may be a captured graph's output, valid until the next pick of the same sampler is queued.
    """

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens  # int64 [n] on the logits' device, in the order they were chosen
        self._ready = None
        self._host = tokens
        if tokens.device.type == "cuda":
            self._host = torch.empty(tokens.shape, dtype=torch.long, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()

    @property
    def last(self) -> torch.Tensor:
        """The last token [1], still on the device: what the next step reads."""
        return self.tokens[-1:]

    def values(self) -> list[int]:
        if self._ready is not None:
            self._ready.synchronize()
        return self._host.tolist()


class Choice:
    """Choosing a token under one sampling setup as fixed-shape device work: repetition penalty, filters,
    draw, and the pick written into the recent tokens, with no value read back to the host.

    On CUDA the penalty and (for 0 < top_k <= 128) the filters and draw run as the Triton kernels of
    ``ffchat.kernels.sampling``, whose references are the torch ops used elsewhere; either way the
    launches are captured as one graph at the second use and replayed after, so the host queues a
    token in a few launches and stays ahead of the GPU. A Choice serves every answer with the same
    settings (``Choices``): only the first answer pays the capture. A backend that chains decode steps
    captures ``choose`` into its own graph instead (``ffchat.backend.ChainingBackend``).
    """

    def __init__(self, params: SamplingParams, vocab: int, capacity: int, device: torch.device):
        self.params = replace(params)  # a copy: a chat's /set edits its params in place, the graph keeps these
        self.recent = RecentTokens(params.repeat_last_n if params.repeat_penalty != 1.0 else 0, vocab, capacity,
                                   device)
        self.logits = torch.empty(vocab, dtype=torch.float32, device=device)  # the graph's fixed input
        # one uniform number per token of a chain, drawn by the host's generator before the chain is queued
        self.uniforms = torch.zeros(CHAIN_LENGTH, dtype=torch.float32, device=device)
        self.token: torch.Tensor | None = None  # its output
        self.graph: torch.cuda.CUDAGraph | None = None

    def __call__(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The token [1] for ``logits``; ``generator`` draws the uniform number of a sampled (not greedy) pick."""
        self.logits.copy_(logits)
        self.draw_uniforms(generator, 1)
        if self.graph is not None:
            self.graph.replay()
        elif self.token is not None and logits.device.type == "cuda":  # it ran once eagerly: capture it
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                token = self.choose(self.logits)
            self.graph, self.token = graph, token  # only once captured whole (Ctrl+C may cut a capture short)
            self.graph.replay()
        else:
            self.token = self.choose(self.logits)
        return self.token

    def draw_uniforms(self, generator: torch.Generator | None, count: int) -> None:
        """The uniform numbers of the next ``count`` picks, one draw each: a seed gives the same stream however
        the picks are grouped into chains. Nothing to draw for a greedy pick (``generator`` None)."""
        if generator is not None:
            for slot in range(count):
                self.uniforms[slot:slot + 1].uniform_(generator=generator)

    def choose(self, logits: torch.Tensor, slot: int = 0) -> torch.Tensor:
        """The token [1] for ``logits`` [vocab] fp32, which it may edit in place, drawn with uniform number
        ``slot``; fixed shapes and no host sync, so it can be captured in a CUDA graph."""
        params, on_gpu = self.params, logits.device.type == "cuda"
        uniform = self.uniforms[slot:slot + 1]
        if on_gpu:  # the kernels: a few launches where the torch ops below take some thirty
            from ffchat.kernels.sampling import MOST_TOP_K, penalize_recent, sample_top_k
            if params.repeat_penalty != 1.0:
                penalize_recent(logits, self.recent.ids, params.repeat_penalty)
            if not params.greedy and 0 < params.top_k <= MOST_TOP_K and params.top_k < logits.numel():
                ring = self.recent.ids if self.recent.size else None
                return sample_top_k(logits, uniform, top_k=params.top_k, temperature=params.temperature,
                                    top_p=params.top_p, min_p=params.min_p, ring=ring, count=self.recent.count)
        else:
            logits = apply_repetition_penalty(logits, self.recent.ids, params.repeat_penalty)
        if params.greedy:
            token = torch.argmax(logits).view(1)
        else:
            values, ids = candidates(logits, params)
            token = ids[draw(values, uniform)]
        self.recent.append(token)
        return token


class Choices:
    """The ``Choice`` of each recent sampling setup, kept across answers (each holds a graph and its memory)."""

    def __init__(self, most: int = 4):
        self.most = most
        self._by_setup: dict[tuple, Choice] = {}

    def get(self, params: SamplingParams, vocab: int, capacity: int, device: torch.device) -> Choice:
        setup = (params.temperature, params.top_k, params.top_p, params.min_p, params.repeat_penalty,
                 params.repeat_last_n, vocab, capacity, device)
        choice = self._by_setup.pop(setup, None) or Choice(params, vocab, capacity, device)
        self._by_setup[setup] = choice  # the most recently used last
        while len(self._by_setup) > self.most:
            del self._by_setup[next(iter(self._by_setup))]
        return choice


class Sampler:
    """Picks tokens for one answer on the logits' device; a fixed seed gives the same tokens for the same logits.

    ``previous_tokens`` (the prompt) and every picked token feed the repetition penalty, whose
    window with ``repeat_last_n`` -1 is the whole ``capacity``-token context. ``choices`` lends the
    device work of earlier answers with the same settings (a fresh set without it).
    """

    def __init__(self, params: SamplingParams, previous_tokens: Sequence[int] = (), capacity: int = 0,
                 choices: Choices | None = None):
        self.params = params
        self._previous = list(previous_tokens)
        self._capacity = capacity
        self._choices = choices if choices is not None else Choices()
        self._choice: Choice | None = None
        self._generator: torch.Generator | None = None

    def pick(self, logits: torch.Tensor) -> Pick:
        if self._choice is None:
            self._choice = self._choices.get(self.params, logits.shape[-1], self._capacity, logits.device)
            self._choice.recent.reset(self._previous)
        return Pick(self._choice(logits, self._draws(logits.device)))

    def chooser(self, count: int) -> Choice:
        """The device work that picks the next ``count`` tokens inside a backend's chain of decode steps
        (``Backend.decode_chain``), their uniform numbers drawn; after a first ``pick``, which sets it up."""
        if self._choice is None:
            raise RuntimeError("the first token of an answer is picked from the prompt's logits")
        if not 1 <= count <= CHAIN_LENGTH:
            raise ValueError(f"a chain picks 1 to {CHAIN_LENGTH} tokens, not {count}")
        self._choice.draw_uniforms(self._draws(self._choice.logits.device), count)
        return self._choice

    def _draws(self, device: torch.device) -> torch.Generator | None:
        """What draws the uniform numbers: none for greedy picks."""
        return None if self.params.greedy else self._rng(device)

    def _rng(self, device: torch.device) -> torch.Generator:
        """One generator per answer, on the logits' device, seeded once."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            if self.params.seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(self.params.seed)
        return self._generator


def draw(values: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Index [1] drawn from softmax(values) by inverting its CDF at ``uniform`` [1] in [0, 1).

    ``values`` sorted largest first, removed ones -inf (so the kept ones are a prefix): one uniform
    number per token, and the result never lands on a removed token even where rounding puts the
    point at the end of the CDF.
    """
    cdf = torch.softmax(values, dim=-1).cumsum(dim=-1)
    index = torch.searchsorted(cdf, uniform * cdf[-1], right=True)
    return torch.minimum(index, torch.isfinite(values).sum() - 1)
