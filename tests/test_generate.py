"""The generation loop against a scripted backend and the real test tokenizer.

The backend replays a fixed answer after every prefill (its logits depend only
on how far past the last prefill it is) and records every call, so the tests
can check exactly what was prefilled, decoded and rewound.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from factory import build_tokenizer

from ffchat.backend import CHAIN_LENGTH
from ffchat.errors import FfchatError
from ffchat.generate import Generator
from ffchat.sampling import SamplingParams
from ffchat.tokenizer import Tokenizer

GREEDY = dict(temperature=0, repeat_penalty=1.0)
TEXT = "The capital of France is Paris. The capital of Italy is Rome."


class ScriptedBackend:
    """After each prefill, greedy decoding yields ``answer`` token by token, then ``filler`` forever."""

    name = "scripted"
    steps_a_call = 1  # the generator queues one decode step a call
    config = None
    device = torch.device("cpu")
    prefill_s, decode_s = 0.5, 0.1  # what each call costs on the simulated clock

    def __init__(self, answer, *, filler, vocab_size, context_length=256, interrupt_at_decode=None, peak=10.0):
        self.answer = list(answer)
        self.filler = filler
        self.peak = peak
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.interrupt_at_decode = interrupt_at_decode
        self.tokens: list[int] = []  # what the KV cache would hold
        self.calls: list[tuple] = []
        self.decodes = 0
        self.answer_start = 0
        self.clock = 0.0

    @property
    def position(self) -> int:
        return len(self.tokens)

    def prefill(self, tokens):
        tokens = list(tokens)
        self.calls.append(("prefill", tokens))
        assert tokens and self.position + len(tokens) <= self.context_length
        self.tokens += tokens
        self.answer_start = self.position
        self.clock += self.prefill_s
        return self._logits()

    def decode(self, token):
        token = int(token)  # a picked token arrives as a tensor; this stand-in has no queue to put it in
        self.calls.append(("decode", token))
        assert self.position < self.context_length, "decoded past the context"
        self.tokens.append(token)  # the cache is written before the interrupt: the worst case
        self.decodes += 1
        self.clock += self.decode_s
        if self.decodes == self.interrupt_at_decode:
            raise KeyboardInterrupt
        return self._logits()

    def rewind(self, position):
        self.calls.append(("rewind", position))
        assert 0 <= position <= self.position
        del self.tokens[position:]

    def _logits(self) -> torch.Tensor:
        step = self.position - self.answer_start
        logits = torch.zeros(self.vocab_size)
        logits[self.answer[step] if step < len(self.answer) else self.filler] = self.peak
        return logits


class ChainingScriptedBackend(ScriptedBackend):
    """The scripted answer through ``decode_chain``: the generator asks for several steps a call."""

    steps_a_call = CHAIN_LENGTH

    def decode_chain(self, token, chooser, count):
        picks = []
        for slot in range(count):
            token = chooser.choose(self.decode(token), slot)
            picks.append(token)
        return torch.cat(picks)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    """The factory's tokenizer, with a second end-of-sequence id as models like Qwen declare."""
    directory = tmp_path_factory.mktemp("tokenizer")
    trained = build_tokenizer(directory)
    eos = [trained.token_to_id("<|im_end|>"), trained.token_to_id("<|endoftext|>")]
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    return Tokenizer.from_dir(directory)


def builder(tokenizer, backend_class):
    """A generator over a scripted backend answering ``text`` (then ``end`` ids, then filler)."""

    def build(text=TEXT, end=("<|im_end|>",), **backend_options):
        answer = tokenizer.encode(text) + [tokenizer.encode(token)[0] for token in end]
        filler = tokenizer.encode(" the")[0]
        backend = backend_class(answer, filler=filler, vocab_size=tokenizer.vocab_size, **backend_options)
        return Generator(backend, tokenizer), backend

    return build


@pytest.fixture(params=[ScriptedBackend, ChainingScriptedBackend], ids=["steps", "chains"])
def make(tokenizer, request):
    """``builder``, with and without chained steps."""
    return builder(tokenizer, request.param)


@pytest.fixture
def make_steps(tokenizer):
    """``builder`` with one step a call: the stand-in runs its steps at once, so only then is each token's
    time its own step's."""
    return builder(tokenizer, ScriptedBackend)


