"""Sampling must match transformers' warpers exactly, draw reproducibly, and parse /set safely."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ffchat.errors import FfchatError
from ffchat.sampling import Choices, RecentTokens, Sampler, SamplingParams, apply_repetition_penalty, candidates, filter_logits


def random_logits(vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    """Peaky enough that top-p and min-p cut somewhere in the middle of the vocabulary."""
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * scale


def transformers_filter(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The same settings through transformers' own warpers, in generate()'s order."""
    warpers = []
    if params.temperature not in (0, 1):
        warpers.append(TemperatureLogitsWarper(float(params.temperature)))
    if params.top_k:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1:
        warpers.append(TopPLogitsWarper(params.top_p))
    if params.min_p:
        warpers.append(MinPLogitsWarper(params.min_p))
    scores = logits[None].clone()
    input_ids = torch.zeros(1, 1, dtype=torch.long)
    for warper in warpers:
        scores = warper(input_ids, scores)
    return scores[0]


FILTER_SETTINGS = [
    dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.0),  # Ollama's defaults
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),  # nothing filtered
    dict(temperature=0.6, top_k=20, top_p=0.95, min_p=0.0),  # Qwen3's
    dict(temperature=1.3, top_k=0, top_p=0.5, min_p=0.0),
    dict(temperature=0.7, top_k=0, top_p=1.0, min_p=0.1),
    dict(temperature=1.0, top_k=5, top_p=1.0, min_p=0.0),
    dict(temperature=0.5, top_k=100, top_p=0.8, min_p=0.05),
    dict(temperature=1.0, top_k=1, top_p=1.0, min_p=0.0),
    dict(temperature=1.0, top_k=0, top_p=0.0, min_p=0.0),  # top-p 0 still keeps one token
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=1.0),  # min-p 1 keeps only the best
    dict(temperature=2.0, top_k=50_000, top_p=0.99, min_p=0.0),  # k beyond the vocabulary
]


def candidate_filter(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """``candidates`` scattered back over the vocabulary, -inf where a token is not a candidate."""
    values, ids = candidates(logits, params)
    return torch.full_like(logits, -torch.inf).scatter(0, ids, values)


@pytest.mark.parametrize("settings", FILTER_SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("vocab", [17, 1000, 32000])
def test_filter_logits_matches_transformers_and_candidates_keep_the_same(settings, vocab):
    """The reference against transformers; the short sorted list sampling draws from against the reference."""
    params = SamplingParams(**settings)
    for seed in range(4):
        logits = random_logits(vocab, seed)
        ours = filter_logits(logits, params)
        theirs = transformers_filter(logits, params)
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), f"different tokens removed (seed {seed})"
        assert torch.equal(ours, theirs), f"different kept values (seed {seed})"
        assert torch.isfinite(ours).any()
        values, _ = candidates(logits, params)
        assert torch.equal(values, values.sort(descending=True).values), "candidates are not sorted"
        assert torch.equal(candidate_filter(logits, params), ours), f"candidates differ (seed {seed})"


def test_candidates_keep_ties_at_the_kth_place_as_transformers_does():
    """bf16 logits tie often: every token tied with the k-th stays, as in the reference (up to k of them)."""
    logits = torch.tensor([5.0, 4.0, 3.0, 3.0, 3.0, 1.0, 0.5, 0.0])
    params = SamplingParams(temperature=1.0, top_k=3, top_p=1.0)
    kept = torch.isfinite(candidate_filter(logits, params))
    assert kept.tolist() == [True] * 5 + [False] * 3
    assert torch.equal(kept, torch.isfinite(transformers_filter(logits, params)))


def test_filter_logits_really_filters():
    """Guard against a comparison that passes because neither side removes anything."""
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05)
    kept = torch.isfinite(filter_logits(random_logits(1000, 0), params)).sum().item()
    assert 1 < kept < 40


def test_top_p_boundary_is_inclusive():
    """Tokens whose tail mass is exactly 1 - top_p go, as in transformers (exact with four equal logits)."""
    logits = torch.zeros(4)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=0.5)
    kept = torch.isfinite(filter_logits(logits, params)).sum().item()
    assert kept == torch.isfinite(transformers_filter(logits, params)).sum().item() == 2


