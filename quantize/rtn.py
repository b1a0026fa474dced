"""Round-to-nearest INT4: per-group min/max, the baseline every method must beat.

Scale and zero are rounded to float16 *before* the codes are chosen, so the
codes are the nearest ones for the values the kernels will actually read and
the error bound |W - (q - z) * s| <= s / 2 holds for the stored artifact.
"""

from __future__ import annotations

import torch

LEVELS = 15  # codes 0..15
# fp16's smallest normal number: smaller scales would lose relative precision.
MIN_SCALE = 2.0**-14
# A scale of at least max|w| / 256 keeps |zero| <= 256, where fp16 still
# resolves quarters, so rounding the zero cannot push a code out of 0..15.
MIN_SCALE_PER_MAGNITUDE = 1.0 / 256


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """View W [N, K] as fp32 groups [N, K // G, G] on W's device."""
    n, k = w.shape
    if group_size % 8 or k % group_size:
        raise ValueError(f"group size {group_size} must be a multiple of 8 dividing K={k}")
    return w.float().reshape(n, k // group_size, group_size)


def minmax_params(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, zero) mapping [min, max] onto [0, 15], both exactly fp16-representable (as fp32)."""
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    floor = torch.maximum(low.abs(), high.abs()) * MIN_SCALE_PER_MAGNITUDE
    scale = torch.maximum((high - low) / LEVELS, floor).clamp_min(MIN_SCALE)
    scale = scale.half().float()
    zero = (-low / scale).half().float()
    return scale, zero


def codes(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Nearest codes round(W / s + z) clamped to 0..15, as fp32 groups."""
    return (groups / scale.unsqueeze(-1) + zero.unsqueeze(-1)).round_().clamp_(0, LEVELS)


def quantize_rtn(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize W [N, K] -> (q uint8 [N, K], scales fp16 [N, K // G], zeros fp16 [N, K // G])."""
    groups = grouped(w, group_size)
    scale, zero = minmax_params(groups)
    q = codes(groups, scale, zero)
    return q.to(torch.uint8).reshape(w.shape), scale.half(), zero.half()
