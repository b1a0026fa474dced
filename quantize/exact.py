"""Affine 4-bit blocks (llama.cpp's Q4_0 / Q4_1, groups of 32) written into layout v1 without re-fitting.

A block stores w = d * q + m with codes q in 0..15. Layout v1 stores
w = (q - z) * s, so s = d and z = -m / d keep the very same codes (Q4_0:
m = -8 d, so z = 8 exactly). Only z's rounding to fp16 can move a weight, by
|z - fp16(z)| * d; for |z| < 32 that is at most 2**-7 of a step. A negative d
(Q4_0's sign follows the block's largest weight) flips the codes, q' = 15 - q,
with s = -d and z' = 15 - z, so stored scales stay positive. A block with
d = 0 holds one value m, stored as code 0 with s = |m| and z = -sign(m).
"""

from __future__ import annotations

import torch

from ffchat.quantize.layout import pack_int4
from ffchat.quantize.rtn import LEVELS

BLOCK_SIZE = 32


def affine_blocks_to_layout(
    q: torch.Tensor, d: torch.Tensor, m: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes q [N, K] (0..15), scales d and mins m [N, K // 32] -> (qweight, scales, zeros) for group size 32."""
    d64, m64 = d.double(), m.double()
    flip = d64 < 0
    constant = d64 == 0
    scale = torch.where(flip, -d64, d64)
    zero = torch.where(constant, torch.zeros_like(m64), -m64 / torch.where(constant, 1.0, d64))
    zero = torch.where(flip, LEVELS - zero, zero)
    # d = 0: the block is m everywhere; code 0 with s = |m|, z = -sign(m) gives (0 - z) * s = m.
    scale = torch.where(constant, m64.abs(), scale)
    zero = torch.where(constant, -torch.sign(m64), zero)
    n, k = q.shape
    codes = q.view(n, k // BLOCK_SIZE, BLOCK_SIZE)
    codes = torch.where(flip.unsqueeze(-1), LEVELS - codes, codes)
    codes = torch.where(constant.unsqueeze(-1), torch.zeros_like(codes), codes)
    return pack_int4(codes.reshape(n, k)), scale.half(), zero.half()
