"""Sliding-window perplexity against a direct computation."""

import math

import pytest
import torch
import torch.nn.functional as F

from ffchat.errors import FfchatError
from ffchat.perplexity import perplexity


def bigram_forward(table):
    """A 'model' whose logits depend only on the current token: context length cannot matter."""
    return lambda ids, start_pos: table[ids]


@pytest.mark.parametrize("window,stride", [(8, 8), (8, 3), (16, 16), (64, 64)])
def test_matches_direct_computation_when_context_does_not_matter(window, stride):
    torch.manual_seed(0)
    table = torch.randn(50, 50)
    tokens = torch.randint(0, 50, (41,)).tolist()
    ids = torch.tensor(tokens)
    nll = F.cross_entropy(table[ids[:-1]], ids[1:], reduction="none")
    if stride == window:  # the first token of each later window has no context and is skipped
        skipped = {p for p in range(window, len(tokens), window)}
        nll = torch.stack([v for i, v in enumerate(nll) if i + 1 not in skipped])
    expected = math.exp(nll.mean().item())
    assert perplexity(bigram_forward(table), tokens, window=window, stride=stride) == pytest.approx(expected, rel=1e-5)


def test_each_window_starts_from_a_fresh_cache():
    starts = []

    def forward(ids, start_pos):
        starts.append(start_pos)
        return torch.zeros(len(ids), 10)

    value = perplexity(forward, list(range(10)) * 3, window=8, stride=4)
    assert value == pytest.approx(10.0)  # uniform logits over 10 tokens
    assert set(starts) == {0} and len(starts) >= 6


def test_too_short_text_is_an_error():
    with pytest.raises(FfchatError):
        perplexity(lambda ids, s: torch.zeros(len(ids), 4), [1], window=4, stride=4)