def steps_queued(backend, picks: int) -> int:
    """Decode steps queued once the host has read the ``picks``-th token (the prompt's pick the first): every
    call's picks are read after the next call is queued."""
    calls = -(-(picks - 1) // backend.steps_a_call) + 1
    return calls * backend.steps_a_call


def shown_before_interrupt(backend) -> int:
    """Tokens shown when the third call's first step is interrupted: the prompt's pick, then the first call's."""
    return 1 + backend.steps_a_call


def run(generator, prompt, stop=(), **params):
    """Stream one answer; return the pieces and the Completion."""
    pieces = list(generator.stream(prompt, SamplingParams(**{**GREEDY, **params}), stop=stop))
    assert generator.last is not None
    assert "".join(pieces) == generator.last.text
    assert all(pieces), "empty pieces should not be yielded"
    return pieces, generator.last


def test_tokenizer_has_two_eos_ids(tokenizer):
    assert tokenizer.eos_token_ids == {tokenizer.encode("<|im_end|>")[0], tokenizer.encode("<|endoftext|>")[0]}


@pytest.mark.parametrize("eos", ["<|im_end|>", "<|endoftext|>"])
def test_eos_stops_and_is_not_printed(make, tokenizer, eos):
    generator, backend = make("Hello there!", end=(eos, "<|im_start|>"))
    prompt = tokenizer.encode("Hi")
    pieces, completion = run(generator, prompt)
    assert completion.text == "Hello there!"
    assert completion.finish_reason == "stop"
    assert completion.completion_tokens == len(tokenizer.encode("Hello there!"))
    assert completion.prompt_tokens == len(prompt)
    # the eos came from the last decode's logits; the steps queued for it before the host saw it are forgotten
    assert backend.decodes == steps_queued(backend, completion.completion_tokens + 1)
    assert backend.tokens == generator.cached == prompt + tokenizer.encode("Hello there!")


def test_stop_string_spanning_tokens_cuts_exactly(make, tokenizer):
    generator, backend = make()
    prompt = tokenizer.encode("Q:")
    pieces, completion = run(generator, prompt, stop=["France is"])
    assert completion.text == "The capital of "
    assert completion.finish_reason == "stop"
    assert not any("Fr" in piece for piece in pieces)
    # ' is' completed the stop string: the steps queued for it ran, and the cache forgot them
    assert completion.completion_tokens == len(tokenizer.encode("The capital of France is"))
    assert backend.decodes == steps_queued(backend, completion.completion_tokens)
    assert backend.position == len(generator.cached) == len(prompt) + completion.completion_tokens - 1


@pytest.mark.parametrize("chain_length", [None, 1, 3, CHAIN_LENGTH])
def test_a_chaining_backend_decodes_the_chain_length_a_call(tokenizer, chain_length):
    """None queues one step a call through ``decode``; a chain's length is its steps a call, down to single
    steps where fewer tokens are wanted (``max_tokens``), so no step is wasted at the answer's end."""
    generator, backend = builder(tokenizer, ChainingScriptedBackend)()
    generator = Generator(backend, tokenizer, chain_length=chain_length)
    chains = []
    backend.decode_chain = lambda token, chooser, count: chains.append(count) or \
        ChainingScriptedBackend.decode_chain(backend, token, chooser, count)
    prompt = tokenizer.encode("Q:")
    _, completion = run(generator, prompt, max_tokens=12)
    assert (completion.finish_reason, completion.completion_tokens) == ("length", 12)
    assert backend.decodes == 11 and generator.cached == backend.tokens == prompt + tokenizer.encode(TEXT)[:11]
    if chain_length is None:
        assert chains == []
    else:
        assert chains == [chain_length] * (11 // chain_length) + [1] * (11 % chain_length)


@pytest.mark.parametrize("chain_length", [0, CHAIN_LENGTH + 1])
def test_a_chain_longer_than_the_samplers_draws_is_refused(make_steps, chain_length):
    generator, backend = make_steps()
    with pytest.raises(ValueError, match="chain_length"):
        Generator(backend, generator.tokenizer, chain_length=chain_length)


def test_false_start_is_held_back_then_released(make, tokenizer):
    generator, _ = make()
    pieces, completion = run(generator, tokenizer.encode("Q:"), stop=["capital city"])
    assert pieces[:3] == ["The", " ", "capital of"]  # "capital" waited for " of" to rule the stop out
    assert completion.text == TEXT
    assert completion.finish_reason == "stop"


def test_text_held_back_at_the_end_is_released(make, tokenizer):
    generator, _ = make()
    pieces, completion = run(generator, tokenizer.encode("Q:"), stop=[".\n"])
    assert completion.text == TEXT
    assert pieces[-1] == "."


def test_earliest_stop_string_wins_and_params_and_argument_combine(make, tokenizer):
    generator, _ = make()
    params = SamplingParams(**GREEDY, stop=["Italy"])
    list(generator.stream(tokenizer.encode("Q:"), params, stop=["Paris"]))
    assert generator.last.text == "The capital of France is "
    list(generator.stream(tokenizer.encode("Q:"), params, stop=["Rome", "capital"]))
    assert generator.last.text == "The "
    list(generator.stream(tokenizer.encode("Q:"), params, stop=["of", "capital of"]))  # both complete at " of"
    assert generator.last.text == "The "


def test_max_tokens_gives_length(make, tokenizer):
    generator, backend = make()
    pieces, completion = run(generator, tokenizer.encode("Q:"), max_tokens=3)
    assert completion.finish_reason == "length"
    assert completion.completion_tokens == 3
    assert completion.text == tokenizer.decode(tokenizer.encode(TEXT)[:3])
    assert backend.decodes == 2


def test_full_context_gives_context(make, tokenizer):
    prompt = tokenizer.encode("Q: what is it?")
    generator, backend = make(context_length=len(prompt) + 6)
    pieces, completion = run(generator, prompt)
    assert completion.finish_reason == "context"
    assert backend.position == backend.context_length
    assert completion.completion_tokens == 7  # the last one is chosen from the full cache's logits
    assert completion.text == tokenizer.decode(tokenizer.encode(TEXT)[:7])


def test_prompt_of_exactly_the_context_still_answers_one_token(make, tokenizer):
    prompt = tokenizer.encode("Q: what is it?")
    generator, backend = make(context_length=len(prompt))
    _, completion = run(generator, prompt)
    assert (completion.finish_reason, completion.completion_tokens) == ("context", 1)
    assert backend.decodes == 0


def test_prompt_longer_than_the_context_is_an_error(make, tokenizer):
    prompt = tokenizer.encode("Q: what is it?")
    generator, backend = make(context_length=len(prompt) - 1)
    with pytest.raises(FfchatError, match="context"):
        list(generator.stream(prompt, SamplingParams(**GREEDY)))
    assert backend.calls == []


def test_empty_prompt_is_an_error(make):
    generator, _ = make()
    with pytest.raises(FfchatError):
        list(generator.stream([], SamplingParams(**GREEDY)))


def test_second_turn_prefills_only_the_new_suffix(make, tokenizer):
    generator, backend = make("Paris.")
    first = tokenizer.encode("<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n")
    run(generator, first)
    answer = tokenizer.encode("Paris.")
    assert backend.tokens == first + answer == generator.cached

    second = first + answer + tokenizer.encode("<|im_end|>\n<|im_start|>user\nAnd Italy?<|im_end|>\n")
    backend.calls.clear()
    _, completion = run(generator, second)
    assert backend.calls[:2] == [("rewind", len(first + answer)), ("prefill", second[len(first + answer):])]
    assert completion.text == "Paris."
    assert completion.prompt_tokens == len(second)


def test_changed_history_rewinds_to_the_divergence(make, tokenizer):
    generator, backend = make("Paris.")
    first = tokenizer.encode("Hello there! How are you today?")
    run(generator, first)
    second = first[:4] + tokenizer.encode(" Numbers")
    backend.calls.clear()
    run(generator, second)
    assert backend.calls[:2] == [("rewind", 4), ("prefill", second[4:])]


def test_repeated_prompt_reprefills_its_last_token(make, tokenizer):
    generator, backend = make("Paris.")
    prompt = tokenizer.encode("Hello there!")
    run(generator, prompt, max_tokens=1)  # the answer's only token is chosen, never decoded
    assert generator.cached == prompt == backend.tokens
    backend.calls.clear()
    run(generator, prompt, max_tokens=1)
    assert backend.calls == [("rewind", len(prompt) - 1), ("prefill", prompt[-1:])]


def test_cache_reset_by_someone_else_is_noticed(make, tokenizer):
    generator, backend = make("Paris.")
    prompt = tokenizer.encode("Hello there!")
    run(generator, prompt)
    backend.rewind(0)  # e.g. /clear on the backend directly
    backend.calls.clear()
    run(generator, prompt)
    assert backend.calls[:2] == [("rewind", 0), ("prefill", prompt)]


def test_interrupt_ends_the_answer_cleanly(make, tokenizer):
    generator, backend = make()
    backend.interrupt_at_decode = 2 * backend.steps_a_call + 1  # queuing the third call, before its tokens show
    shown = shown_before_interrupt(backend)
    prompt = tokenizer.encode("Q:")
    pieces, completion = run(generator, prompt)
    answer = tokenizer.encode(TEXT)
    assert completion.finish_reason == "interrupted"
    assert completion.text == tokenizer.decode(answer[:shown])
    assert completion.completion_tokens == shown
    # the interrupted decode is not trusted, nor any step after the tokens shown: cache and bookkeeping agree
    assert backend.position == len(generator.cached) == len(prompt) + shown
    assert generator.cached == backend.tokens == prompt + answer[:shown]

    backend.interrupt_at_decode = None
    backend.calls.clear()
    _, after = run(generator, prompt + answer[:shown + 1])
    assert backend.calls[:2] == [("rewind", len(prompt) + shown), ("prefill", answer[shown:shown + 1])]
    assert after.finish_reason == "stop"


def test_interrupt_shows_text_held_back_for_a_stop_string(make, tokenizer):
    generator, backend = make()
    backend.interrupt_at_decode = 2 * backend.steps_a_call + 1
    shown = tokenizer.encode(TEXT)[:shown_before_interrupt(backend)]
    stop = tokenizer.decode(shown[-1:]).strip() + " city"  # the last token shown could begin it: held back
    _, completion = run(generator, tokenizer.encode("Q:"), stop=[stop])
    assert (completion.finish_reason, completion.text) == ("interrupted", tokenizer.decode(shown))


def test_closing_the_stream_records_an_interrupted_answer(make, tokenizer):
    generator, backend = make()
    stream = generator.stream(tokenizer.encode("Q:"), SamplingParams(**GREEDY))
    shown = [next(stream), next(stream)]
    stream.close()
    assert generator.last.finish_reason == "interrupted"
    assert generator.last.text == "".join(shown) == "The capital"
    assert backend.position == len(generator.cached)


def test_pieces_are_whole_characters(make, tokenizer):
    text = "emoji \U0001f600 and \u65e5\u672c\u8a9e, caf\u00e9"
    generator, _ = make(text)
    pieces, completion = run(generator, tokenizer.encode("Q:"))
    assert completion.text == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert len(pieces) < len(tokenizer.encode(text))  # multi-token characters came out as one piece


def test_seeded_sampling_repeats_across_answers(make, tokenizer):
    generator, _ = make(peak=0.0)  # uniform logits: every token is a real choice
    prompt = tokenizer.encode("Q:")

    def answer(seed):
        return run(generator, prompt, temperature=1.0, top_k=0, top_p=1.0, max_tokens=20, seed=seed)[1].text

    assert answer(11) == answer(11)
    assert answer(11) != answer(12)


def test_completion_to_dict_is_json(make, tokenizer):
    generator, _ = make()
    _, completion = run(generator, tokenizer.encode("Q:"))
    data = json.loads(json.dumps(completion.to_dict()))
    assert data["text"] == TEXT
    assert data["finish_reason"] == "stop"
    assert set(data) == {"text", "prompt_tokens", "completion_tokens", "finish_reason", "ttft_s",
                         "prefill_tokens_per_s", "decode_tokens_per_s"}
    assert data["ttft_s"] > 0 and data["prefill_tokens_per_s"] > 0 and data["decode_tokens_per_s"] > 0


def test_timings_follow_the_clock(make_steps, tokenizer, monkeypatch):
    generator, backend = make_steps("Paris.")
    monkeypatch.setattr("ffchat.generate.time", SimpleNamespace(perf_counter=lambda: backend.clock))
    prompt = tokenizer.encode("Hello there! How are you today?")
    _, completion = run(generator, prompt)
    # the stand-in runs a queued step at once, so the first token reaches the host after its step
    assert completion.ttft_s == pytest.approx(backend.prefill_s + backend.decode_s)
    assert completion.prefill_tokens_per_s == pytest.approx(len(prompt) / backend.prefill_s)
    assert completion.decode_tokens_per_s == pytest.approx(1 / backend.decode_s)

    new = tokenizer.encode(" And")
    _, again = run(generator, prompt + tokenizer.encode("Paris.") + new)
    assert again.prefill_tokens_per_s == pytest.approx(len(new) / backend.prefill_s)  # only what was prefilled


def test_cuda_clock_waits_for_the_prefill_but_not_per_token(make, tokenizer, monkeypatch):
    """TTFT and prefill tok/s must not measure launches, so the prefill is waited for; a wait per token
    would stall the step queued behind it, so tokens are timed as they reach the host."""
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    generator, backend = make("Paris.")
    backend.device = torch.device("cuda", 0)  # the fake's logits stay on the CPU
    _, completion = run(generator, tokenizer.encode("Q:"))
    assert completion.completion_tokens > 1
    assert synced == [torch.device("cuda", 0)] * 2  # start, prefill


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("params", [GREEDY, dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, seed=1)])
def test_generation_with_logits_on_the_gpu(make, tokenizer, params):
    generator, backend = make()
    backend.device = torch.device("cuda")
    cpu_logits = backend._logits
    backend._logits = lambda: cpu_logits().to(backend.device)
    _, completion = run(generator, tokenizer.encode("Q:"), **params)
    assert (completion.text, completion.finish_reason) == (TEXT, "stop")


def test_queued_steps_answer_like_one_step_at_a_time(tiny_model_dir):
    """The loop queues each token's step before the host reads the token: the answer is a plain loop's."""
    from ffchat.model import load_model
    from ffchat.reference_backend import ReferenceBackend

    model_dir = tiny_model_dir("llama")
    tokenizer = Tokenizer.from_dir(model_dir)
    prompt = tokenizer.encode("The capital of")
    backend = ReferenceBackend(load_model(model_dir, max_seq_len=256))
    logits, expected = backend.prefill(prompt), []
    while len(expected) < 12 and int(logits.argmax()) not in tokenizer.eos_token_ids:
        expected.append(int(logits.argmax()))
        logits = backend.decode(expected[-1])
    backend.rewind(0)
    _, completion = run(Generator(backend, tokenizer), prompt, max_tokens=12)
    assert completion.completion_tokens == len(expected) > 1
    assert completion.text == tokenizer.decode(expected)


def test_reused_cache_answers_like_a_fresh_one(tiny_model_dir):
    """End to end on the reference model: turns over the reused (and rewound) KV cache give fresh answers."""
    from ffchat.model import load_model
    from ffchat.reference_backend import ReferenceBackend

    model_dir = tiny_model_dir("llama")
    tokenizer = Tokenizer.from_dir(model_dir)
    prefilled: list[int] = []

    class CountingBackend(ReferenceBackend):
        def prefill(self, tokens):
            prefilled.append(len(tokens))
            return super().prefill(tokens)

    def answer(generator, messages):
        return run(generator, tokenizer.encode_chat(messages), max_tokens=8)[1]

    def fresh_answer(messages):
        return answer(Generator(ReferenceBackend(load_model(model_dir, max_seq_len=256)), tokenizer), messages)

    reused = Generator(CountingBackend(load_model(model_dir, max_seq_len=256)), tokenizer)
    first = [{"role": "user", "content": "Hello there!"}]
    history = first + [{"role": "assistant", "content": answer(reused, first).text}]
    second = history + [{"role": "user", "content": "How are you today?"}]
    edited = history + [{"role": "user", "content": "The capital of France?"}]  # the cache must rewind
    for messages in (second, edited):
        got = answer(reused, messages)
        assert prefilled[-1] <= len(tokenizer.encode_chat(messages)) - len(tokenizer.encode_chat(first))
        expected = fresh_answer(messages)
        assert (got.text, got.completion_tokens) == (expected.text, expected.completion_tokens)
