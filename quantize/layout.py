"""The INT4 weight layout (version 1) that every ffchat kernel reads.

A linear weight W [N, K] (out, in) becomes, per row n and group g of G
consecutive inputs, 4-bit codes q in 0..15 with W ~ (q - z) * s:

* ``qweight`` int32 [N, K // 8]: word j of row n holds k = 8j..8j+7; its byte b
  (0..3, little-endian bit order: bits 8b..8b+7) is ``q[8j+b] | q[8j+4+b] << 4``.
  So ``w & 0x0F0F0F0F`` gives elements 8j..8j+3 as four bytes and
  ``(w >> 4) & 0x0F0F0F0F`` gives 8j+4..8j+7: a dp4a (W4A8) kernel multiplies
  them against four consecutive int8 activations as they are, and a W4A16
  kernel unpacks with two shifts and masks.
* ``scales`` and ``zeros`` float16 [N, K // G]; zeros may be fractional.

Words are defined by value (bit positions), not by memory bytes, so packing
does not depend on the host's endianness. See quantize/README.md.
"""

from __future__ import annotations

import torch

from ffchat.errors import FfchatError

LAYOUT_VERSION = 1
NIBBLES_PER_WORD = 8
GROUP_SIZE_FALLBACKS = (128, 64, 32, 16, 8)

# Bit offset of element 8j+i inside word j, for i = 0..7: the low nibbles of
# bytes 0..3 hold i = 0..3, the high nibbles hold i = 4..7.
_SHIFTS = (0, 8, 16, 24, 4, 12, 20, 28)


def _shifts(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(_SHIFTS, device=device, dtype=dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack codes q [N, K] (integers 0..15, K a multiple of 8) into int32 [N, K // 8].

    The word is assembled in int64, where bit 31 is an ordinary bit, then folded
    to the int32 with the same 32 bits (values >= 2**31 become negative): byte 3's
    high nibble (element 8j+7) is the sign bit, so a plain int32 shift would overflow.
    """
    n, k = q.shape
    if k % NIBBLES_PER_WORD:
        raise ValueError(f"K={k} is not a multiple of {NIBBLES_PER_WORD}")
    q64 = q.to(torch.int64)
    if q64.numel() and (q64.min() < 0 or q64.max() > 15):
        raise ValueError("INT4 codes must lie in 0..15")
    words = (q64.view(n, k // 8, 8) << _shifts(q.device, torch.int64)).sum(dim=-1)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """Unpack int32 [N, K // 8] into uint8 codes [N, K] (arithmetic shifts are masked, so the sign is harmless)."""
    n, words = qweight.shape
    nibbles = (qweight.unsqueeze(-1) >> _shifts(qweight.device, torch.int32)) & 0xF
    return nibbles.reshape(n, words * NIBBLES_PER_WORD).to(torch.uint8)


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Rebuild W [N, K] = (q - z) * s per group, computed in fp32 and returned as ``dtype``."""
    q = unpack_int4(qweight).float()
    n, k = q.shape
    groups = q.view(n, k // group_size, group_size)
    w = (groups - zeros.float().unsqueeze(-1)) * scales.float().unsqueeze(-1)
    return w.view(n, k).to(dtype)


def check_packed(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> tuple[int, int]:
    """(N, K) of a layout-v1 weight, or ValueError naming what a kernel launcher was handed wrong."""
    if qweight.dim() != 2 or qweight.dtype != torch.int32:
        raise ValueError(f"qweight must be int32 [N, K // 8], got {tuple(qweight.shape)} {qweight.dtype}")
    n, k = qweight.shape[0], qweight.shape[1] * NIBBLES_PER_WORD
    if group_size < 8 or group_size & (group_size - 1) or k % group_size:
        raise ValueError(f"group size {group_size} must be a power of two >= 8 dividing K={k}")
    for name, t in (("scales", scales), ("zeros", zeros)):
        if tuple(t.shape) != (n, k // group_size):
            raise ValueError(f"{name} must be [{n}, {k // group_size}], got {tuple(t.shape)}")
    return n, k


def choose_group_size(k: int, preferred: int = 128) -> int:
    """The largest group size <= ``preferred`` from 128, 64, 32, 16, 8 that divides K.

    Groups must tile K exactly (kernels never straddle a row end) and be whole
    int32 words; SmolLM2's hidden 576, for example, gets 64.
    """
    if preferred % NIBBLES_PER_WORD or preferred <= 0:
        raise FfchatError(f"group size {preferred} is not a positive multiple of {NIBBLES_PER_WORD}")
    candidates = [preferred] + [g for g in GROUP_SIZE_FALLBACKS if g < preferred]
    for group in candidates:
        if k % group == 0:
            return group
    raise FfchatError(
        f"cannot quantize a weight with {k} inputs to INT4: {k} is not a multiple of {NIBBLES_PER_WORD}",
        hint="keep this model in fp16/bf16",
    )
