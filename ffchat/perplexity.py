"""Perplexity over a text with a sliding window: the measure of what quantization costs.

Each window of ``window`` tokens is scored from a fresh cache, and only the
tokens a previous window did not score count, so each scored token is
predicted from at least ``window - stride`` tokens of real context (with
``stride == window`` the first token of each window has none and is skipped).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from ffchat.errors import FfchatError


def perplexity(
    forward: Callable[[torch.Tensor, int], torch.Tensor],
    tokens: list[int],
    *,
    window: int,
    stride: int,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> float:
    """exp(mean negative log-likelihood) of ``tokens[1:]``; ``forward(ids, start_pos)`` returns logits [T, vocab]."""
    if len(tokens) < 2:
        raise FfchatError("the text is too short to measure perplexity (fewer than 2 tokens)")
    if not 0 < stride <= window:
        raise FfchatError(f"--stride must be between 1 and the window ({window})")
    ids = torch.tensor(tokens, dtype=torch.long)
    total_nll, counted, scored, begin = 0.0, 0, 0, 0
    while scored < len(tokens) - 1:
        end = min(begin + window, len(tokens))
        first_new = max(scored + 1, begin + 1)  # first target not scored yet
        logits = forward(ids[begin:end], 0)
        predictions = logits[first_new - begin - 1 : end - begin - 1].float()
        targets = ids[first_new:end].to(predictions.device)
        total_nll += F.cross_entropy(predictions, targets, reduction="sum").item()
        counted += len(targets)
        scored = end - 1
        progress(scored, len(tokens) - 1)
        begin += stride
    return math.exp(total_nll / counted)
