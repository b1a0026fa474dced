"""Batch-1 INT4 GEMV, a word a lane: no barrier in the loop.

Computes what ``int4_gemv`` does (y = W x + bias + residual, W4A16, the same nibble-to-float trick, the
fused RMSNorm and SwiGLU) for 16 rows a program, but tiles the weights as [words, rows]: lane l of the
program holds word j of the tile for all 16 rows. Why (BENCHMARKS.md, stop 33): compiled for sm_90, the
[rows, words] tile of ``int4_gemv`` moves x's nibble planes into its layout through shared memory and sums
each group across lanes and warps, 26 block-wide barriers every 2048 inputs on the 8B down; here a lane
loads its word's 8 inputs with one 16-byte load and splits them in registers (the same lane-to-word map as
the weights), and nothing crosses lanes until the group sums:

* Per word and row, t starts at minus the planes' big term (16 X' with X' as in ``int4_gemv``) and 8
  FFMAs add v x with x scaled by 16 (planes 0-3) or 256 (planes 4-7), leaving sum(q x) over the word.
* A group (128 inputs, 16 words) is 16 lanes. Its 16 rows' sums are reduced with a transposing
  butterfly: each of four steps sends half of a lane's row partials to the partner lane (``shfl.bfly``)
  and adds the other half, 15 shuffles in all, and lane l ends with row bitrev4(l % 16)'s group sum.
  So a lane loads one scale and one zero a group, not sixteen of each, and applies them once.
* The shuffles act on hardware lanes, so the weight tile must put word j on lane j % 32: ``col`` is
  declared non-contiguous (``tl.max_contiguous(.., 1)``), which makes Triton lay the tile out a word a
  lane with the rows in registers (checked for sm_90 by a test). The interpreter swaps words instead.
* The chunk loop is unrolled (``tl.static_range``): every load addresses its row pointer plus a constant,
  so the loop spends no instructions on addresses.
* Fused RMSNorm (``norm_weight``): the statistic over all of K first (``rms_rstd``, as ``int4_gemv``), then each
  chunk's x is normalized in the lanes that load it. SwiGLU (``gated``): a program's 16 rows are 8 gate rows and
  the 8 matching up rows, so after the folds a gate row's sum and its up row's sit in neighbouring positions.

Restrictions, checked by the launcher: group size 128 (a group is 16 lanes, and 16 rows a program),
N a multiple of 16 weight rows, K a multiple of ``block_k``, and ``block_k`` / 8 words exactly one a lane of the
program's warps (the layout the shuffles rely on, and the one the sm_90 test checks).
``ffchat tune`` offers it to the GEMVs where it can apply.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ffchat.kernels.int4_gemv import (
    HIGH_NIBBLE, LOW_NIBBLE, ONE_F32, GemvConfig, _nibble_pair, _rotate_left_19, _x_planes, check_gemv_inputs,
    fused_norm, rms_normalize, rms_rstd,
)
from ffchat.kernels.interpreter import interpreted
from ffchat.kernels.pdl import launch_options, release_dependents, wait_for_inputs

LANE_ROWS = 16  # rows a program: one per lane of a 128-input group
LANE_GROUP = 128  # the only group size: 16 words, 16 lanes
_ROWS = tl.constexpr(LANE_ROWS)  # as the kernels see them (a jit function reads only constexpr globals)
_GROUP = tl.constexpr(LANE_GROUP)


@triton.jit
def _partner(v, MASK: tl.constexpr, COLS: tl.constexpr, R: tl.constexpr, USE_ASM: tl.constexpr):
    """v [COLS, R] as lane (word) col ^ MASK holds it: a butterfly shuffle, or a swap of words in the interpreter."""
    if USE_ASM:
        out = tl.inline_asm_elementwise(f"shfl.sync.bfly.b32 $0, $1, {MASK}, 0x1f, 0xffffffff;", "=f,f", [v],
                                        dtype=tl.float32, is_pure=True, pack=1)
    else:
        out = tl.reshape(tl.flip(tl.reshape(v, (COLS // (2 * MASK), 2, MASK, R)), 1), (COLS, R))
    return out


@triton.jit
def _fold(v, lane_bit, MASK: tl.constexpr, COLS: tl.constexpr, R: tl.constexpr, USE_ASM: tl.constexpr):
    """One transposing butterfly step, [COLS, R] -> [COLS, R // 2]: lanes with ``lane_bit`` keep their odd rows and
    send the even ones to lane ^ MASK, the others the reverse; each adds what it keeps to what it receives."""
    even, odd = tl.split(tl.reshape(v, (COLS, R // 2, 2)))
    keep = tl.where(lane_bit, odd, even)
    send = tl.where(lane_bit, even, odd)
    return keep + _partner(send, MASK, COLS, R // 2, USE_ASM)


@triton.jit
def _lane_tile(w_ptr, s_ptr, z_ptr, w_offs, sz_offs, g0, WORDS: tl.constexpr):
    """The tile from group g0 on: a word of each of the 16 rows a lane (streamed: evict first), and the scale and
    zero of each lane's row and group."""
    w = tl.load(w_ptr + w_offs + g0 * WORDS, eviction_policy="evict_first")
    return w, tl.load(s_ptr + sz_offs + g0), tl.load(z_ptr + sz_offs + g0)


@triton.jit
def _bitrev4(i):
    """i's low four bits reversed: the row a lane holds after the four folds."""
    return ((i & 1) << 3) | ((i & 2) << 1) | ((i & 4) >> 1) | ((i & 8) >> 3)


@triton.jit
def _weight_rows(r, block, HALF: tl.constexpr, GATED: tl.constexpr):
    """The weight row of program ``block``'s tile row r (0-15): rows 16 block + r, or (GATED, [gate; up] rows with
    HALF gate rows) gate row 8 block + r for r < 8 and the matching up row HALF + 8 block + r - 8."""
    if GATED:
        rows = block * (_ROWS // 2) + r % (_ROWS // 2) + (r // (_ROWS // 2)) * HALF
    else:
        rows = block * _ROWS + r
    return rows


@triton.jit
def _lane_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, res_ptr, out_ptr, high_mask, low_mask, one, nw_ptr, eps,
    K: tl.constexpr, HALF: tl.constexpr, CHUNKS: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr, NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, NORM_CHUNKS: tl.constexpr,
    GATED: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr, RELEASE_EARLY: tl.constexpr,
    USE_ASM: tl.constexpr,
):
    """Rows 16 p .. 16 p + 15 of y for program p (GATED: outputs 8 p .. 8 p + 7 from their gate and up rows);
    K a constant, so every tile's loads are row pointer + offset."""
    ROWS: tl.constexpr = _ROWS
    WORDS: tl.constexpr = _GROUP // 8  # words a group: one a row
    COLS: tl.constexpr = BLOCK_K // 8  # words a tile: one a lane
    GROUPS: tl.constexpr = BLOCK_K // _GROUP
    block = tl.program_id(0)
    rows = _weight_rows(tl.arange(0, ROWS), block, HALF, GATED)
    col = tl.max_contiguous(tl.arange(0, COLS), 1)  # no 16-byte vectors along a row: a word a lane
    w_offs = col[:, None] + rows[None, :] * (K // 8)
    x_offs = tl.arange(0, COLS)[:, None] * 8 + tl.arange(0, 8)[None, :]
    lane = tl.arange(0, COLS) % WORDS
    # a lane's scale and zero: those of the row it holds after the folds, in its word's group
    sz_offs = _weight_rows(_bitrev4(lane), block, HALF, GATED) * (K // _GROUP) + tl.arange(0, COLS) // WORDS
    bit3 = (lane & 8)[:, None] != 0
    bit2 = (lane & 4)[:, None] != 0
    bit1 = (lane & 2)[:, None] != 0
    bit0 = (lane & 1)[:, None] != 0
    w, s, z = _lane_tile(w_ptr, s_ptr, z_ptr, w_offs, sz_offs, 0, WORDS)
    out_rows = _bitrev4(tl.arange(0, WORDS))  # tile row of each lane of a group, after the folds
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + _weight_rows(out_rows, block, HALF, GATED)).to(tl.float32)
    if RELEASE_EARLY:
        release_dependents(PDL)
    wait_for_inputs(PDL)
    if not RELEASE_EARLY:
        release_dependents(PDL)
    res = 0.0
    if HAS_RES:
        res = tl.load(res_ptr + block * ROWS + out_rows).to(tl.float32)
    rstd = 0.0
    if NORM:  # the whole vector's statistic first: every program needs it for its first chunk
        rstd = rms_rstd(x_ptr, K, eps, NORM_BLOCK, NORM_CHUNKS)
    acc = tl.zeros((COLS,), dtype=tl.float32)
    for c in tl.static_range(CHUNKS):
        g0 = c * GROUPS
        x8 = tl.load(x_ptr + x_offs + g0 * _GROUP)
        if NORM:
            x8 = rms_normalize(x8, rstd, tl.load(nw_ptr + x_offs + g0 * _GROUP))
        x8 = x8.to(tl.float32)
        w_now, s_now, z_now = w, s, z
        if c + 1 < CHUNKS:
            if PREFETCH:  # the next tile's loads fly while this one is computed
                w, s, z = _lane_tile(w_ptr, s_ptr, z_ptr, w_offs, sz_offs, g0 + GROUPS, WORDS)
        x0, x1, x2, x3, x4, x5, x6, x7 = _x_planes(x8, COLS)
        x_high, x_low = (x0 + x1) + (x2 + x3), (x4 + x5) + (x6 + x7)
        # As in int4_gemv, planes 0-3 land in the 1 + q/16 window and 4-7 in 1 + q/256; x is scaled by 16 and
        # 256 so that t = sum(q x) after starting from minus the planes' big term.
        t = tl.zeros((COLS, ROWS), dtype=tl.float32) - (16.0 * x_high + 256.0 * x_low)[:, None]
        high, low = _nibble_pair(w_now << 3, high_mask, low_mask, one)  # planes 2, 5
        t += high * (16.0 * x2)[:, None]
        t += low * (256.0 * x5)[:, None]
        high, low = _nibble_pair(w_now >> 5, high_mask, low_mask, one)  # planes 3, 6
        t += high * (16.0 * x3)[:, None]
        t += low * (256.0 * x6)[:, None]
        high, low = _nibble_pair(w_now << 11, high_mask, low_mask, one)  # planes 1, 4
        t += high * (16.0 * x1)[:, None]
        t += low * (256.0 * x4)[:, None]
        high, low = _nibble_pair(_rotate_left_19(w_now), high_mask, low_mask, one)  # planes 0, 7
        t += high * (16.0 * x0)[:, None]
        t += low * (256.0 * x7)[:, None]
        t = _fold(t, bit3, 8, COLS, 16, USE_ASM)
        t = _fold(t, bit2, 4, COLS, 8, USE_ASM)
        t = _fold(t, bit1, 2, COLS, 4, USE_ASM)
        t = _fold(t, bit0, 1, COLS, 2, USE_ASM)  # [COLS, 1]: sum(q x) of lane l's row over its group
        x_group = (x_high + x_low)[:, None]  # the group's sum of x, on every lane of it
        x_group += _partner(x_group, 8, COLS, 1, USE_ASM)
        x_group += _partner(x_group, 4, COLS, 1, USE_ASM)
        x_group += _partner(x_group, 2, COLS, 1, USE_ASM)
        x_group += _partner(x_group, 1, COLS, 1, USE_ASM)
        # sum((q - z) x) = sum(q x) - z X
        acc += s_now.to(tl.float32) * tl.reshape(t - z_now.to(tl.float32)[:, None] * x_group, (COLS,))
        if c + 1 < CHUNKS:
            if not PREFETCH:  # once this tile is used: one tile of registers
                w, s, z = _lane_tile(w_ptr, s_ptr, z_ptr, w_offs, sz_offs, g0 + GROUPS, WORDS)
    y = tl.sum(tl.reshape(acc, (GROUPS, WORDS)), axis=0)  # position i: tile row bitrev4(i)
    y += bias
    if GATED:  # tile rows r and r + 8 (gate and up of one output) are positions 2j and 2j + 1
        gate, up = tl.split(tl.reshape(y, (WORDS // 2, 2)))
        tl.store(out_ptr + block * (ROWS // 2) + _bitrev4(2 * tl.arange(0, WORDS // 2)),
                 (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty))
    else:
        y += res
        tl.store(out_ptr + block * ROWS + out_rows, y.to(out_ptr.dtype.element_ty))


def lane_gemv_fits(n: int, k: int, group_size: int, config: GemvConfig, *, gated: bool = False) -> bool:
    """Whether ``int4_gemv_lanes`` runs N x K (N weight rows) with this tile (see the module doc's restrictions);
    ``gated``: block_n counts outputs, a gate and an up row each."""
    rows = 2 * config.block_n if gated else config.block_n
    return (group_size == LANE_GROUP and rows == LANE_ROWS and n % LANE_ROWS == 0
            and config.block_k == 256 * config.num_warps and k % config.block_k == 0 and config.split_k == 1
            and not config.programs_per_sm and config.num_stages == 1)


def int4_gemv_lanes(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    *,
    config: GemvConfig,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    release_early: bool = False,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    gated: bool = False,
) -> torch.Tensor:
    """``int4_gemv``'s result (bias, residual, ``norm_weight``, ``gated``, ``release_early`` as there), a word a
    lane; ``config.prefetch`` requests the next tile before computing the current one. A shape or tile outside
    ``lane_gemv_fits`` is an error."""
    n_out, k = check_gemv_inputs(x, qweight, scales, zeros, group_size, bias, residual, out, gated=gated,
                                 norm_weight=norm_weight)
    n = qweight.shape[0]
    if not lane_gemv_fits(n, k, group_size, config, gated=gated):
        raise ValueError(f"int4_gemv_lanes: N={n}, K={k}, group {group_size} with {config} is outside what it runs "
                         f"(group 128, 16 rows a program (gated: 8 outputs), N a multiple of 16, K a multiple of "
                         f"block_k, block_k 256 a warp, one K slice)")
    if out is None:
        out = torch.empty(n_out, dtype=x.dtype, device=x.device)
    x, qweight, scales, zeros = (t.contiguous() for t in (x, qweight, scales, zeros))
    norm_args, norm = fused_norm(x, norm_weight, norm_eps)
    _lane_gemv_kernel[(n // LANE_ROWS,)](
        x, qweight, scales, zeros, bias if bias is not None else out, residual if residual is not None else out, out,
        HIGH_NIBBLE, LOW_NIBBLE, ONE_F32, *norm_args, K=k, HALF=n // 2 if gated else 0, CHUNKS=k // config.block_k,
        BLOCK_K=config.block_k, HAS_BIAS=bias is not None, HAS_RES=residual is not None, GATED=gated, **norm,
        PREFETCH=config.prefetch, RELEASE_EARLY=release_early,
        USE_ASM=not interpreted(_lane_gemv_kernel),  # inline asm cannot be interpreted
        num_warps=config.num_warps, **launch_options(x.device),
        **({"maxnreg": config.max_registers} if config.max_registers else {}),
    )
    return out
