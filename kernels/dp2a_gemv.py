"""Batch-1 INT4 GEMV on the integer dot-product units: int16 codes of x, ``dp2a`` products, one launch.

The W4A16 kernel (``ffchat.kernels.int4_gemv``) turns every nibble into a float and spends
about four instructions per weight: on Hopper it runs out of issue slots before memory
bandwidth. Here x becomes int16 codes with a power-of-two scale per group of G inputs, and
each ``dp2a`` multiplies two 16-bit codes by two weight bytes and adds both products to an
int32: a word of 8 nibbles costs two masks, one shift and four ``dp2a``.

Why int16 and a power-of-two scale: x (fp16 or bf16, 11 or 8 significant bits) divided by
a power of two is exact, and every element within 2^4 (fp16) or 2^7 (bf16) of the group's
largest keeps all its bits; smaller ones are rounded by at most 2^-16 of the group's largest.
So this computes what the W4A16 kernel computes, to ~1e-5, unlike W4A8's int8 codes (~6e-3).
A group's largest element has at most 11 significant bits below 2^15, so no code rounds to 2^15.

Why every program quantizes x itself: a launch that quantized x once for the whole GEMV was one
more dependency in the decode step's chain, and cost more than the GEMV saved on all but the
longest ones (BENCHMARKS.md, stop 18). Each program now codes its own K slice, in a compact
[groups, G] layout (each input once per program: the cost is shared by the tile's rows), and
the code pairs reach the tile's layout through shared memory. A code is one FFMA: adding
1.5 * 2^23 to x / 2^e rounds it to the nearest integer (ties to even) and leaves it in the low
bits of the sum, from which two codes are packed into the int32 pair a ``dp2a`` reads.

Where a GEMV has thousands of row blocks (an LM head), coding x again in every program costs more than
the launch it saves (BENCHMARKS.md, stop 25: the 1B head 57.1 us, against 46.8 with x coded once
beforehand). ``GemvConfig.programs_per_sm`` launches a few programs per SM instead, each coding x once
(all of K in one tile) and looping over every PROGRAMS-th row block, requesting the next block's tile
before computing the current one; ``ffchat tune`` tries it on LM heads and on other GEMVs that give every SM
a row block (there, even under two blocks a program, coding x once for all of K can win: the 1B down).

Per row and group the kernel forms ``s * 2^e * (sum(q * c) - z * sum(c))``, the integer sums
exact in int32. The weight layout is version 1 (``ffchat.quantize.layout``): the low nibbles of
a word's bytes are inputs 8j..8j+3, the high ones 8j+4..8j+7.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ffchat.kernels.int4_gemv import (
    GemvConfig, check_gemv_inputs, finish_gemv, fused_norm, gemv_epilogue, gemv_reference_epilogue, launch_gemv,
    load_bias, load_residual, load_tile, pick_config, rms_normalize, rms_rstd, tile_rows,
)
from ffchat.kernels.interpreter import interpreted
from ffchat.kernels.pdl import release_dependents, wait_for_inputs
from ffchat.model import rms_norm
from ffchat.quantize.layout import dequantize

CODE_BITS = 15  # codes in -32767..32767
SMALLEST_GROUP_MAX = 2.0 ** -100  # a group's largest |x| is taken as at least this: its scale stays a normal float
# As the kernels see them (a jit function reads only constexpr globals).
_SMALLEST_GROUP_MAX = tl.constexpr(SMALLEST_GROUP_MAX)
_NIBBLES = tl.constexpr(0x0F0F0F0F)  # the low nibble of each byte
_ROUNDER = tl.constexpr(12582912.0)  # 1.5 * 2^23: v + it, for |v| < 2^22, is round(v) in the low mantissa bits
_ROUNDER_BITS = tl.constexpr(0x4B400000)  # the bit pattern of _ROUNDER itself


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
def _norm_weights(nw_ptr, g0, g_ok, G: tl.constexpr, GROUPS: tl.constexpr, NORM: tl.constexpr, EVEN: tl.constexpr):
    """The norm weights [groups, G] of groups g0.. (0.0 without NORM): a weight, so requested before the PDL wait
    (or with the tile before), not after x's statistic as one more round trip to memory."""
    nw = 0.0
    if NORM:
        offs = (g0 + tl.arange(0, GROUPS))[:, None] * G + tl.arange(0, G)[None, :]
        if EVEN:
            nw = tl.load(nw_ptr + offs)
        else:
            nw = tl.load(nw_ptr + offs, mask=g_ok[:, None], other=0.0)
    return nw