def test_filter_logits_is_pure():
    logits = random_logits(100, 1)
    before = logits.clone()
    filter_logits(logits, SamplingParams(top_k=3, top_p=0.5, min_p=0.2))
    assert torch.equal(logits, before)


@pytest.mark.parametrize("penalty", [1.1, 1.5, 0.8])
@pytest.mark.parametrize("last_n", [-1, 64, 5, 1])
def test_repetition_penalty_matches_transformers(penalty, last_n):
    logits = random_logits(300, 7)
    previous = torch.randint(0, 300, (200,), generator=torch.Generator().manual_seed(3)).tolist()
    previous += previous[-10:]  # repeats inside the window are penalized once
    params = SamplingParams(repeat_penalty=penalty, repeat_last_n=last_n)
    window = previous if last_n == -1 else previous[-last_n:]
    expected = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([window]), logits[None].clone())[0]
    assert torch.equal(penalized(logits, previous, params), expected)


def penalized(logits: torch.Tensor, previous: list[int], params: SamplingParams,
              picked: tuple[int, ...] = ()) -> torch.Tensor:
    """The penalty as a Sampler applies it: ``previous`` from the host, then ``picked`` as the device learns them."""
    recent = RecentTokens(params.repeat_last_n, logits.shape[-1], len(previous) + len(picked), logits.device)
    recent.reset(previous)
    for token in picked:
        recent.append(torch.tensor([token], device=logits.device))
    return apply_repetition_penalty(logits, recent.ids, params.repeat_penalty)


@pytest.mark.parametrize("last_n", [-1, 64, 5, 0])
def test_tokens_picked_on_the_device_join_the_window(last_n):
    """The ring of recent tokens wraps as picked tokens arrive: the window stays the last n (-1: all of them)."""
    logits = random_logits(300, 8)
    params = SamplingParams(repeat_penalty=1.3, repeat_last_n=last_n)
    history = torch.randint(0, 300, (150,), generator=torch.Generator().manual_seed(4)).tolist()
    prompt, picked = history[:40], tuple(history[40:])
    window = [] if last_n == 0 else history if last_n == -1 else history[-last_n:]
    expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([window]), logits[None].clone())[0] \
        if window else logits
    assert torch.equal(penalized(logits, prompt, params, picked), expected)


def test_prompt_ids_outside_the_vocabulary_are_not_penalized():
    logits = torch.tensor([2.0, -2.0, 2.0])
    params = SamplingParams(repeat_penalty=2.0, repeat_last_n=4)
    assert penalized(logits, [7, 1, -1, 2], params).tolist() == [2.0, -4.0, 1.0]


def test_repetition_penalty_off():
    logits = random_logits(50, 2)
    for params in (SamplingParams(repeat_penalty=1.0), SamplingParams(repeat_last_n=0)):
        assert torch.equal(penalized(logits, [1, 2, 3], params), logits)
    assert torch.equal(penalized(logits, [], SamplingParams()), logits)


def test_repetition_penalty_only_touches_the_window():
    logits = torch.tensor([2.0, -2.0, 2.0, -2.0])
    params = SamplingParams(repeat_penalty=2.0, repeat_last_n=2)
    assert penalized(logits, [0, 1, 2, 3, 1, 2], params).tolist() == [2.0, -4.0, 1.0, -2.0]
    assert logits.tolist() == [2.0, -2.0, 2.0, -2.0]


def test_greedy_is_argmax():
    sampler = Sampler(SamplingParams(temperature=0, repeat_penalty=1.0))
    for seed in range(5):
        logits = random_logits(1000, seed)
        assert sampler.pick(logits).values()[0] == int(logits.argmax())


def test_greedy_applies_the_repetition_penalty_first():
    logits = torch.tensor([0.0, 3.0, 2.5, 1.0])
    assert Sampler(SamplingParams(temperature=0, repeat_penalty=1.0), [1]).pick(logits).values()[0] == 1
    assert Sampler(SamplingParams(temperature=0, repeat_penalty=1.5), [1]).pick(logits).values()[0] == 2


# On CUDA the second pick captures the choice as a graph and later ones replay it: both paths are tested.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]


