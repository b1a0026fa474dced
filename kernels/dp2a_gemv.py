"""Batch-1 INT4 GEMV on the integer dot-product units: int16 activations, ``dp2a`` products.

The W4A16 kernel (``ffchat.kernels.int4_gemv``) turns every nibble into a float and spends
about four instructions per weight: on Hopper it runs out of issue slots long before memory
bandwidth. Here x is turned into int16 codes once per group of G inputs, with a power-of-two
scale, and each ``dp2a`` multiplies two 16-bit codes by two weight bytes and adds both products
to an int32: a word of 8 nibbles costs two masks, one shift and four ``dp2a``.

Why int16 and a power-of-two scale: x (fp16 or bf16, 11 or 8 significant bits) divided by
a power of two is exact, and every element within 2^4 (fp16) or 2^7 (bf16) of the group's
largest keeps all its bits; smaller ones are rounded by at most 2^-16 of the group's largest.
So this computes what the W4A16 kernel computes, to ~1e-5, unlike W4A8's int8 codes (~6e-3).

Layout of a quantized activation (``Int16Activation``): the codes of word j (x[8j..8j+7], the
inputs of weight word j) as four int32 pairs, pair i = (x[8j + 2i], x[8j + 2i + 1]), stored as
four planes [4, K / 8] so each plane is read with 16-byte loads; per group the scale 2^e (fp32)
and the sum of the codes (fp32, exact). Per row and group the kernel forms
``s * 2^e * (sum(q * c) - z * sum(c))``, the integer sum exact in int32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ffchat.kernels.int4_gemv import (
    GemvConfig, check_gemv_inputs, finish_gemv, gemv_reference_epilogue, launch_gemv, load_tile, pick_config,
    rms_normalize, rms_rstd, tile_rows,
)
from ffchat.kernels.interpreter import interpreted
from ffchat.kernels.pdl import launch_options, release_dependents, wait_for_inputs
from ffchat.model import rms_norm
from ffchat.quantize.layout import dequantize

CODE_BITS = 15  # codes in -32767..32767
SMALLEST_GROUP_MAX = 2.0 ** -100  # a group's largest |x| is taken as at least this: its scale stays a normal float
# As the kernels see them (a jit function reads only constexpr globals).
_SMALLEST_GROUP_MAX = tl.constexpr(SMALLEST_GROUP_MAX)
_NIBBLES = tl.constexpr(0x0F0F0F0F)  # the low nibble of each byte


class Int16Activation(NamedTuple):
    """x as int16 codes per group of G: code planes int32 [4, K / 8], scales 2^e and code sums fp32 [K / G]."""

    planes: torch.Tensor
    scales: torch.Tensor
    sums: torch.Tensor
    dtype: torch.dtype  # the dtype of the x it came from: the GEMV's output dtype


@triton.jit
def _dp2a(pairs, weight_bytes, acc, HIGH: tl.constexpr, USE_ASM: tl.constexpr):
    """acc + the two signed 16-bit halves of ``pairs`` times bytes 0, 1 (2, 3 if HIGH) of ``weight_bytes``."""
    if USE_ASM:
        if HIGH:
            acc = tl.inline_asm_elementwise("dp2a.hi.s32.u32 $0, $1, $2, $3;", "=r,r,r,r", [pairs, weight_bytes, acc],
                                            dtype=tl.int32, is_pure=True, pack=1)
        else:
            acc = tl.inline_asm_elementwise("dp2a.lo.s32.u32 $0, $1, $2, $3;", "=r,r,r,r", [pairs, weight_bytes, acc],
                                            dtype=tl.int32, is_pure=True, pack=1)
    else:
        shift: tl.constexpr = 16 if HIGH else 0
        acc += ((pairs << 16) >> 16) * ((weight_bytes >> shift) & 0xFF)
        acc += (pairs >> 16) * ((weight_bytes >> (shift + 8)) & 0xFF)
    return acc


@triton.jit
def _power_of_two_scale(group_max):
    """(2^(E - 15), 2^(15 - E)) with E the frexp exponent of max(group_max, 2^-100): |x| / scale < 2^15."""
    bits = tl.maximum(group_max, _SMALLEST_GROUP_MAX).to(tl.int32, bitcast=True)
    biased = (bits >> 23) & 0xFF  # group_max in [2^(biased - 127), 2^(biased - 126)): E = biased - 126
    scale = ((biased - 14) << 23).to(tl.float32, bitcast=True)  # 2^(biased - 141)
    inverse = ((268 - biased) << 23).to(tl.float32, bitcast=True)  # 2^(141 - biased)
    return scale, inverse


@triton.jit
def quantize16_groups(x_ptr, planes_ptr, xs_ptr, xsum_ptr, nw_ptr, first_group, K, rstd, G: tl.constexpr,
                      BLOCK_G: tl.constexpr, NORM: tl.constexpr):
    """int16 codes of groups [first_group, first_group + BLOCK_G) of x (those below K / G): floor(x / 2^e + 0.5),
    written into the four pair planes; their scales and code sums.

    NORM: quantize rms_norm(x) * nw instead (``rstd`` computed by the caller), rounded to x's dtype as the
    W4A16 kernel's fused norm does.
    """
    grp = first_group + tl.arange(0, BLOCK_G)
    ok = grp < K // G
    offs = grp[:, None] * G + tl.arange(0, G)[None, :]
    x = tl.load(x_ptr + offs, mask=ok[:, None], other=0.0)
    if NORM:
        x = rms_normalize(x, rstd, tl.load(nw_ptr + offs, mask=ok[:, None], other=0.0))
    x = x.to(tl.float32)
    scale, inverse = _power_of_two_scale(tl.max(tl.abs(x), axis=1))
    codes = tl.minimum(tl.maximum(tl.floor(x * inverse[:, None] + 0.5), -32767.0), 32767.0)
    # input k = 8j + 2i + h is half h of pair i of word j, at int16 offset (i * K / 8 + j) * 2 + h
    plane_offs = ((offs % 8) // 2 * (K // 8) + offs // 8) * 2 + offs % 2
    tl.store(planes_ptr + plane_offs, codes.to(tl.int16), mask=ok[:, None])
    tl.store(xs_ptr + grp, scale, mask=ok)
    tl.store(xsum_ptr + grp, tl.sum(codes, axis=1), mask=ok)


@triton.jit
def _quantize16_kernel(x_ptr, planes_ptr, xs_ptr, xsum_ptr, nw_ptr, K, eps, G: tl.constexpr,
                       BLOCK_G: tl.constexpr, NORM: tl.constexpr, NORM_BLOCK: tl.constexpr,
                       NORM_CHUNKS: tl.constexpr, PDL: tl.constexpr):
    """BLOCK_G groups a program (see ``quantize16_groups``). Under PDL the GEMV after it becomes resident at once
    and loads its first weights meanwhile."""
    wait_for_inputs(PDL)
    release_dependents(PDL)
    rstd = rms_rstd(x_ptr, K, eps, NORM_BLOCK, NORM_CHUNKS) if NORM else 1.0  # all of K first: x sits in L2
    quantize16_groups(x_ptr, planes_ptr, xs_ptr, xsum_ptr, nw_ptr, tl.program_id(0) * BLOCK_G, K, rstd, G, BLOCK_G,
                      NORM)


@triton.jit
def _load_x(x_at, plane, xs_at, xsum_at, g_ok, EVEN: tl.constexpr):
    """One tile's four code planes (at ``x_at``, planes ``plane`` words apart), its groups' scales and code sums."""
    if EVEN:
        return (tl.load(x_at), tl.load(x_at + plane), tl.load(x_at + 2 * plane), tl.load(x_at + 3 * plane),
                tl.load(xs_at), tl.load(xsum_at))
    ok = g_ok[None, :, None]
    return (tl.load(x_at, mask=ok, other=0), tl.load(x_at + plane, mask=ok, other=0),
            tl.load(x_at + 2 * plane, mask=ok, other=0), tl.load(x_at + 3 * plane, mask=ok, other=0),
            tl.load(xs_at, mask=g_ok, other=0.0), tl.load(xsum_at, mask=g_ok, other=0.0))


@triton.jit
def _tile_offsets(block, N, K, G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, W_ALIGN: tl.constexpr,
                  GATED: tl.constexpr):
    """Row block ``block``'s rows, their mask, and the offsets of its first [rows, groups, words] tile in W, the
    code planes and the scales. x has the weight tile's shape (the same word for every row), so it loads straight
    into the tile's layout, where a [groups, words] load would take a shared-memory round trip per plane."""
    GROUPS: tl.constexpr = BLOCK_K // G
    WORDS: tl.constexpr = G // 8
    rows, row_ok = tile_rows(block, N, BLOCK_N, GATED)
    grp = tl.arange(0, GROUPS)
    word = tl.arange(0, WORDS)
    in_row = (grp * WORDS)[None, :, None] + word[None, None, :]
    w_offs = rows[:, None, None] * tl.multiple_of(K // 8, W_ALIGN) + in_row
    x_offs = tl.zeros_like(rows)[:, None, None] + in_row
    sz_offs = rows[:, None] * (K // G) + grp[None, :]
    return rows, row_ok, w_offs, x_offs, sz_offs


@triton.jit
def dp2a_first_tile(block, split, w_ptr, s_ptr, z_ptr, N, K, CHUNKS: tl.constexpr, G: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, W_ALIGN: tl.constexpr, EVEN: tl.constexpr,
                    GATED: tl.constexpr):
    """The weights, scales and zeros of (row block, K slice)'s first tile: loadable before x exists."""
    GROUPS: tl.constexpr = BLOCK_K // G
    rows, row_ok, w_offs, x_offs, sz_offs = _tile_offsets(block, N, K, G, BLOCK_N, BLOCK_K, W_ALIGN, GATED)
    first = split * CHUNKS * GROUPS
    g_ok = (first + tl.arange(0, GROUPS)) < K // G
    return load_tile(w_ptr, s_ptr, z_ptr, w_offs, sz_offs, first, row_ok[:, None] & g_ok[None, :], G // 8, EVEN)


@triton.jit
def dp2a_accumulate(block, split, w, s, z, planes_ptr, xs_ptr, xsum_ptr, w_ptr, s_ptr, z_ptr, N, K,
                    CHUNKS: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    W_ALIGN: tl.constexpr, EVEN: tl.constexpr, GATED: tl.constexpr, USE_ASM: tl.constexpr):
    """fp32 row sums [TILE_N] of (row block, K slice) over its CHUNKS tiles, the first (w, s, z) already loaded;
    each iteration requests the next tile before computing its own."""
    GROUPS: tl.constexpr = BLOCK_K // G
    WORDS: tl.constexpr = G // 8
    TILE_N: tl.constexpr = 2 * BLOCK_N if GATED else BLOCK_N
    rows, row_ok, w_offs, x_offs, sz_offs = _tile_offsets(block, N, K, G, BLOCK_N, BLOCK_K, W_ALIGN, GATED)
    grp = tl.arange(0, GROUPS)
    groups_per_row = K // G
    plane = K // 8
    first = split * CHUNKS * GROUPS
    acc = tl.zeros((TILE_N, GROUPS), dtype=tl.float32)
    for c in range(CHUNKS):
        g0 = first + c * GROUPS
        g_ok = (g0 + grp) < groups_per_row
        x0, x1, x2, x3, xs, x_sum = _load_x(planes_ptr + x_offs + g0 * WORDS, plane, xs_ptr + g0 + grp,
                                            xsum_ptr + g0 + grp, g_ok, EVEN)
        w_now, s_now, z_now = w, s, z
        if c + 1 < CHUNKS:  # the next tile's loads fly while this one is computed
            n_ok = (g0 + GROUPS + grp) < groups_per_row
            w, s, z = load_tile(w_ptr, s_ptr, z_ptr, w_offs, sz_offs, g0 + GROUPS, row_ok[:, None] & n_ok[None, :],
                                 WORDS, EVEN)
        low = w_now & _NIBBLES  # bytes b: nibble of input 8j + b
        high = (w_now >> 4) & _NIBBLES  # input 8j + 4 + b
        d = _dp2a(x0, low, tl.zeros_like(w_now), False, USE_ASM)
        d = _dp2a(x1, low, d, True, USE_ASM)
        d = _dp2a(x2, high, d, False, USE_ASM)
        d = _dp2a(x3, high, d, True, USE_ASM)
        acc += s_now * xs[None, :] * (tl.sum(d, axis=2).to(tl.float32) - z_now * x_sum[None, :])
    return tl.sum(acc, axis=1)


@triton.jit
def _int4_gemv_dp2a_kernel(
    planes_ptr, xs_ptr, xsum_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, res_ptr, out_ptr, part_ptr, count_ptr,
    N, K,
    CHUNKS: tl.constexpr, SPLITS: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    W_ALIGN: tl.constexpr, EVEN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, USE_ASM: tl.constexpr,
    GATED: tl.constexpr, PDL: tl.constexpr,
):
    """A [rows, groups, words] tile per iteration; x is the four code planes (int32 pairs), per-group scale/sum.

    GATED: N = I outputs from [gate; up] rows, interleaved in the tile as in the W4A16 kernel.
    """
    block, split = tl.program_id(0), tl.program_id(1)
    w, s, z = dp2a_first_tile(block, split, w_ptr, s_ptr, z_ptr, N, K, CHUNKS, G, BLOCK_N, BLOCK_K, W_ALIGN, EVEN,
                              GATED)
    wait_for_inputs(PDL)
    release_dependents(PDL)
    y = dp2a_accumulate(block, split, w, s, z, planes_ptr, xs_ptr, xsum_ptr, w_ptr, s_ptr, z_ptr, N, K, CHUNKS, G,
                        BLOCK_N, BLOCK_K, W_ALIGN, EVEN, GATED, USE_ASM)
    rows, row_ok = tile_rows(block, N, BLOCK_N, GATED)
    finish_gemv(y, block, split, rows, row_ok, N, part_ptr, count_ptr, bias_ptr, res_ptr, out_ptr,
            SPLITS, HAS_BIAS, HAS_RES, GATED, BLOCK_N)


def quantize_activation16(x: torch.Tensor, group_size: int, *, norm_weight: torch.Tensor | None = None,
                          norm_eps: float = 1e-6) -> Int16Activation:
    """One launch; reuse the result for every dp2a GEMV that reads the same x.

    ``norm_weight``: quantize ``ffchat.model.rms_norm(x, norm_weight, norm_eps)`` (in x's dtype) instead.
    """
    k = x.numel()
    if x.dim() != 1 or x.dtype not in (torch.float16, torch.bfloat16) or k % group_size or group_size % 8:
        raise ValueError(f"x must be a 1-D fp16/bf16 vector whose length is a multiple of {group_size}, "
                         "itself a multiple of 8")
    if norm_weight is not None and tuple(norm_weight.shape) != (k,):
        raise ValueError(f"norm_weight must be a [{k}] vector, got {tuple(norm_weight.shape)}")
    num_groups = k // group_size
    act = Int16Activation(
        torch.empty(4, k // 8, dtype=torch.int32, device=x.device),
        torch.empty(num_groups, dtype=torch.float32, device=x.device),
        torch.empty(num_groups, dtype=torch.float32, device=x.device),
        x.dtype,
    )
    block_g = max(1, min(triton.next_power_of_2(num_groups), 1024 // group_size))  # 1024 inputs a program
    norm_block = min(triton.next_power_of_2(k), 4096)
    x = x.contiguous()
    _quantize16_kernel[(triton.cdiv(num_groups, block_g),)](
        x, act.planes.view(torch.int16), act.scales, act.sums,
        norm_weight.contiguous() if norm_weight is not None else x,
        k, float(norm_eps), G=group_size, BLOCK_G=block_g, NORM=norm_weight is not None,
        NORM_BLOCK=norm_block, NORM_CHUNKS=triton.cdiv(k, norm_block), **launch_options(x.device),
    )
    return act


def int16_codes(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: fp32 codes [K / G, G] in -32767..32767 and power-of-two scales [K / G] (see the module doc)."""
    groups = x.float().view(-1, group_size)
    _, exponent = torch.frexp(groups.abs().amax(dim=1).clamp(min=SMALLEST_GROUP_MAX))
    scales = torch.ldexp(torch.ones_like(groups[:, 0]), exponent - CODE_BITS)
    return torch.floor(groups / scales[:, None] + 0.5).clamp(-32767, 32767), scales


def quantize_activation16_reference(x: torch.Tensor, group_size: int, *, norm_weight: torch.Tensor | None = None,
                                    norm_eps: float = 1e-6) -> Int16Activation:
    """Plain torch version of ``quantize_activation16``: the same codes, scales and sums."""
    x_in = x if norm_weight is None else rms_norm(x, norm_weight, norm_eps).to(x.dtype)
    codes, scales = int16_codes(x_in, group_size)
    planes = codes.to(torch.int16).view(-1, 4, 2).transpose(0, 1).contiguous().view(torch.int32).view(4, -1)
    return Int16Activation(planes, scales, codes.sum(dim=1), x.dtype)


def int4_gemv_dp2a(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    *,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    act: Int16Activation | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    gated: bool = False,
) -> torch.Tensor:
    """``int4_gemv``'s result from int16 codes of x (or ``act``, already quantized) and dp2a products.

    ``norm_weight`` (ignored with ``act``) and ``gated`` as in ``int4_gemv``: the RMSNorm runs in
    the quantizing launch, the SwiGLU in the GEMV's epilogue. ``config``: the W4A8 table's tiles by default.
    """
    n, k = check_gemv_inputs(x, qweight, scales, zeros, group_size, bias, residual, out, gated=gated,
                         norm_weight=norm_weight)
    act = act or quantize_activation16(x, group_size, norm_weight=norm_weight, norm_eps=norm_eps)
    cfg = config or pick_config(qweight.shape[0], k, group_size, gated=gated, w4a8=True, device=x.device)
    if cfg.prefetch:
        raise ValueError("prefetch is a W4A16 option; the dp2a kernel always requests the next tile first")
    inputs = (act.planes, act.scales, act.sums) + tuple(t.contiguous() for t in (qweight, scales, zeros))
    use_asm = not interpreted(_int4_gemv_dp2a_kernel)  # inline asm cannot be interpreted
    return launch_gemv(_int4_gemv_dp2a_kernel, inputs, n, k, group_size, cfg, bias, residual, out, act.dtype, x.device,
                   part_rows=qweight.shape[0], USE_ASM=use_asm, GATED=gated)


def int4_gemv_dp2a_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    *,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    gated: bool = False,
) -> torch.Tensor:
    """The W4A16 reference applied to x rounded through its int16 codes (what the kernel computes, up to fp32 sums)."""
    x_in = x if norm_weight is None else rms_norm(x, norm_weight, norm_eps).to(x.dtype)
    codes, code_scales = int16_codes(x_in, group_size)
    y = dequantize(qweight, scales, zeros, group_size) @ (codes * code_scales[:, None]).view(-1)
    return gemv_reference_epilogue(y, bias, residual, gated, x.dtype)