@triton.jit
def _code_pairs(x_ptr, nw, g0, g_ok, rstd, G: tl.constexpr, GROUPS: tl.constexpr, NORM: tl.constexpr,
                EVEN: tl.constexpr):
    """Groups g0.. of x (normalized with NORM by ``nw`` from ``_norm_weights``) as int16 codes: the four pairs of
    each word [1, groups, words] (pair i: inputs 8j + 2i, 8j + 2i + 1), and per group the scale 2^e and the
    codes' sum [groups]."""
    WORDS: tl.constexpr = G // 8
    offs = (g0 + tl.arange(0, GROUPS))[:, None] * G + tl.arange(0, G)[None, :]
    if EVEN:
        x = tl.load(x_ptr + offs)
    else:
        x = tl.load(x_ptr + offs, mask=g_ok[:, None], other=0.0)
    if NORM:
        x = rms_normalize(x, rstd, nw)
    x = x.to(tl.float32)
    scale, inverse = _power_of_two_scale(tl.max(tl.abs(x), axis=1))
    bits = (x * inverse[:, None] + _ROUNDER).to(tl.int32, bitcast=True)
    code_sum = tl.sum(bits - _ROUNDER_BITS, axis=1).to(tl.float32)  # exact: below 2^22
    even, odd = tl.split(tl.reshape(bits, (GROUPS, WORDS, 4, 2)))
    pairs = (even & 0xFFFF) | (odd << 16)
    first, second = tl.split(tl.reshape(pairs, (GROUPS, WORDS, 2, 2)))  # pairs 0, 2 and 1, 3
    c0, c2 = tl.split(first)
    c1, c3 = tl.split(second)
    return c0[None, :, :], c1[None, :, :], c2[None, :, :], c3[None, :, :], scale, code_sum


