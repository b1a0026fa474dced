"""Half-quadratic INT4 quantization (after Badri & Shaji 2023, "Half-Quadratic Quantization").

Scales stay at the per-group min/max step; the zero points are optimised,
without calibration data, for a sparsity-promoting lp loss (p = 1/2) on the
reconstruction error. Half-quadratic splitting introduces an auxiliary error
variable E and alternates two cheap steps:

1. E <- shrink_p(W - W_r): lp shrinkage of the current error, which keeps
   the large (outlier) part of each error and drops the small part;
2. z <- mean_group(q - (W - E) / s): the closed-form zero that fits what the
   shrinkage dropped, followed by re-rounding the codes q = round(W / s + z).

p = 1/2 makes |e|**(p-1) one rsqrt instead of a pow (which dominated the run
time) and measured as good as the paper's p = 0.7. Everything runs in units
of the group's step s (x = W / s), so the shrinkage threshold means the same
thing for any model's weight magnitude. Zeros are rounded to fp16 at every
step, and each group keeps the zero with the lowest squared error seen (the
min/max zero included), so the stored result is never worse than
round-to-nearest in Frobenius norm.
"""

from __future__ import annotations

import torch

from ffchat.quantize.rtn import LEVELS, codes, grouped, minmax_params

ITERATIONS = 20
BETA = 10.0  # shrinkage strength; errors above beta ** (-2 / 3) ~ 0.2 steps are partly kept
BETA_GROWTH = 1.01


def quantize_hqq(
    w: torch.Tensor,
    group_size: int,
    *,
    iterations: int = ITERATIONS,
    beta: float = BETA,
    beta_growth: float = BETA_GROWTH,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize W [N, K] -> (q uint8 [N, K], scales fp16 [N, K // G], zeros fp16 [N, K // G]), fp32 on W's device."""
    groups = grouped(w, group_size)
    scale, zero = minmax_params(groups)
    x = groups / scale.unsqueeze(-1)
    error = _residual(x, zero)
    best_zero, best_norm = zero, torch.linalg.vector_norm(error, dim=-1)
    for _ in range(iterations):
        zero = (zero + _zero_step(error, beta)).half().float()
        beta *= beta_growth
        error = _residual(x, zero)
        norm = torch.linalg.vector_norm(error, dim=-1)
        best_zero = torch.where(norm < best_norm, zero, best_zero)
        best_norm = torch.minimum(norm, best_norm)
    q = codes(groups, scale, best_zero)
    return q.to(torch.uint8).reshape(w.shape), scale.half(), best_zero.half()


def _residual(x: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """W / s - (q - z) for the nearest codes q, in units of the step."""
    shifted = x + zero.unsqueeze(-1)
    q = shifted.round().clamp_(0, LEVELS)
    return torch.sub(shifted, q, out=q)


def _zero_step(error: torch.Tensor, beta: float) -> torch.Tensor:
    """The zero update mean(shrink(e) - e) of half-quadratic splitting, for p = 1/2.

    shrink(e) = sign(e) * max(|e| - |e|**(p-1) / beta, 0), hence
    shrink(e) - e = -sign(e) * min(|e|, |e|**(p-1) / beta): small errors
    count fully (a least-squares step), large ones with a decaying weight.
    """
    magnitude = error.abs()
    pull = magnitude.rsqrt().mul_(1.0 / beta)
    torch.minimum(magnitude, pull, out=pull)
    return -pull.copysign_(error).mean(dim=-1)