@pytest.mark.parametrize("device", DEVICES)
def test_a_picked_token_is_penalized_at_the_next_pick(device):
    """The device records its own picks: the second greedy pick avoids the first without the host telling it."""
    sampler = Sampler(SamplingParams(temperature=0, repeat_penalty=100.0, repeat_last_n=64))
    logits = torch.tensor([0.2, 3.0, 2.5, 1.0, 0.5], device=device)
    assert [sampler.pick(logits).values()[0] for _ in range(5)] == [1, 2, 3, 4, 0]


@pytest.mark.parametrize("device", DEVICES)
def test_a_later_answer_reuses_the_choice_and_starts_from_its_own_prompt(device):
    """Answers with the same settings share one Choice (on CUDA its graph): a later answer's tokens are a fresh
    sampler's, its penalty window holding its own prompt, not what the earlier answer saw or picked."""
    logits = random_logits(300, 9, scale=1.0).to(device)
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.95, repeat_penalty=3.0, repeat_last_n=16, seed=2)
    shared = Choices()

    def answer(prompt, choices=None):
        sampler = Sampler(params, prompt, capacity=64, choices=choices)
        return [sampler.pick(logits).values()[0] for _ in range(12)]

    answer([int(logits.argmax())] * 4, shared)
    top = logits.topk(3).indices.tolist()
    assert answer(top, shared) == answer(top)
    assert shared.get(params, 300, 64, logits.device) is shared.get(replace(params, seed=7), 300, 64, logits.device)
    assert shared.get(params, 300, 64, logits.device) is not shared.get(replace(params, top_k=5), 300, 64,
                                                                           logits.device)


def test_choices_keep_the_most_recent_setups():
    choices = Choices(most=2)
    first, second, third = (choices.get(SamplingParams(top_k=k), 10, 8, torch.device("cpu")) for k in (1, 2, 3))
    assert choices.get(SamplingParams(top_k=3), 10, 8, torch.device("cpu")) is third
    assert choices.get(SamplingParams(top_k=2), 10, 8, torch.device("cpu")) is second
    assert choices.get(SamplingParams(top_k=1), 10, 8, torch.device("cpu")) is not first  # evicted


def draws(params: SamplingParams, logits: torch.Tensor, count: int) -> list[int]:
    """``count`` picks from the same logits, the repetition penalty off so every draw sees them unchanged."""
    sampler = Sampler(replace(params, repeat_penalty=1.0))
    return [sampler.pick(logits).values()[0] for _ in range(count)]


def test_same_seed_same_tokens_other_seed_other_tokens():
    logits = random_logits(500, 4, scale=1.0)
    params = dict(temperature=1.0, top_k=0, top_p=1.0, repeat_penalty=1.0)
    first = draws(SamplingParams(seed=1234, **params), logits, 50)
    assert first == draws(SamplingParams(seed=1234, **params), logits, 50)
    assert first != draws(SamplingParams(seed=1235, **params), logits, 50)
    assert len(set(first)) > 10  # really sampling


def test_no_seed_is_random():
    logits = random_logits(500, 4, scale=1.0)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=None)
    assert draws(params, logits, 50) != draws(params, logits, 50)


@pytest.mark.parametrize("device", DEVICES)
def test_sampled_frequencies_follow_the_filtered_distribution(device):
    logits = torch.tensor([2.0, 1.6, 1.5, 0.9, 0.3, -0.5, -1.0, -3.0], device=device)
    params = SamplingParams(temperature=0.7, top_k=6, top_p=0.95, min_p=0.03, repeat_penalty=1.0, seed=7)
    expected = torch.softmax(filter_logits(logits, params), dim=-1).cpu()
    kept = expected > 0
    assert 2 < kept.sum() < 6  # the filters removed something and left a choice

    count = 20_000
    observed = torch.bincount(torch.tensor(draws(params, logits, count)), minlength=len(logits)).double()
    assert observed[~kept].sum() == 0, "drew a filtered token"
    expected_counts = expected[kept].double() * count
    chi_square = (((observed[kept] - expected_counts) ** 2) / expected_counts).sum().item()
    assert chi_square < 25  # df <= 5: p < 1e-3 for a correct sampler


