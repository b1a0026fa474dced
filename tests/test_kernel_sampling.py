"""The sampling kernels against their torch references: ``candidates`` + ``draw`` and ``apply_repetition_penalty``.

Triton interpreter on the CPU, compiled on a GPU (``pytest -m "gpu or not gpu"`` there). Random
logits have no ties, so the kernel's draw must name the very token the reference draws for the
same uniform number; with ties only the order of tied tokens may differ, so there the drawable
set is compared.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ffchat.kernels import sampling as kernels  # noqa: E402
from ffchat.sampling import SamplingParams, apply_repetition_penalty, candidates, draw, filter_logits  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
UNIFORMS = (0.0, 0.31, 0.77, 0.999)


def random_logits(vocab: int, seed: int) -> torch.Tensor:
    return (torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 3).to(DEVICE)


def kernel_token(logits, u, params, **ring):
    uniform = torch.tensor([u], device=DEVICE)
    return int(kernels.sample_top_k(logits, uniform, top_k=params.top_k, temperature=params.temperature,
                                    top_p=params.top_p, min_p=params.min_p, **ring))


def reference_token(logits, u, params):
    values, ids = candidates(logits, params)
    return int(ids[draw(values, torch.tensor([u], device=DEVICE))])


@pytest.mark.parametrize("params", [
    SamplingParams(),  # Ollama's defaults: top-k 40, top-p 0.9
    SamplingParams(temperature=1.3, top_k=5, top_p=1.0, min_p=0.05),
    SamplingParams(temperature=0.5, top_k=128, top_p=0.95),
    SamplingParams(temperature=2.0, top_k=1),
], ids=["ollama", "min-p", "k128", "k1"])
def test_draws_the_references_token(params):
    logits = random_logits(300, seed=params.top_k)
    for u in UNIFORMS:
        assert kernel_token(logits, u, params) == reference_token(logits, u, params), f"uniform {u}"


def test_a_vocabulary_smaller_than_the_candidates():
    """8 tokens, top-k 6: the 16 candidate slots are mostly padding, which no draw may reach."""
    logits = torch.tensor([2.0, 1.6, 1.5, 0.9, 0.3, -0.5, -1.0, -3.0], device=DEVICE)
    params = SamplingParams(temperature=0.7, top_k=6, top_p=0.95, min_p=0.03)
    for u in UNIFORMS:
        assert kernel_token(logits, u, params) == reference_token(logits, u, params), f"uniform {u}"


def test_chunks_of_the_vocabulary_merge(monkeypatch):
    """Several first-pass programs (chunks of 256 here): the best candidates may sit in any of them."""
    monkeypatch.setattr(kernels, "CHUNK", 256)
    logits = random_logits(1000, seed=3)
    top = logits.max()
    logits[0], logits[999] = top + 1.0, top + 1.5  # the best two at the ends: in the first and the last chunk
    params = SamplingParams(top_k=20, top_p=0.99)
    for u in UNIFORMS:
        assert kernel_token(logits, u, params) == reference_token(logits, u, params), f"uniform {u}"


def test_ties_at_the_kth_place_stay_drawable():
    """As transformers, tokens tied with the k-th stay: here 5 for k = 3, which the 2k = 6 candidates of
    ``candidates`` could not all hold; the kernel's K2 = 8 can (it keeps up to K2 - k + 1 ties)."""
    logits = torch.tensor([5.0, 4.0] + [3.0] * 5 + [1.0] * 20, device=DEVICE)
    params = SamplingParams(temperature=1.0, top_k=3, top_p=1.0)
    kept = set(torch.isfinite(filter_logits(logits, params)).nonzero().flatten().tolist())
    drawn = {kernel_token(logits, u / 100, params) for u in range(100)}
    assert kept == set(range(7)) and drawn == kept


def test_merge_passes_keep_the_best(monkeypatch):
    """Chunks and merges of 64 keys: 1000 tokens take three merge passes (512 keys, 256, 128, 64) before the choice."""
    monkeypatch.setattr(kernels, "CHUNK", 64)
    monkeypatch.setattr(kernels, "MERGE", 64)
    logits = random_logits(1000, seed=5)
    params = SamplingParams(top_k=10, top_p=0.99)  # K2 = 32
    for u in UNIFORMS:
        assert kernel_token(logits, u, params) == reference_token(logits, u, params), f"uniform {u}"


def test_the_token_joins_the_recent_ring():
    vocab = 300
    ring = torch.full((4,), vocab, dtype=torch.long, device=DEVICE)
    count = torch.tensor(5, device=DEVICE)  # the next slot is 5 % 4
    token = kernel_token(random_logits(vocab, 1), 0.4, SamplingParams(), ring=ring, count=count)
    assert ring.tolist() == [vocab, token, vocab, vocab] and int(count) == 6


def test_penalty_in_place_matches_the_reference_with_repeats_and_empty_slots(monkeypatch):
    """Ids repeat across chunks of the window (chunks of 4 here): each token is still penalized once."""
    monkeypatch.setattr(kernels, "PENALTY_BLOCK", 4)
    vocab = 50
    logits = random_logits(vocab, 2)
    ids = torch.tensor([3, 7, 7, vocab, 10, 3, vocab, 42, 10, 3], device=DEVICE)
    want = apply_repetition_penalty(logits, ids, 1.3)
    kernels.penalize_recent(logits, ids, 1.3)
    assert torch.equal(logits, want)


def test_settings_outside_the_kernel_are_refused():
    logits = random_logits(300, 0)
    uniform = torch.zeros(1, device=DEVICE)
    for top_k, temperature in ((0, 1.0), (kernels.MOST_TOP_K + 1, 1.0), (300, 1.0), (40, 0.0)):
        with pytest.raises(ValueError):
            kernels.sample_top_k(logits, uniform, top_k=top_k, temperature=temperature, top_p=1.0, min_p=0.0)
