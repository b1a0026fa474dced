"""Activation-weighted INT4 fitting (``wmse``): per group, the scale and zero that minimise
sum_k a_k (W[n, k] - dequantized[n, k])**2, with a_k the mean square of input k.

Why weighted: a layer's output error is (W - W_q) x, so an error on an input
channel that carries large activations (the LM head's input has a few channels
100x the median) costs far more than the same error elsewhere. Measured on
SmolLM2, minimising the plain squared error (clipping, HQQ) lowers the
Frobenius error yet raises perplexity, while this weighting lowers both.

Per group, for each clip factor c (the [min, max] range shrunk to c times):
start from that range's scale and zero, then alternate
1. codes q = round(W / s + z), clamped to 0..15;
2. the weighted least-squares line W ~ s * q + b through those codes
   (s rounded to fp16 first, then the best zero z = -b / s for it, rounded);
keeping, per group, the stored (fp16) scale and zero with the lowest weighted
error seen. c = 1 is round-to-nearest's start, so the result is never worse
than ``rtn`` in the weighted error (nor, without statistics, in Frobenius norm).
Every step is elementwise or a per-group sum: no matrix products, no solver.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ffchat.quantize.rtn import LEVELS, MIN_SCALE, MIN_SCALE_PER_MAGNITUDE, grouped

CLIP_FACTORS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
REFITS = 4
# Channels the calibration never saw still count a little, so no group's weights sum to zero.
MIN_RELATIVE_IMPORTANCE = 1e-3


def quantize_wmse(
    w: torch.Tensor, group_size: int, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize W [N, K] -> (q uint8 [N, K], scales fp16 [N, K // G], zeros fp16 [N, K // G]).

    ``importance`` [K]: each input's mean square activation (``quantize.calibrate``);
    None weighs every input alike (plain squared error).
    """
    groups = grouped(w, group_size)
    weights = _group_weights(importance, groups)
    fit = _Fit(groups, weights)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    best = None
    for factor in CLIP_FACTORS:
        scale = fit.stored_scale((high - low) * (factor / LEVELS))
        zero = (-low * factor / scale).half().float()
        candidate = fit.evaluate(scale, zero)
        for _ in range(REFITS):
            candidate = _better(candidate, fit.evaluate(*fit.refit(candidate)))
        best = candidate if best is None else _better(best, candidate)
    return best.codes.to(torch.uint8).reshape(w.shape), best.scale.half(), best.zero.half()


def _group_weights(importance: torch.Tensor | None, groups: torch.Tensor) -> torch.Tensor:
    """Per-element error weights [1, K // G, G] (mean 1), or all ones."""
    _, n_groups, size = groups.shape
    if importance is None:
        return torch.ones(1, n_groups, size, device=groups.device)
    importance = importance.to(device=groups.device, dtype=torch.float32)
    mean = importance.mean()
    if not bool(mean > 0) or not bool(torch.isfinite(mean)):
        return torch.ones(1, n_groups, size, device=groups.device)
    return (importance / mean).clamp_min(MIN_RELATIVE_IMPORTANCE).view(1, n_groups, size)


class _Candidate(NamedTuple):
    """Per group: stored scale and zero (fp16 values in fp32), their nearest codes, the weighted error."""

    scale: torch.Tensor  # [N, K // G]
    zero: torch.Tensor  # [N, K // G]
    codes: torch.Tensor  # [N, K // G, G]
    error: torch.Tensor  # [N, K // G]


class _Fit:
    """One chunk's groups and error weights, with the per-group sums every refit reuses."""

    def __init__(self, groups: torch.Tensor, weights: torch.Tensor):
        self.groups, self.weights = groups, weights
        self.total = weights.sum(dim=-1)  # [1, groups]
        self.weighted_mean = (weights * groups).sum(dim=-1) / self.total
        magnitude = groups.abs().amax(dim=-1)
        self.floor = (magnitude * MIN_SCALE_PER_MAGNITUDE).clamp_min(MIN_SCALE)

    def stored_scale(self, scale: torch.Tensor) -> torch.Tensor:
        """The scale as stored: at least the floor rtn uses (keeps |zero| <= 256), rounded to fp16."""
        return torch.maximum(scale, self.floor).half().float()

    def evaluate(self, scale: torch.Tensor, zero: torch.Tensor) -> _Candidate:
        """The nearest codes for a stored scale and zero, and their weighted squared error."""
        q = (self.groups / scale.unsqueeze(-1) + zero.unsqueeze(-1)).round_().clamp_(0, LEVELS)
        error = (q - zero.unsqueeze(-1)).mul_(scale.unsqueeze(-1)).sub_(self.groups).square_().mul_(self.weights)
        return _Candidate(scale, zero, q, error.sum(dim=-1))

    def refit(self, candidate: _Candidate) -> tuple[torch.Tensor, torch.Tensor]:
        """The weighted least-squares (scale, zero) for the candidate's codes, as stored in fp16."""
        scale, q = candidate.scale, candidate.codes
        code_mean = (self.weights * q).sum(dim=-1) / self.total
        centred = q - code_mean.unsqueeze(-1)
        variance = (self.weights * centred.square()).sum(dim=-1)
        covariance = (self.weights * centred * self.groups).sum(dim=-1)
        fitted = covariance / variance
        usable = (variance > 0) & torch.isfinite(fitted) & (fitted > 0)
        scale = self.stored_scale(torch.where(usable, fitted, scale))
        zero = (code_mean - self.weighted_mean / scale).half().float()
        return scale, zero


def _better(old: _Candidate, new: _Candidate) -> _Candidate:
    """Per group, whichever of two candidates has the lower weighted error (the old one on a tie)."""
    take = new.error < old.error
    return _Candidate(
        torch.where(take, new.scale, old.scale),
        torch.where(take, new.zero, old.zero),
        torch.where(take.unsqueeze(-1), new.codes, old.codes),
        torch.where(take, new.error, old.error),
    )