@triton.jit
def _tile_offsets(block, N, K, G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, W_ALIGN: tl.constexpr,
                  GATED: tl.constexpr):
    """Row block ``block``'s rows, their mask, and the offsets of its first [rows, groups, words] tile in W and
    in the scales."""
    GROUPS: tl.constexpr = BLOCK_K // G
    WORDS: tl.constexpr = G // 8
    rows, row_ok = tile_rows(block, N, BLOCK_N, GATED)
    grp = tl.arange(0, GROUPS)
    in_row = (grp * WORDS)[None, :, None] + tl.arange(0, WORDS)[None, None, :]
    w_offs = rows[:, None, None] * tl.multiple_of(K // 8, W_ALIGN) + in_row
    sz_offs = rows[:, None] * (K // G) + grp[None, :]
    return rows, row_ok, w_offs, sz_offs


@triton.jit
def dp2a_first_tile(block, split, w_ptr, s_ptr, z_ptr, N, K, CHUNKS: tl.constexpr, G: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, W_ALIGN: tl.constexpr, EVEN: tl.constexpr,
                    GATED: tl.constexpr):
    """The weights, scales and zeros of (row block, K slice)'s first tile: loadable before x exists."""
    GROUPS: tl.constexpr = BLOCK_K // G
    rows, row_ok, w_offs, sz_offs = _tile_offsets(block, N, K, G, BLOCK_N, BLOCK_K, W_ALIGN, GATED)
    first = split * CHUNKS * GROUPS
    g_ok = (first + tl.arange(0, GROUPS)) < K // G
    return load_tile(w_ptr, s_ptr, z_ptr, w_offs, sz_offs, first, row_ok[:, None] & g_ok[None, :], G // 8, EVEN)


@triton.jit
def dp2a_accumulate(block, split, w, s, z, nw, x_ptr, w_ptr, s_ptr, z_ptr, N, K, nw_ptr, eps,
                    CHUNKS: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    W_ALIGN: tl.constexpr, EVEN: tl.constexpr, GATED: tl.constexpr, NORM: tl.constexpr,
                    NORM_BLOCK: tl.constexpr, NORM_CHUNKS: tl.constexpr, USE_ASM: tl.constexpr):
    """fp32 row sums [TILE_N] of (row block, K slice) over its CHUNKS tiles, the first (w, s, z) and norm weights
    ``nw`` already loaded; each iteration codes its slice of x and requests the next tile before computing its own."""
    GROUPS: tl.constexpr = BLOCK_K // G
    TILE_N: tl.constexpr = 2 * BLOCK_N if GATED else BLOCK_N
    rows, row_ok, w_offs, sz_offs = _tile_offsets(block, N, K, G, BLOCK_N, BLOCK_K, W_ALIGN, GATED)
    grp = tl.arange(0, GROUPS)
    groups_per_row = K // G
    first = split * CHUNKS * GROUPS
    rstd = rms_rstd(x_ptr, K, eps, NORM_BLOCK, NORM_CHUNKS) if NORM else 1.0  # all of K first: x sits in L2
    acc = tl.zeros((TILE_N, GROUPS), dtype=tl.float32)
    for c in range(CHUNKS):
        g0 = first + c * GROUPS
        g_ok = (g0 + grp) < groups_per_row
        x0, x1, x2, x3, xs, x_sum = _code_pairs(x_ptr, nw, g0, g_ok, rstd, G, GROUPS, NORM, EVEN)
        w_now, s_now, z_now = w, s, z
        if c + 1 < CHUNKS:  # the next tile's loads fly while this one is computed
            n_ok = (g0 + GROUPS + grp) < groups_per_row
            w, s, z = load_tile(w_ptr, s_ptr, z_ptr, w_offs, sz_offs, g0 + GROUPS, row_ok[:, None] & n_ok[None, :],
                                G // 8, EVEN)
            nw = _norm_weights(nw_ptr, g0 + GROUPS, n_ok, G, GROUPS, NORM, EVEN)
        acc += _group_sums(w_now, s_now, z_now, x0, x1, x2, x3, xs, x_sum, USE_ASM)
    return tl.sum(acc, axis=1)


@triton.jit
def _group_sums(w, s, z, x0, x1, x2, x3, xs, x_sum, USE_ASM: tl.constexpr):
    """One tile's fp32 products per row and group [rows, groups]: s * 2^e * (sum(q * c) - z * sum(c))."""
    low = w & _NIBBLES  # bytes b: nibble of input 8j + b
    high = (w >> 4) & _NIBBLES  # input 8j + 4 + b
    d = _dp2a(x0, low, tl.zeros_like(w), False, USE_ASM)
    d = _dp2a(x1, low, d, True, USE_ASM)
    d = _dp2a(x2, high, d, False, USE_ASM)
    d = _dp2a(x3, high, d, True, USE_ASM)
    return s * xs[None, :] * (tl.sum(d, axis=2).to(tl.float32) - z * x_sum[None, :])


@triton.jit
def dp2a_row_loop(block, w, s, z, nw, bias, res, x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, res_ptr, out_ptr, N, K, eps,
                  BLOCKS, PROGRAMS, G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  W_ALIGN: tl.constexpr, EVEN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                  GATED: tl.constexpr, NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, NORM_CHUNKS: tl.constexpr,
                  USE_ASM: tl.constexpr):
    """Row blocks block, block + PROGRAMS, ... to the output, all of K in one tile whose first (w, s, z), the norm
    weights ``nw``, and the first block's ``bias`` and ``res`` are loaded: x is coded once, and each block's
    tile is requested before the one before it is computed."""
    GROUPS: tl.constexpr = BLOCK_K // G
    g_ok = tl.arange(0, GROUPS) < K // G
    rstd = rms_rstd(x_ptr, K, eps, NORM_BLOCK, NORM_CHUNKS) if NORM else 1.0
    x0, x1, x2, x3, xs, x_sum = _code_pairs(x_ptr, nw, 0, g_ok, rstd, G, GROUPS, NORM, EVEN)
    rows, row_ok = tile_rows(block, N, BLOCK_N, GATED)
    while block < BLOCKS:
        w_now, s_now, z_now, rows_now, ok_now, bias_now, res_now = w, s, z, rows, row_ok, bias, res
        if block + PROGRAMS < BLOCKS:
            rows, row_ok, w_offs, sz_offs = _tile_offsets(block + PROGRAMS, N, K, G, BLOCK_N, BLOCK_K, W_ALIGN, GATED)
            w, s, z = load_tile(w_ptr, s_ptr, z_ptr, w_offs, sz_offs, 0, row_ok[:, None] & g_ok[None, :], G // 8,
                                EVEN)
            bias = load_bias(bias_ptr, block + PROGRAMS, rows, row_ok, N, HAS_BIAS, GATED, BLOCK_N)
            res = load_residual(res_ptr, rows, row_ok, HAS_RES)
        y = tl.sum(_group_sums(w_now, s_now, z_now, x0, x1, x2, x3, xs, x_sum, USE_ASM), axis=1)
        gemv_epilogue(y, block, rows_now, ok_now, N, bias_now, res_now, out_ptr, HAS_BIAS, HAS_RES, GATED, BLOCK_N)
        block += PROGRAMS


@triton.jit
def _int4_gemv_dp2a_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, res_ptr, out_ptr, part_ptr, count_ptr, N, K, nw_ptr, eps, BLOCKS, PROGRAMS,
    CHUNKS: tl.constexpr, SPLITS: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    W_ALIGN: tl.constexpr, EVEN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, USE_ASM: tl.constexpr,
    GATED: tl.constexpr, NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, NORM_CHUNKS: tl.constexpr,
    PDL: tl.constexpr, RELEASE_EARLY: tl.constexpr, LOOP_ROWS: tl.constexpr,
):
    """A [rows, groups, words] tile per iteration against int16 codes of x; nw_ptr/eps are read only with NORM.

    GATED: N = I outputs from [gate; up] rows, interleaved in the tile as in the W4A16 kernel.
    RELEASE_EARLY: let the next kernel become resident before this one's input is ready (``ffchat.kernels.pdl``).
    LOOP_ROWS: PROGRAMS programs each take every PROGRAMS-th of the BLOCKS row blocks (one tile, one K slice).
    """
    GROUPS: tl.constexpr = BLOCK_K // G
    block, split = tl.program_id(0), tl.program_id(1)
    w, s, z = dp2a_first_tile(block, split, w_ptr, s_ptr, z_ptr, N, K, CHUNKS, G, BLOCK_N, BLOCK_K, W_ALIGN, EVEN,
                              GATED)
    first = split * CHUNKS * GROUPS
    nw = _norm_weights(nw_ptr, first, (first + tl.arange(0, GROUPS)) < K // G, G, GROUPS, NORM, EVEN)
    rows, row_ok = tile_rows(block, N, BLOCK_N, GATED)
    bias = load_bias(bias_ptr, block, rows, row_ok, N, HAS_BIAS, GATED, BLOCK_N)
    if RELEASE_EARLY:
        release_dependents(PDL)
    wait_for_inputs(PDL)
    if not RELEASE_EARLY:
        release_dependents(PDL)
    res = load_residual(res_ptr, rows, row_ok, HAS_RES)
    if LOOP_ROWS:
        dp2a_row_loop(block, w, s, z, nw, bias, res, x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, res_ptr, out_ptr, N, K,
                      eps, BLOCKS, PROGRAMS, G, BLOCK_N, BLOCK_K, W_ALIGN, EVEN, HAS_BIAS, HAS_RES, GATED, NORM,
                      NORM_BLOCK, NORM_CHUNKS, USE_ASM)
    else:
        y = dp2a_accumulate(block, split, w, s, z, nw, x_ptr, w_ptr, s_ptr, z_ptr, N, K, nw_ptr, eps, CHUNKS, G,
                            BLOCK_N, BLOCK_K, W_ALIGN, EVEN, GATED, NORM, NORM_BLOCK, NORM_CHUNKS, USE_ASM)
        finish_gemv(y, block, split, rows, row_ok, N, part_ptr, count_ptr, bias, res, out_ptr,
                    SPLITS, HAS_BIAS, HAS_RES, GATED, BLOCK_N)


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
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    gated: bool = False,
    release_early: bool = False,
) -> torch.Tensor:
    """``int4_gemv``'s result from int16 codes of x and dp2a products, in one launch.

    ``norm_weight``, ``gated`` and ``release_early`` as in ``int4_gemv``. ``config``: the W4A8 table's tiles by
    default.
    """
    n, k = check_gemv_inputs(x, qweight, scales, zeros, group_size, bias, residual, out, gated=gated,
                             norm_weight=norm_weight)
    cfg = config or pick_config(qweight.shape[0], k, group_size, gated=gated, w4a8=True, device=x.device)
    if cfg.prefetch:
        raise ValueError("prefetch is a W4A16 option; the dp2a kernel always requests the next tile first")
    inputs = tuple(t.contiguous() for t in (x, qweight, scales, zeros))
    norm_args, norm = fused_norm(inputs[0], norm_weight, norm_eps)
    return launch_gemv(_int4_gemv_dp2a_kernel, inputs, n, k, group_size, cfg, bias, residual, out, x.dtype, x.device,
                       extra_args=norm_args, part_rows=qweight.shape[0], loops_rows=True,
                       USE_ASM=not interpreted(_int4_gemv_dp2a_kernel),  # inline asm cannot be interpreted
                       GATED=gated, RELEASE_EARLY=release_early, **norm)


def int16_codes(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: fp32 codes [K / G, G] in -32767..32767 (x / 2^e, ties to even) and power-of-two scales
    [K / G] (see the module doc)."""
    groups = x.float().view(-1, group_size)
    _, exponent = torch.frexp(groups.abs().amax(dim=1).clamp(min=SMALLEST_GROUP_MAX))
    scales = torch.ldexp(torch.ones_like(groups[:, 0]), exponent - CODE_BITS)
    return torch.round(groups / scales[:, None]), scales


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
