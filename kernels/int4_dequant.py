"""Dequantize a whole INT4 weight (layout v1) into a dense [N, K] buffer, for GPU prefill.

Prefill multiplies T tokens at once, so it pays to expand the weight once into a reusable
scratch buffer (``out`` may be a view of it) and let a dense matmul do the rest.

Reads the version-1 layout of ``ffchat.quantize.layout``: ``qweight`` int32 [N, K // 8] (word j
of a row holds k = 8j..8j+7, element 8j+i at bit ``8 * (i % 4) + 4 * (i // 4)``), fp16
``scales`` and ``zeros`` [N, K // G], W = (q - z) * s.

Why it looks the way it does (the kernel is a streaming copy that grows each byte into four):

* Results equal ``ffchat.quantize.layout.dequantize`` bit for bit: the same fp32 operations
  (``(q - z) * s``, q converted exactly, no fused multiply-add possible) and one
  round-to-nearest-even cast to the output dtype.
* Each program owns a [BLOCK_N rows, BLOCK_K inputs] tile, held as [rows, groups, words of a
  group]: the words of a row are contiguous (16-byte loads), a group's scale and zero broadcast
  over its words in registers, and the 8 nibble planes are joined back in k order in registers,
  so every thread stores its 8 * words consecutive outputs as wide stores.
* Row blocks run along grid axis 0 (no 65535 limit), K blocks along axis 1; offsets are int64,
  so an LM head of more than 2^31 elements is fine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ffchat.kernels.interpreter import interpreted
from ffchat.quantize.layout import check_packed, dequantize


@dataclass(frozen=True)
class DequantConfig:
    """Tile of BLOCK_N rows x BLOCK_K inputs per program (powers of two, BLOCK_K a multiple of G)."""

    block_n: int = 16
    block_k: int = 512
    num_warps: int = 4


def pick_config(n: int, k: int, group_size: int, base: DequantConfig = DequantConfig()) -> DequantConfig:
    """``base`` shrunk so a block never exceeds the problem, BLOCK_K at least one group."""
    block_k = max(group_size, min(base.block_k, triton.next_power_of_2(k)))
    block_n = min(base.block_n, triton.next_power_of_2(n))
    return DequantConfig(block_n, block_k, base.num_warps)


@triton.jit
def _codes(w, SHIFT: tl.constexpr):
    """The nibble at bit SHIFT of each word as fp32 (masked after the arithmetic shift, so exact)."""
    return ((w >> SHIFT) & 0xF).to(tl.float32)


@triton.jit
def _round_to_bf16(x):
    """fp32 -> bf16 round-to-nearest-even with integer ops (the interpreter's own cast truncates)."""
    bits = x.to(tl.int32, bitcast=True)
    bits += 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _int4_dequant_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr, N, K,
    G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, W_ALIGN: tl.constexpr, EVEN: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    GROUPS: tl.constexpr = BLOCK_K // G  # groups per tile row
    WORDS: tl.constexpr = G // 8  # int32 words per group
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows64 = rows.to(tl.int64)
    grp = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    word = tl.arange(0, WORDS)
    groups_per_row = K // G
    w_offs = (rows64[:, None, None] * tl.multiple_of(K // 8, W_ALIGN)
              + (grp * WORDS)[None, :, None] + word[None, None, :])
    sz_offs = rows64[:, None] * groups_per_row + grp[None, :]
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    out_offs = rows64[:, None] * K + cols[None, :]
    if EVEN:
        w = tl.load(w_ptr + w_offs, eviction_policy="evict_first")
        s = tl.load(s_ptr + sz_offs)
        z = tl.load(z_ptr + sz_offs)
    else:
        ok = (rows < N)[:, None] & (grp < groups_per_row)[None, :]
        w = tl.load(w_ptr + w_offs, mask=ok[:, :, None], other=0, eviction_policy="evict_first")
        s = tl.load(s_ptr + sz_offs, mask=ok, other=0.0)
        z = tl.load(z_ptr + sz_offs, mask=ok, other=0.0)
    s = s.to(tl.float32)[:, :, None]
    z = z.to(tl.float32)[:, :, None]
    # Plane i holds element 8j + i of every word j; join them back so the last axis is i.
    even = tl.join(tl.join((_codes(w, 0) - z) * s, (_codes(w, 4) - z) * s),
                   tl.join((_codes(w, 16) - z) * s, (_codes(w, 20) - z) * s))  # i = 0, 4 | 2, 6
    odd = tl.join(tl.join((_codes(w, 8) - z) * s, (_codes(w, 12) - z) * s),
                  tl.join((_codes(w, 24) - z) * s, (_codes(w, 28) - z) * s))  # i = 1, 5 | 3, 7
    tile = tl.reshape(tl.join(even, odd), (BLOCK_N, BLOCK_K))
    if SOFT_BF16:
        tile = _round_to_bf16(tile)
    else:
        tile = tile.to(out_ptr.dtype.element_ty)  # compiled: cvt.rn, round to nearest even
    if EVEN:
        tl.store(out_ptr + out_offs, tile)
    else:
        tl.store(out_ptr + out_offs, tile, mask=(rows < N)[:, None] & (cols < K)[None, :])


def dequantize_int4(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    *,
    out: torch.Tensor | None = None,
    dtype: torch.dtype = torch.bfloat16,
    config: DequantConfig | None = None,
) -> torch.Tensor:
    """W [N, K] = (q - z) * s, equal to ``ffchat.quantize.layout.dequantize(..., dtype)`` bit for bit.

    ``out`` (contiguous [N, K], e.g. ``scratch[:N * K].view(N, K)``) decides the dtype when given;
    fp16, bf16 and fp32 are supported. ``config`` overrides the tile sizes.
    """
    n, k = check_packed(qweight, scales, zeros, group_size)
    if out is None:
        out = torch.empty((n, k), dtype=dtype, device=qweight.device)
    if tuple(out.shape) != (n, k) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{n}, {k}] tensor, got {tuple(out.shape)}")
    if out.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"out must be fp16/bf16/fp32, got {out.dtype}")
    if any(t.device != qweight.device for t in (scales, zeros, out)):
        raise ValueError("all tensors must be on one device")
    if n == 0 or k == 0:
        return out
    cfg = pick_config(n, k, group_size, config or DequantConfig())
    if cfg.block_k % group_size or cfg.block_k & (cfg.block_k - 1) or cfg.block_n & (cfg.block_n - 1):
        raise ValueError(f"tile {cfg.block_n}x{cfg.block_k} must be powers of two, BLOCK_K a multiple of G")
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(k, cfg.block_k))
    _int4_dequant_kernel[grid](
        qweight.contiguous(), scales.contiguous(), zeros.contiguous(), out, n, k,
        G=group_size, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        W_ALIGN=4 if (k // 8) % 4 == 0 else 1,
        EVEN=(n % cfg.block_n == 0 and k % cfg.block_k == 0),
        SOFT_BF16=out.dtype == torch.bfloat16 and interpreted(_int4_dequant_kernel),
        num_warps=cfg.num_warps,
    )
    return out


def dequantize_int4_reference(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    *,
    out: torch.Tensor | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Plain torch: ``ffchat.quantize.layout.dequantize`` (fp32, then one cast), written into ``out`` if given."""
    w = dequantize(qweight, scales, zeros, group_size, dtype=out.dtype if out is not None else dtype)
    return w if out is None else out.copy_(w)