def test_defaults_are_ollamas():
    params = SamplingParams()
    assert (params.temperature, params.top_k, params.top_p, params.min_p) == (0.8, 40, 0.9, 0.0)
    assert (params.repeat_penalty, params.repeat_last_n, params.seed, params.max_tokens, params.stop) == (
        1.1, 64, None, None, [],
    )


def test_generation_config_overlays_the_defaults():
    params = SamplingParams.from_generation_config(
        {"temperature": 0.6, "top_p": 0.95, "top_k": None, "repetition_penalty": 1.05, "min_p": 0, "eos_token_id": 2}
    )
    assert (params.temperature, params.top_p, params.top_k, params.repeat_penalty, params.min_p) == (
        0.6, 0.95, 40, 1.05, 0,
    )
    assert SamplingParams.from_generation_config({}) == SamplingParams()
    assert SamplingParams.from_generation_config(None) == SamplingParams()


def test_bad_generation_config_is_a_user_error():
    with pytest.raises(FfchatError, match="top_p"):
        SamplingParams.from_generation_config({"top_p": 1.5})


@pytest.mark.parametrize(
    "key, text, value",
    [
        ("temperature", "0.5", 0.5),
        ("temperature", "0", 0.0),
        ("top_k", "0", 0),
        ("top_k", "100", 100),
        ("top_p", "1", 1.0),
        ("min_p", "0.05", 0.05),
        ("repeat_penalty", "1.0", 1.0),
        ("repeat_last_n", "-1", -1),
        ("repeat_last_n", "0", 0),
        ("seed", "42", 42),
        ("seed", "none", None),
        ("max_tokens", "128", 128),
        ("max_tokens", "None", None),
    ],
)
def test_set_parses_values(key, text, value):
    params = SamplingParams(seed=1, max_tokens=5)
    params.set(key, text)
    assert getattr(params, key) == value
    assert type(getattr(params, key)) is type(value)


@pytest.mark.parametrize(
    "key, text",
    [
        ("temperature", "-0.1"),
        ("temperature", "warm"),
        ("temperature", "nan"),
        ("temperature", "inf"),
        ("top_k", "-1"),
        ("top_k", "4.5"),
        ("top_p", "1.01"),
        ("top_p", "-0.1"),
        ("min_p", "2"),
        ("repeat_penalty", "0"),
        ("repeat_last_n", "-2"),
        ("seed", "-1"),
        ("seed", "lucky"),
        ("max_tokens", "0"),
        ("max_tokens", "ten"),
        ("temprature", "0.5"),
        ("params", "x"),
    ],
)
def test_set_rejects_bad_input_and_changes_nothing(key, text):
    params = SamplingParams()
    with pytest.raises(FfchatError):
        params.set(key, text)
    assert params == SamplingParams()


def test_set_stop_appends_unescapes_and_clears():
    params = SamplingParams()
    params.set("stop", "###")
    params.set("stop", r"\n\nUser:")
    params.set("stop", r"C:\dir\\x")
    assert params.stop == ["###", "\n\nUser:", "C:\\dir\\x"]
    params.set("stop", "none")
    assert params.stop == []


def test_invalid_params_cannot_be_built():
    with pytest.raises(FfchatError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(FfchatError, match="stop"):
        SamplingParams(stop=[""])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampling_stays_on_the_gpu():
    """CUDA's division rounds differently from the CPU's, so the oracle runs on the GPU too."""
    logits = random_logits(32000, 5).cuda()
    params = SamplingParams(temperature=0.7, top_k=50, top_p=0.9, min_p=0.02, repeat_penalty=1.3, seed=3)
    filtered = filter_logits(logits, params)
    assert filtered.device == logits.device
    assert torch.equal(filtered, transformers_filter(logits, params))
    previous = list(range(0, 3000, 7))
    expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([previous[-64:]]).cuda(), logits[None].clone())[0]
    assert torch.equal(penalized(logits, previous, params), expected)
    assert draws(params, logits, 30) == draws(params, logits, 30)
    assert Sampler(SamplingParams(temperature=0)).pick(logits).values()[0] == int(logits.argmax())
    assert torch.equal(candidate_filter(logits, params), filtered)
