"""Batch-1 INT4 GEMV: y = W x (+ bias) (+ residual), fp32 accumulation; W4A16 default, W4A8 opt-in.

W4A16 can also fuse an input RMSNorm (y = W rms_norm(x)) and a SwiGLU epilogue
(y = silu(W_gate x + b_gate) * (W_up x + b_up) from one [2I, K] weight), so a decode
layer's norm + gate/up + SiLU is one launch.

Reads the version-1 layout of ``ffchat.quantize.layout``: ``qweight`` int32 [N, K // 8]
(word j of a row holds k = 8j..8j+7, nibble i at bit ``8 * (i % 4) + 4 * (i // 4)``),
fp16 ``scales`` and ``zeros`` [N, K // G], W ~ (q - z) * s.

Why it looks the way it does (batch-1 decode is memory-bound, so the kernel must keep
the memory system busy while spending few instructions per weight):

* Each program streams a [BLOCK_N rows, BLOCK_K inputs] tile per iteration as a 2-D
  [rows, words] block: every thread issues 16-byte weight loads and keeps its rows in
  registers, so one x value serves several rows. x comes in as one 16-byte load per word
  and is split into the 8 nibble planes in registers (a 3-D [rows, groups, words] tile
  made Triton shuffle x through shared memory once per plane: 1.5x the instructions).
* A nibble becomes a float with one LOP3: OR-ed into the mantissa of 1.0 at bits 19..22 it
  gives ``1 + q/16``, at bits 15..18 ``1 + q/256``, exactly (no int->float conversion). Four
  shifts per word (one a rotation) bring its 8 nibbles into those two windows two at a time,
  half the shifts of moving each nibble on its own. Planes landing low meet 16 x, so every
  product is ``x' + q x / 16`` and one FMA per weight sums them: per group
  ``sum((q - z) x) = 16 * (T - X') - z * X`` with T = sum(v x'), X' = sum(x') and X = sum(x)
  shared by all rows. The cancellation in T - X' costs up to ~1e-5 of the group's sum of |q x|.
* Split-K (optional): every K-slice writes an fp32 partial, the last slice to arrive (per
  row block, counted with an atomic) sums the partials in slice order and runs the
  epilogue, so results are deterministic and one launch does everything.
* Fused RMSNorm (``norm_weight``): every program first sums x^2 over all of K (x is small
  and sits in L2), then normalizes x as it loads it, rounding like ``ffchat.model.rms_norm``;
  X above is the sum of the normalized x.
* Fused SwiGLU (``gated``): a program's tile holds gate row n and up row n + I interleaved
  (rows n, n + I, n + 1, n + 1 + I, ...), so one x tile feeds both and the epilogue splits the
  row sums into gate and up; the activations never leave registers.
* Launched with PDL on Hopper (``ffchat.kernels.pdl``): the first tile's weights are requested
  before waiting for x, so they load while the previous kernel finishes.
* W4A8 (``int4_gemv_w4a8``): x quantized to int8 per group, 4 products per ``dp4a``;
  faster still, at ~6e-3 relative error against fp16 activations.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ffchat.kernels.interpreter import interpreted
from ffchat.kernels.pdl import launch_options, release_dependents, wait_for_inputs
from ffchat.model import int8_codes, rms_norm
from ffchat.profiles import kernel_table
from ffchat.quantize.layout import check_packed, dequantize

# Passed as run-time arguments, not constants: with one operand in the constant bank,
# ptxas fuses (w & MASK) | ONE into a single LOP3 (two immediates cost two instructions).
HIGH_NIBBLE = 0x00780000  # mantissa bits 19..22 of an fp32: OR-ed into 1.0f they give 1 + q/16
LOW_NIBBLE = 0x00078000  # mantissa bits 15..18: 1 + q/256
ONE_F32 = 0x3F800000  # 1.0f


@dataclass(frozen=True)
class GemvConfig:
    """Launch parameters: tile of BLOCK_N rows x BLOCK_K inputs per iteration, K split in ``split_k`` slices.

    With ``gated`` BLOCK_N counts outputs: a program reads 2 * BLOCK_N weight rows (gate and up).
    ``prefetch`` (W4A16 and word-a-lane only): request tile c + 1 before computing tile c, holding two tiles in
    registers; it pays on long rows (many tiles per program) and costs on short ones.
    ``max_registers``: a per-thread register cap for ptxas (None: its own choice). A lower cap lets
    more programs share an SM, which hides more memory latency where the cap costs no spills.
    ``programs_per_sm`` (dp2a only; 0: a program per row block and K slice): that many programs per SM,
    each looping over row blocks with x coded once, the whole of K in one tile. For GEMVs of thousands
    of row blocks (LM heads, an 8B gate/up), where coding x again in every program costs more than the loop,
    and for long rows (the 1B down), where one tile of all of K codes x once instead of per chunk.
    """

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int = 1
    split_k: int = 1
    prefetch: bool = False
    max_registers: int | None = None
    programs_per_sm: int = 0


@functools.cache
def config_table(name: str, device: torch.device) -> tuple[tuple[float, float, GemvConfig], ...]:
    """Kernel table ``name`` (``ffchat.profiles.KERNEL_TABLES``) of the device's GPU profile, as
    (max N, max K, config) rows: the first row whose bounds hold is used. The tables and how they
    were measured are in ``profiles/*.yaml``."""
    rows = []
    for row in kernel_table(name, device):
        params = {key: value for key, value in row.items() if key not in ("max_n", "max_k")}
        rows.append((row.get("max_n", math.inf), row.get("max_k", math.inf), GemvConfig(**params)))
    return tuple(rows)


def pick_config(n: int, k: int, group_size: int, table=None, *, gated: bool = False, w4a8: bool = False,
                device: torch.device | None = None) -> GemvConfig:
    """The table's config for N weight rows x K inputs, shrunk so a block never exceeds the problem.

    ``gated``: N = 2I rows ([gate; up]) give I outputs, looked up by I (block_n counts outputs).
    Without ``table``: the W4A16 or (``w4a8``) W4A8 table, plain or gated, of ``device``'s GPU
    profile (the root profile's for the CPU).
    """
    if gated:
        n //= 2
    if table is None:
        name = f"gemv_{'w4a8' if w4a8 else 'w4a16'}{'_gated' if gated else ''}"
        table = config_table(name, device if device is not None else torch.device("cpu"))
    cfg = next(c for max_n, max_k, c in table if n <= max_n and k <= max_k)
    block_k = max(group_size, min(cfg.block_k, triton.next_power_of_2(k)))
    block_n = min(cfg.block_n, triton.next_power_of_2(n))
    split_k = max(1, min(cfg.split_k, triton.cdiv(k, block_k)))
    return replace(cfg, block_n=block_n, block_k=block_k, split_k=split_k)


@triton.jit
def _nibble_pair(moved, high_mask, low_mask, one):
    """The nibbles at bits 19..22 and 15..18 of each moved word as fp32 1 + q/16 and 1 + q/256 (one LOP3 each)."""
    high = ((moved & high_mask) | one).to(tl.float32, bitcast=True)
    low = ((moved & low_mask) | one).to(tl.float32, bitcast=True)
    return high, low


@triton.jit
def _rotate_left_19(w):
    """w rotated left by 19 bits (one funnel shift): bit 0 -> 19, bit 28 -> 15."""
    u = w.to(tl.uint32, bitcast=True)
    return ((u << 19) | (u >> 13)).to(tl.int32, bitcast=True)


@triton.jit
def _x_planes(x8, COLS: tl.constexpr):
    """Split x [COLS, 8] (word j's 8 inputs) into 8 vectors [COLS], plane i = x[8j + i], in registers."""
    even, odd = tl.split(tl.reshape(x8, (COLS, 4, 2)))  # i = 0,2,4,6 and 1,3,5,7
    x04, x26 = tl.split(tl.reshape(even, (COLS, 2, 2)))
    x15, x37 = tl.split(tl.reshape(odd, (COLS, 2, 2)))
    x0, x4 = tl.split(x04)
    x2, x6 = tl.split(x26)
    x1, x5 = tl.split(x15)
    x3, x7 = tl.split(x37)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def load_bias(bias_ptr, block, rows, row_ok, N, HAS_BIAS: tl.constexpr, GATED: tl.constexpr, BLOCK_N: tl.constexpr):
    """The bias ``gemv_epilogue`` adds to row block ``block``, fp32 in y's layout (GATED: (gate, up) pairs).

    A weight: requested before the PDL wait, not after the products as one more round trip to memory.
    """
    bias = 0.0
    if HAS_BIAS:
        if GATED:
            outputs = block * BLOCK_N + tl.arange(0, BLOCK_N)
            ok = outputs < N
            gate = tl.load(bias_ptr + outputs, mask=ok, other=0.0).to(tl.float32)
            up = tl.load(bias_ptr + N + outputs, mask=ok, other=0.0).to(tl.float32)
            bias = tl.reshape(tl.join(gate, up), (2 * BLOCK_N,))
        else:
            bias = tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    return bias


@triton.jit
def load_residual(res_ptr, rows, row_ok, HAS_RES: tl.constexpr):
    """The residual rows ``gemv_epilogue`` adds, fp32: requested right after the wait, beside x, so the
    epilogue does not wait for one more round trip to memory after the products."""
    res = 0.0
    if HAS_RES:
        res = tl.load(res_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    return res


@triton.jit
def gemv_epilogue(y, block, rows, row_ok, N, bias, res, out_ptr,
                  HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, GATED: tl.constexpr, BLOCK_N: tl.constexpr):
    """Add the bias and residual (``load_bias``, ``load_residual``) in fp32, cast to the output dtype, store
    (row block ``block``).

    GATED: y holds BLOCK_N (gate, up) pairs; output silu(gate + b[n]) * (up + b[n + N]) in fp32.
    """
    if HAS_BIAS:
        y += bias
    if GATED:
        gate, up = tl.split(tl.reshape(y, (BLOCK_N, 2)))
        rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        y = gate * tl.sigmoid(gate) * up
    elif HAS_RES:
        y += res
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def finish_gemv(y, block, split, rows, row_ok, N, part_ptr, count_ptr, bias, res, out_ptr,
            SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
            GATED: tl.constexpr = False, BLOCK_N: tl.constexpr = 1):
    """Epilogue directly, or (split-K) publish this slice's partial and let the last slice to arrive sum them;
    ``bias`` and ``res`` as ``gemv_epilogue`` takes them.

    GATED: y is the program's 2 * BLOCK_N interleaved (gate, up) row sums; the partials of row
    block b sit at [2 * BLOCK_N * b, 2 * BLOCK_N * (b + 1)) of a 2N-wide slice.
    """
    if GATED:
        part_rows = block * (2 * BLOCK_N) + tl.arange(0, 2 * BLOCK_N)
        part_width = 2 * N
    else:
        part_rows = rows
        part_width = N
    if SPLITS > 1:
        tl.store(part_ptr + split * part_width + part_rows, y, mask=row_ok)
        tl.debug_barrier()  # every thread's partial is written before the release below
        arrived = tl.atomic_add(count_ptr + block, 1, sem="acq_rel")
        if arrived == SPLITS - 1:
            total = tl.zeros_like(y)
            for k_slice in tl.static_range(SPLITS):  # fixed order: deterministic sums
                total += tl.load(part_ptr + k_slice * part_width + part_rows, mask=row_ok, other=0.0,
                                 cache_modifier=".cg")
            gemv_epilogue(total, block, rows, row_ok, N, bias, res, out_ptr, HAS_BIAS, HAS_RES, GATED, BLOCK_N)
            tl.atomic_xchg(count_ptr + block, 0)  # ready for the next launch (and graph replay)
    else:
        gemv_epilogue(y, block, rows, row_ok, N, bias, res, out_ptr, HAS_BIAS, HAS_RES, GATED, BLOCK_N)


@triton.jit
def load_tile(w_ptr, s_ptr, z_ptr, w_offs, sz_offs, g0, tile_ok, WORDS: tl.constexpr, EVEN: tl.constexpr):
    """One tile's packed words [rows, groups, words] (streamed: evict first) and fp32 scales/zeros [rows, groups]."""
    if EVEN:
        w = tl.load(w_ptr + w_offs + g0 * WORDS, eviction_policy="evict_first")
        s = tl.load(s_ptr + sz_offs + g0)
        z = tl.load(z_ptr + sz_offs + g0)
    else:
        w = tl.load(w_ptr + w_offs + g0 * WORDS, mask=tile_ok[:, :, None], other=0, eviction_policy="evict_first")
        s = tl.load(s_ptr + sz_offs + g0, mask=tile_ok, other=0.0)
        z = tl.load(z_ptr + sz_offs + g0, mask=tile_ok, other=0.0)
    return w, s.to(tl.float32), z.to(tl.float32)


@triton.jit
def rms_rstd(x_ptr, K, eps, NORM_BLOCK: tl.constexpr, NORM_CHUNKS: tl.constexpr):
    """rsqrt(mean(x^2) + eps) over all K inputs, in fp32 (NORM_CHUNKS blocks of NORM_BLOCK, masked)."""
    offs = tl.arange(0, NORM_BLOCK)
    sq = tl.zeros((NORM_BLOCK,), dtype=tl.float32)
    for c in range(NORM_CHUNKS):
        v = tl.load(x_ptr + c * NORM_BLOCK + offs, mask=c * NORM_BLOCK + offs < K, other=0.0).to(tl.float32)
        sq += v * v
    return tl.rsqrt(tl.sum(sq, axis=0) / K + eps)


@triton.jit
def rms_normalize(x, rstd, nw):
    """As ``ffchat.model.rms_norm``: x * rstd rounded to x's dtype, times the norm weight, rounded again."""
    x_dtype = x.dtype
    return ((x.to(tl.float32) * rstd).to(x_dtype).to(tl.float32) * nw.to(tl.float32)).to(x_dtype)


@triton.jit
def _load_weights(w_ptr, s_ptr, z_ptr, w_offs, sz_offs, g0, row_ok, col, grp, words_per_row, groups_per_row,
                  WORDS: tl.constexpr, EVEN: tl.constexpr):
    """The [rows, words] packed tile from group g0 on (streamed: evict first), its scales and zeros [rows, groups]."""
    if EVEN:
        w = tl.load(w_ptr + w_offs + g0 * WORDS, eviction_policy="evict_first")
        s = tl.load(s_ptr + sz_offs + g0)
        z = tl.load(z_ptr + sz_offs + g0)
    else:  # chunks past K are fully masked
        col_ok = (g0 * WORDS + col) < words_per_row
        tile_ok = row_ok[:, None] & ((g0 + grp) < groups_per_row)[None, :]
        w = tl.load(w_ptr + w_offs + g0 * WORDS, mask=row_ok[:, None] & col_ok[None, :], other=0,
                    eviction_policy="evict_first")
        s = tl.load(s_ptr + sz_offs + g0, mask=tile_ok, other=0.0)
        z = tl.load(z_ptr + sz_offs + g0, mask=tile_ok, other=0.0)
    return w, s, z


@triton.jit
def tile_rows(block, N, BLOCK_N: tl.constexpr, GATED: tl.constexpr):
    """Row block ``block``'s weight rows and which of them exist (masks for N % BLOCK_N).

    GATED: N = I outputs from [gate; up] rows; tile row 2i is gate row n = first + i, tile row
    2i + 1 is up row n + N, so one x tile feeds both and the epilogue pairs them.
    """
    if GATED:
        r = tl.arange(0, 2 * BLOCK_N)
        out_rows = block * BLOCK_N + r // 2
        rows = out_rows + (r % 2) * N
        row_ok = out_rows < N
    else:
        rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
    return rows, row_ok


@triton.jit
def _tile_offsets(block, N, K, G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, W_ALIGN: tl.constexpr,
                  GATED: tl.constexpr):
    """Row block ``block``'s rows, their mask, and the offsets of its first [rows, words] tile in W, x and scales.

    A 2-D [rows, words] tile keeps each thread's 4 words contiguous (16-byte loads) and rows in
    registers; x arrives as one 16-byte load per word and is split into planes in registers.
    """
    GROUPS: tl.constexpr = BLOCK_K // G
    COLS: tl.constexpr = BLOCK_K // 8
    rows, row_ok = tile_rows(block, N, BLOCK_N, GATED)
    col = tl.arange(0, COLS)
    w_offs = rows[:, None] * tl.multiple_of(K // 8, W_ALIGN) + col[None, :]
    x_offs = col[:, None] * 8 + tl.arange(0, 8)[None, :]
    sz_offs = rows[:, None] * (K // G) + tl.arange(0, GROUPS)[None, :]
    return rows, row_ok, w_offs, x_offs, sz_offs


@triton.jit
def gemv_first_tile(block, split, w_ptr, s_ptr, z_ptr, N, K, CHUNKS: tl.constexpr, G: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, W_ALIGN: tl.constexpr, EVEN: tl.constexpr,
                    GATED: tl.constexpr):
    """The weights, scales and zeros of (row block, K slice)'s first tile: loadable before x exists.

    Under PDL that load overlaps the previous kernel's tail; in the whole-model kernel, the
    wait for the op before.
    """
    GROUPS: tl.constexpr = BLOCK_K // G
    rows, row_ok, w_offs, x_offs, sz_offs = _tile_offsets(block, N, K, G, BLOCK_N, BLOCK_K, W_ALIGN, GATED)
    return _load_weights(w_ptr, s_ptr, z_ptr, w_offs, sz_offs, split * CHUNKS * GROUPS, row_ok,
                         tl.arange(0, BLOCK_K // 8), tl.arange(0, GROUPS), K // 8, K // G, G // 8, EVEN)


@triton.jit
def gemv_norm_weights(nw_ptr, g0, K, G: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr, EVEN: tl.constexpr):
    """The norm weights [words, 8] of the tile from group g0 in x's tile layout (0.0 without NORM): weights, so
    requested before the PDL wait (or with the tile before), not after x's statistic as one more round trip."""
    nw = 0.0
    if NORM:
        col = tl.arange(0, BLOCK_K // 8)
        offs = col[:, None] * 8 + tl.arange(0, 8)[None, :] + g0 * G
        if EVEN:
            nw = tl.load(nw_ptr + offs)
        else:
            nw = tl.load(nw_ptr + offs, mask=(g0 * (G // 8) + col < K // 8)[:, None], other=0.0)
    return nw


@triton.jit
def gemv_accumulate(
    block, split, w, s, z, nw, x_ptr, w_ptr, s_ptr, z_ptr, N, K, high_mask, low_mask, one, nw_ptr, eps,
    CHUNKS: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, W_ALIGN: tl.constexpr,
    EVEN: tl.constexpr, NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, NORM_CHUNKS: tl.constexpr,
    GATED: tl.constexpr, PREFETCH: tl.constexpr,
):
    """fp32 row sums [TILE_N] of (row block, K slice) over its CHUNKS tiles, the first (w, s, z) and norm weights
    ``nw`` (``gemv_norm_weights``) already loaded.

    Each iteration requests the next tile before or after computing its own (``PREFETCH``).
    With NORM x is rms_norm(x) * nw, the statistic taken over all of K first.
    """
    GROUPS: tl.constexpr = BLOCK_K // G  # groups per tile
    WORDS: tl.constexpr = G // 8  # int32 words per group
    COLS: tl.constexpr = BLOCK_K // 8  # words per tile row
    TILE_N: tl.constexpr = 2 * BLOCK_N if GATED else BLOCK_N
    rows, row_ok, w_offs, x_offs, sz_offs = _tile_offsets(block, N, K, G, BLOCK_N, BLOCK_K, W_ALIGN, GATED)
    col = tl.arange(0, COLS)
    grp = tl.arange(0, GROUPS)
    words_per_row = K // 8
    groups_per_row = K // G
    first = split * CHUNKS * GROUPS
    if NORM:  # the whole vector's statistic first: every program needs it for its first tile
        rstd = rms_rstd(x_ptr, K, eps, NORM_BLOCK, NORM_CHUNKS)
    acc = tl.zeros((TILE_N, GROUPS), dtype=tl.float32)
    for c in range(CHUNKS):  # a constexpr trip count: the interpreter cannot loop to a runtime scalar
        g0 = first + c * GROUPS
        if EVEN:
            x8 = tl.load(x_ptr + x_offs + g0 * G)
        else:
            col_ok = (g0 * WORDS + col) < words_per_row
            x8 = tl.load(x_ptr + x_offs + g0 * G, mask=col_ok[:, None], other=0.0)
        w_now, s_now, z_now, nw_now = w, s, z, nw
        if NORM:
            if c + 1 < CHUNKS:
                nw = gemv_norm_weights(nw_ptr, g0 + GROUPS, K, G, BLOCK_K, NORM, EVEN)
        if PREFETCH:  # the next tile's loads fly while this one is computed
            if c + 1 < CHUNKS:
                w, s, z = _load_weights(w_ptr, s_ptr, z_ptr, w_offs, sz_offs, g0 + GROUPS, row_ok, col, grp,
                                        words_per_row, groups_per_row, WORDS, EVEN)
        if NORM:
            x8 = rms_normalize(x8, rstd, nw_now)
        x8 = x8.to(tl.float32)
        x0, x1, x2, x3, x4, x5, x6, x7 = _x_planes(x8, COLS)
        # Four moves put two nibbles each into the windows of _nibble_pair: planes 0-3 land high,
        # planes 4-7 low, so x of planes 4-7 is scaled by 16 to give every product the same q x / 16 term.
        high, low = _nibble_pair(w_now << 3, high_mask, low_mask, one)  # bits 16 and 12: planes 2, 5
        t = high * x2[None, :]
        t += low * (16.0 * x5)[None, :]
        high, low = _nibble_pair(w_now >> 5, high_mask, low_mask, one)  # bits 24 and 20: planes 3, 6
        t += high * x3[None, :]
        t += low * (16.0 * x6)[None, :]
        high, low = _nibble_pair(w_now << 11, high_mask, low_mask, one)  # bits 8 and 4: planes 1, 4
        t += high * x1[None, :]
        t += low * (16.0 * x4)[None, :]
        high, low = _nibble_pair(_rotate_left_19(w_now), high_mask, low_mask, one)  # bits 0 and 28: planes 0, 7
        t += high * x0[None, :]
        t += low * (16.0 * x7)[None, :]
        # Per group sum(v x') = X' + sum(q x) / 16 with X' the sum of x', and sum((q - z) x) = sum(q x) - z X.
        t_group = tl.sum(tl.reshape(t, (TILE_N, GROUPS, WORDS)), axis=2)
        # X and X' per group (of the normalized x) in one reduction, summed from the planes: a second
        # use of x8 made Triton split it twice, once through shared memory.
        x_high, x_low = (x0 + x1) + (x2 + x3), (x4 + x5) + (x6 + x7)
        x_word, x_scaled_word = x_high + x_low, x_high + 16.0 * x_low
        x_sums = tl.sum(tl.reshape(tl.join(x_word, x_scaled_word), (GROUPS, WORDS, 2)), axis=1)
        x_group, x_scaled_group = tl.split(x_sums)
        acc += s_now.to(tl.float32) * (16.0 * (t_group - x_scaled_group[None, :])
                                       - z_now.to(tl.float32) * x_group[None, :])
        if not PREFETCH:  # once this tile is used: one tile of registers
            if c + 1 < CHUNKS:
                w, s, z = _load_weights(w_ptr, s_ptr, z_ptr, w_offs, sz_offs, g0 + GROUPS, row_ok, col, grp,
                                        words_per_row, groups_per_row, WORDS, EVEN)
    return tl.sum(acc, axis=1)


@triton.jit
def _int4_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, res_ptr, out_ptr, part_ptr, count_ptr,
    N, K, high_mask, low_mask, one, nw_ptr, eps,
    CHUNKS: tl.constexpr, SPLITS: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    W_ALIGN: tl.constexpr, EVEN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, NORM_CHUNKS: tl.constexpr, GATED: tl.constexpr,
    PREFETCH: tl.constexpr, PDL: tl.constexpr, RELEASE_EARLY: tl.constexpr,
):
    """N outputs (GATED: N = I, weight rows [gate; up] = 2N); nw_ptr/eps are read only with NORM.

    RELEASE_EARLY: let the next kernel become resident before this one's input is ready (``ffchat.kernels.pdl``).
    """
    block, split = tl.program_id(0), tl.program_id(1)
    w, s, z = gemv_first_tile(block, split, w_ptr, s_ptr, z_ptr, N, K, CHUNKS, G, BLOCK_N, BLOCK_K, W_ALIGN, EVEN,
                              GATED)
    nw = gemv_norm_weights(nw_ptr, split * CHUNKS * (BLOCK_K // G), K, G, BLOCK_K, NORM, EVEN)
    rows, row_ok = tile_rows(block, N, BLOCK_N, GATED)
    bias = load_bias(bias_ptr, block, rows, row_ok, N, HAS_BIAS, GATED, BLOCK_N)
    if RELEASE_EARLY:
        release_dependents(PDL)
    wait_for_inputs(PDL)
    if not RELEASE_EARLY:
        release_dependents(PDL)
    res = load_residual(res_ptr, rows, row_ok, HAS_RES)
    y = gemv_accumulate(block, split, w, s, z, nw, x_ptr, w_ptr, s_ptr, z_ptr, N, K, high_mask, low_mask, one, nw_ptr,
                        eps, CHUNKS, G, BLOCK_N, BLOCK_K, W_ALIGN, EVEN, NORM, NORM_BLOCK, NORM_CHUNKS, GATED, PREFETCH)
    finish_gemv(y, block, split, rows, row_ok, N, part_ptr, count_ptr, bias, res, out_ptr,
                SPLITS, HAS_BIAS, HAS_RES, GATED, BLOCK_N)


@triton.jit
def _dp4a(a, b, c, USE_ASM: tl.constexpr):
    """c + sum of the 4 byte products, a's bytes unsigned, b's signed (PTX dp4a; plain ops in the interpreter)."""
    if USE_ASM:
        c = tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                      dtype=tl.int32, is_pure=True, pack=1)
    else:
        for byte in tl.static_range(4):
            c += ((a >> (8 * byte)) & 0xFF) * ((b << (24 - 8 * byte)) >> 24)
    return c


@triton.jit
def _int4_gemv_w4a8_kernel(
    xq_ptr, xs_ptr, xsum_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, res_ptr, out_ptr, part_ptr, count_ptr,
    N, K,
    CHUNKS: tl.constexpr, SPLITS: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    W_ALIGN: tl.constexpr, EVEN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, USE_ASM: tl.constexpr,
    GATED: tl.constexpr, PDL: tl.constexpr,
):
    """Same tiling as the W4A16 kernel; x is int8 words (xq_ptr as int32: word 2j = x[8j..8j+3]), per-group scale/sum.

    GATED: N = I outputs from [gate; up] rows, interleaved in the tile as in the W4A16 kernel.
    """
    GROUPS: tl.constexpr = BLOCK_K // G
    WORDS: tl.constexpr = G // 8
    TILE_N: tl.constexpr = 2 * BLOCK_N if GATED else BLOCK_N
    block, split = tl.program_id(0), tl.program_id(1)
    rows, row_ok = tile_rows(block, N, BLOCK_N, GATED)
    grp = tl.arange(0, GROUPS)
    word = tl.arange(0, WORDS)
    groups_per_row = K // G
    w_offs = rows[:, None, None] * tl.multiple_of(K // 8, W_ALIGN) + (grp * WORDS)[None, :, None] + word[None, None, :]
    xw_offs = 2 * ((grp * WORDS)[:, None] + word[None, :])
    sz_offs = rows[:, None] * groups_per_row + grp[None, :]
    bias = load_bias(bias_ptr, block, rows, row_ok, N, HAS_BIAS, GATED, BLOCK_N)
    wait_for_inputs(PDL)
    release_dependents(PDL)
    res = load_residual(res_ptr, rows, row_ok, HAS_RES)

    acc = tl.zeros((TILE_N, GROUPS), dtype=tl.float32)
    for c in range(CHUNKS):
        g0 = (split * CHUNKS + c) * GROUPS
        g_ok = (g0 + grp) < groups_per_row
        w, s, z = load_tile(w_ptr, s_ptr, z_ptr, w_offs, sz_offs, g0, row_ok[:, None] & g_ok[None, :], WORDS, EVEN)
        xlo = tl.load(xq_ptr + xw_offs + 2 * g0 * WORDS, mask=g_ok[:, None], other=0)
        xhi = tl.load(xq_ptr + xw_offs + (2 * g0 * WORDS + 1), mask=g_ok[:, None], other=0)
        d = _dp4a(w & 0x0F0F0F0F, xlo[None, :, :], tl.zeros_like(w), USE_ASM)
        d = _dp4a((w >> 4) & 0x0F0F0F0F, xhi[None, :, :], d, USE_ASM)
        xs = tl.load(xs_ptr + g0 + grp, mask=g_ok, other=0.0)
        xq_sum = tl.load(xsum_ptr + g0 + grp, mask=g_ok, other=0.0)
        acc += s * xs[None, :] * (tl.sum(d, axis=2).to(tl.float32) - z * xq_sum[None, :])
    finish_gemv(tl.sum(acc, axis=1), block, split, rows, row_ok, N, part_ptr, count_ptr, bias, res, out_ptr,
                SPLITS, HAS_BIAS, HAS_RES, GATED, BLOCK_N)


@triton.jit
def _quantize_x_kernel(x_ptr, xq_ptr, xs_ptr, xsum_ptr, nw_ptr, num_groups, K, eps, G: tl.constexpr,
                       BLOCK_G: tl.constexpr, NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, NORM_CHUNKS: tl.constexpr):
    """Symmetric int8 per group of G: scale = max|x| / 127, q = floor(x / scale + 0.5); also sum(q) per group.

    NORM: quantize rms_norm(x) * nw instead, rounded to x's dtype as the W4A16 kernel's fused norm does.
    """
    grp = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    ok = grp < num_groups
    offs = grp[:, None] * G + tl.arange(0, G)[None, :]
    x = tl.load(x_ptr + offs, mask=ok[:, None], other=0.0)
    if NORM:  # every program sums x^2 over all of K first (x is small and in L2)
        rstd = rms_rstd(x_ptr, K, eps, NORM_BLOCK, NORM_CHUNKS)
        x = rms_normalize(x, rstd, tl.load(nw_ptr + offs, mask=ok[:, None], other=0.0))
    x = x.to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-30) / 127.0
    q = tl.minimum(tl.maximum(tl.floor(x / scale[:, None] + 0.5), -127.0), 127.0)
    tl.store(xq_ptr + offs, q.to(tl.int8), mask=ok[:, None])
    tl.store(xs_ptr + grp, scale, mask=ok)
    tl.store(xsum_ptr + grp, tl.sum(q, axis=1), mask=ok)


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter runs programs one at a time)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _arrival_counters(device: torch.device, needed: int) -> torch.Tensor:
    """Zeroed per-row-block arrival counters, kept per device; each launch leaves them zero again.

    Allocated on first use, so make one call before capturing a CUDA graph.
    """
    counters = _COUNTERS.get(device)
    if counters is None or counters.numel() < needed:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("int4_gemv: call it once before CUDA graph capture (split-K counters are allocated lazily)")
        counters = torch.zeros(max(needed, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = counters
    return counters


def check_gemv_inputs(x, qweight, scales, zeros, group_size, bias, residual, out, *, gated=False,
                  norm_weight=None) -> tuple[int, int]:
    """(outputs, K): N, or I = N / 2 with ``gated``."""
    if x.dim() != 1 or x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"x must be a 1-D fp16/bf16 vector, got {tuple(x.shape)} {x.dtype}")
    n, k = check_packed(qweight, scales, zeros, group_size)
    if x.numel() != k:
        raise ValueError(f"x has {x.numel()} elements, qweight expects K={k}")
    n_out = n
    if gated:
        if n % 2:
            raise ValueError(f"gated needs [gate; up] weight rows (an even N), got N={n}")
        if residual is not None:
            raise ValueError("residual cannot be combined with gated (the SwiGLU output is a new activation)")
        n_out = n // 2
    for name, t, rows in (("bias", bias, n), ("residual", residual, n_out)):
        if t is not None and tuple(t.shape) != (rows,):
            raise ValueError(f"{name} must be [{rows}], got {tuple(t.shape)}")
    if norm_weight is not None and (tuple(norm_weight.shape) != (k,) or not norm_weight.is_floating_point()):
        raise ValueError(f"norm_weight must be a float [{k}] vector, got {tuple(norm_weight.shape)} {norm_weight.dtype}")
    if out is not None and (tuple(out.shape) != (n_out,) or out.dtype not in (x.dtype, torch.float32)
                            or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous [{n_out}] {x.dtype} or float32 tensor")
    tensors = [t for t in (x, qweight, scales, zeros, bias, residual, norm_weight, out) if t is not None]
    if any(t.device != x.device for t in tensors):
        raise ValueError("all tensors must be on one device")
    return n_out, k


def launch_gemv(kernel, inputs, n, k, group_size, cfg, bias, residual, out, dtype, device, extra_args=(),
                part_rows=None, loops_rows=False, **extra):
    """Shared launcher: grid of (row blocks, K slices), workspace for split-K, dummy pointers for absent tensors.

    n is the number of outputs; ``part_rows`` (default n) the width of a split-K partial. ``loops_rows``: the
    kernel takes (row blocks, programs) after ``extra_args`` and LOOP_ROWS, for ``cfg.programs_per_sm``.
    """
    if cfg.block_k % group_size:
        raise ValueError(f"block_k {cfg.block_k} must be a multiple of the group size {group_size}")
    if cfg.programs_per_sm and not loops_rows:
        raise ValueError("programs_per_sm is a dp2a option")
    if cfg.programs_per_sm and (cfg.block_k < k or cfg.split_k > 1):
        raise ValueError(f"programs_per_sm needs all of K={k} in one tile, got block_k {cfg.block_k}, "
                         f"split_k {cfg.split_k}")
    if out is None:
        out = torch.empty(n, dtype=dtype, device=device)
    chunks = triton.cdiv(k, cfg.block_k)
    chunks_per_split = triton.cdiv(chunks, cfg.split_k)
    num_splits = triton.cdiv(chunks, chunks_per_split)
    row_blocks = triton.cdiv(n, cfg.block_n)
    programs = min(row_blocks, cfg.programs_per_sm * sm_count(device)) if cfg.programs_per_sm else row_blocks
    if loops_rows:
        extra_args = (*extra_args, row_blocks, programs)
        extra["LOOP_ROWS"] = bool(cfg.programs_per_sm)
    split = num_splits > 1
    partials = torch.empty((num_splits, part_rows or n), dtype=torch.float32, device=device) if split else out
    counters = _arrival_counters(device, row_blocks) if split else out
    kernel[(programs, num_splits)](
        *inputs,
        bias if bias is not None else out, residual if residual is not None else out,
        out, partials, counters,
        n, k, *extra_args,
        CHUNKS=chunks_per_split, SPLITS=num_splits, G=group_size, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        W_ALIGN=4 if (k // 8) % 4 == 0 else 1,
        EVEN=(n % cfg.block_n == 0 and k == cfg.block_k * chunks_per_split * num_splits),
        HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **extra, **launch_options(device),
        **({"maxnreg": cfg.max_registers} if cfg.max_registers else {}),
    )
    return out


def int4_gemv(
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
    """y[N] = dequant(W) @ x (+ bias) (+ residual) in x's dtype; ``config`` overrides the tuning table.

    ``norm_weight`` [K]: use ``ffchat.model.rms_norm(x, norm_weight, norm_eps)`` as the input.
    ``gated``: W is [2I, K] = [gate rows; up rows] (scales, zeros, bias likewise [2I, ...]) and
    y[I] = silu(gate x + b_gate) * (up x + b_up), in fp32, rounded once; no ``residual``.
    ``release_early``: under PDL, release the next launch before waiting for x (the order the
    O projection uses; ``ffchat.kernels.pdl`` says why only it).
    Split-K launches share per-device counters: launch them from one stream at a time.
    """
    n, k = check_gemv_inputs(x, qweight, scales, zeros, group_size, bias, residual, out, gated=gated,
                         norm_weight=norm_weight)
    cfg = config or pick_config(qweight.shape[0], k, group_size, gated=gated, device=x.device)
    inputs = tuple(t.contiguous() for t in (x, qweight, scales, zeros))
    norm_args, norm = fused_norm(inputs[0], norm_weight, norm_eps)
    return launch_gemv(_int4_gemv_kernel, inputs, n, k, group_size, cfg, bias, residual, out, x.dtype, x.device,
                   extra_args=(HIGH_NIBBLE, LOW_NIBBLE, ONE_F32) + norm_args, part_rows=qweight.shape[0],
                   GATED=gated, PREFETCH=cfg.prefetch, RELEASE_EARLY=release_early, **norm)


def fused_norm(x: torch.Tensor, norm_weight: torch.Tensor | None, norm_eps: float) -> tuple[tuple, dict]:
    """A GEMV launch's RMSNorm arguments (norm weight, eps) and constants (NORM, NORM_BLOCK, NORM_CHUNKS).

    With a norm the statistic takes one pass over K <= 4096 (few serial L2 round trips); without one the
    constants are fixed, so the plain kernel is compiled once whatever K is (x stands in for the weight).
    """
    if norm_weight is None:
        return (x, 0.0), {"NORM": False, "NORM_BLOCK": 1, "NORM_CHUNKS": 0}
    k = x.numel()
    norm_block = min(triton.next_power_of_2(k), 4096)
    return (norm_weight.contiguous(), float(norm_eps)), {"NORM": True, "NORM_BLOCK": norm_block,
                                                         "NORM_CHUNKS": triton.cdiv(k, norm_block)}


def int4_gemv_reference(
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
    """Plain torch: [rms_norm,] dequantize to fp32, matmul in fp32, epilogue in fp32, cast to x's dtype.

    The epilogue adds bias/residual, or with ``gated`` returns silu(gate + b_gate) * (up + b_up).
    """
    x_in = x if norm_weight is None else rms_norm(x, norm_weight, norm_eps).to(x.dtype)
    y = dequantize(qweight, scales, zeros, group_size) @ x_in.float()
    return gemv_reference_epilogue(y, bias, residual, gated, x.dtype)


def gemv_reference_epilogue(y: torch.Tensor, bias, residual, gated: bool, dtype: torch.dtype) -> torch.Tensor:
    """The references' epilogue in fp32, one final rounding: + bias + residual, or silu(gate) * up when gated."""
    if gated and residual is not None:
        raise ValueError("residual cannot be combined with gated")
    if bias is not None:
        y = y + bias.float()
    if gated:
        gate, up = y.chunk(2)
        return (torch.nn.functional.silu(gate) * up).to(dtype)
    if residual is not None:
        y = y + residual.float()
    return y.to(dtype)


class Int8Activation(NamedTuple):
    """x quantized per group of G: int8 codes [K], fp32 scales [K // G] and code sums [K // G]."""

    codes: torch.Tensor
    scales: torch.Tensor
    sums: torch.Tensor
    dtype: torch.dtype  # the dtype of the x it came from: the GEMV's output dtype


def quantize_activation(x: torch.Tensor, group_size: int, *, norm_weight: torch.Tensor | None = None,
                        norm_eps: float = 1e-6) -> Int8Activation:
    """One launch; reuse the result for every W4A8 GEMV that reads the same x (q/k/v, gate/up).

    ``norm_weight``: quantize ``ffchat.model.rms_norm(x, norm_weight, norm_eps)`` (in x's dtype) instead.
    """
    k = x.numel()
    if x.dim() != 1 or x.dtype not in (torch.float16, torch.bfloat16) or k % group_size or k % 8:
        raise ValueError(f"x must be a 1-D fp16/bf16 vector whose length is a multiple of {group_size} and 8")
    if norm_weight is not None and tuple(norm_weight.shape) != (k,):
        raise ValueError(f"norm_weight must be a [{k}] vector, got {tuple(norm_weight.shape)}")
    num_groups = k // group_size
    act = Int8Activation(
        torch.empty(k, dtype=torch.int8, device=x.device),
        torch.empty(num_groups, dtype=torch.float32, device=x.device),
        torch.empty(num_groups, dtype=torch.float32, device=x.device),
        x.dtype,
    )
    block_g = max(1, min(triton.next_power_of_2(num_groups), 4096 // group_size))
    norm_block = min(triton.next_power_of_2(k), 4096)
    x = x.contiguous()
    _quantize_x_kernel[(triton.cdiv(num_groups, block_g),)](
        x, act.codes, act.scales, act.sums, norm_weight.contiguous() if norm_weight is not None else x,
        num_groups, k, float(norm_eps), G=group_size, BLOCK_G=block_g, NORM=norm_weight is not None,
        NORM_BLOCK=norm_block, NORM_CHUNKS=triton.cdiv(k, norm_block),
    )
    return act


def quantize_activation_reference(x: torch.Tensor, group_size: int, *, norm_weight: torch.Tensor | None = None,
                                  norm_eps: float = 1e-6) -> Int8Activation:
    """Plain torch version of ``quantize_activation`` (same rounding: floor(x / scale + 0.5))."""
    x_in = x if norm_weight is None else rms_norm(x, norm_weight, norm_eps).to(x.dtype)
    codes, scales = int8_codes(x_in, group_size)
    return Int8Activation(codes.to(torch.int8).view(-1), scales, codes.sum(dim=1), x.dtype)


def int4_gemv_w4a8(
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
    act: Int8Activation | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    gated: bool = False,
) -> torch.Tensor:
    """Opt-in W4A8: x quantized to int8 per group of G (or ``act``, already quantized), dp4a products.

    ``norm_weight`` (ignored with ``act``) and ``gated`` as in ``int4_gemv``: the RMSNorm runs in
    the quantizing launch, the SwiGLU in the GEMV's epilogue. Costs ~1e-2 relative error against
    fp16 activations; measure perplexity before choosing it.
    """
    n, k = check_gemv_inputs(x, qweight, scales, zeros, group_size, bias, residual, out, gated=gated,
                         norm_weight=norm_weight)
    act = act or quantize_activation(x, group_size, norm_weight=norm_weight, norm_eps=norm_eps)
    cfg = config or pick_config(qweight.shape[0], k, group_size, gated=gated, w4a8=True, device=x.device)
    if cfg.prefetch:
        raise ValueError("prefetch is a W4A16 option; the W4A8 kernel has none")
    inputs = (act.codes.view(torch.int32), act.scales, act.sums) + tuple(t.contiguous() for t in (qweight, scales, zeros))
    use_asm = not interpreted(_int4_gemv_w4a8_kernel)  # inline asm cannot be interpreted
    return launch_gemv(_int4_gemv_w4a8_kernel, inputs, n, k, group_size, cfg, bias, residual, out, act.dtype, x.device,
                   part_rows=qweight.shape[0], USE_ASM=use_asm, GATED=gated)


def int4_gemv_w4a8_reference(
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
    """W4A16 reference applied to the int8-rounded x (what the W4A8 kernel computes exactly, up to fp32 sums)."""
    act = quantize_activation_reference(x, group_size, norm_weight=norm_weight, norm_eps=norm_eps)
    x_rounded = (act.codes.float().view(-1, group_size) * act.scales[:, None]).view(-1)
    y = dequantize(qweight, scales, zeros, group_size) @ x_rounded
    return gemv_reference_epilogue(y, bias, residual, gated, x.dtype)
