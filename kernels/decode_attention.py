"""Batch-1 decode attention over a KV cache (GQA, optional sliding window), split along the keys.

The token at position length-1 attends to keys 0..length-1 of a [Hkv, S, D] cache; query
head h reads KV head h // (Hq // Hkv), as in ``ffchat.model``. Its own q, k and v arrive as
the fused QKV projection row. Two launches (flash-decoding):

* ``_partial_kernel``, grid (Hkv, splits): each program takes one KV head and one share of
  the attended keys, and runs all Hq / Hkv query heads of the group at once (padded to 16
  rows for ``tl.dot``), so K and V are read from memory once per group. It normalizes
  (Qwen3) and rotates its q heads itself, and the program whose share ends at the new token
  rotates that token's key, appends key and value to the cache and attends to them from
  registers: RoPE and the KV append cost no launch of their own. Online softmax in fp32
  over BLOCK_N keys per step; it writes the share's running max, sum of exponentials and
  unnormalised output to the workspace.
* ``_reduce_kernel``, grid (Hq,): combines the shares with the log-sum-exp rule.

The whole-model kernel calls the partial's two halves (``attention_prefetch``,
``attention_share``) with COMBINE: there the last share of a KV head to finish (an atomic
arrival counter) combines the group's shares itself, as a reduce op would cost a wait of
every program. Standalone, the same in-launch combine measured slower than the reduce launch
on an H200 (8B step 2025 vs 1961 us at context 512; BENCHMARKS.md, 2026-12-02) and again, with
the one-pass combine, on an H100 (1B 591.5 vs 573.5 us at 4096; stop 20): the reduce runs Hq
programs in parallel and overlaps the next launch under PDL.

Why the split is dynamic: ``length`` is a device tensor (so one captured CUDA graph serves
every position), the grid is fixed by the cache capacity, and the kernel divides the keys
actually attended into ``splits`` equal BLOCK_N-rounded shares. Short contexts still spread
over several programs, long ones over all of them; shares past the end do nothing and the
combine reads only the shares that attended keys, so nothing has to be written for the others
and a short context in a long cache pays for two shares, not for the whole grid. No host
sync, no allocation when a workspace is given.

Under PDL (``ffchat.kernels.pdl``) each program requests its first block (or two, see
``pick_config``) of cached keys and values, and the RoPE row, before waiting for the QKV
projection: no kernel of the step writes them (the new token's slot is never read from the
cache), so the loads overlap the previous kernel's tail. On an H200 that made the fused step
faster than a separate RoPE launch; with the loads after the wait it was slower
(BENCHMARKS.md, 2026-12-02). Both launches release their dependents before they wait, as the
O projection after them does (the other GEMVs release after): the reduce and then the O
projection become resident while the shares run, and the O projection's first weight tile is
requested under attention (on an H100, Qwen2.5-0.5B at 4096 cached tokens 3-4% faster,
Llama-3.2-1B and 3.1-8B about 1%; BENCHMARKS.md, stop 23).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ffchat.kernels.interpreter import interpreted
from ffchat.kernels.pdl import launch_options, release_dependents, wait_for_inputs
from ffchat.kernels.rope_kv import norm_rope_rows, rope_kv_append_reference

LOG2E = 1.4426950408889634
MIN_HEAD_ROWS = 16  # tl.dot needs at least 16 rows: a GQA group is padded up to it
COMBINE_VALUES = 8192  # partial outputs one combine step holds: 64 fp32 registers a thread in 4 warps


@dataclass(frozen=True)
class DecodeAttentionConfig:
    """Grid (Hkv, splits), fixed by the cache; each split takes an equal, block_n-rounded share of the keys."""

    splits: int = 32
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    prefetch_blocks: int = 1  # blocks of cached keys a share requests before waiting for qkv


def pick_config(max_seq_len: int, num_kv_heads: int = 1, head_dim: int = 64, *, num_sms: int | None = None,
                min_chunk: int = 128, block_n: int = 64) -> DecodeAttentionConfig:
    """Enough programs for ~2 per SM at full length, but no share of a full cache below ``min_chunk`` keys.

    ``num_kv_heads=1`` sizes for the worst case (most splits). Heads of 128 dims or more get 8
    warps: on an H200 the 8B step at context 128-2048 ran 2-3% faster with 8 than with 4,
    the 64-dim 1B step 1-3% slower (BENCHMARKS.md, 2026-12-02).

    Two blocks of keys are requested before the wait where heads have at most 64 dims and the grid
    is at most two programs an SM. On an H100 (BENCHMARKS.md, 2026-12-06, stop 20) that took the
    1B step at 4096 cached tokens from 573.5 to 556.3 us (32 shares) at +2.4 us at 128; with 64
    shares (a 128k cache, 512 programs) it cost 15 us at 128 and gained nothing at 4096; the 8B
    (128 dims) lost 36 us at 128 for 29 at 4096.
    """
    if num_sms is None:
        num_sms = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 132
    wanted = triton.next_power_of_2(triton.cdiv(2 * num_sms, num_kv_heads))
    most = max(1, max_seq_len // min_chunk)
    splits = max(1, min(wanted, 1 << (most.bit_length() - 1)))  # powers of two: shares align with BLOCK_N
    co_resident = splits * num_kv_heads <= 2 * num_sms
    return DecodeAttentionConfig(splits=splits, block_n=max(16, min(block_n, triton.next_power_of_2(max_seq_len))),
                                 num_warps=8 if head_dim >= 128 else 4,
                                 prefetch_blocks=2 if head_dim <= 64 and co_resident else 1)


@dataclass(frozen=True)
class DecodeAttentionWorkspace:
    """fp32 partials per (query head, split): running max (log2 units), sum of exponentials, unnormalised output."""

    config: DecodeAttentionConfig
    max_logit: torch.Tensor  # [Hq, splits]
    sum_exp: torch.Tensor  # [Hq, splits]
    acc: torch.Tensor  # [Hq, splits, D]
    arrivals: torch.Tensor  # int32 [Hkv or more]: shares finished per KV head; each launch leaves them zero


def make_workspace(num_heads: int, head_dim: int, max_seq_len: int, config: DecodeAttentionConfig | None = None,
                   *, num_kv_heads: int | None = None, device: str | torch.device | None = None
                   ) -> DecodeAttentionWorkspace:
    """Allocate once (before graph capture); ``decode_attention(..., workspace=ws)`` then uses ``ws.config``."""
    cfg = config or pick_config(max_seq_len, num_kv_heads or 1, head_dim)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    return DecodeAttentionWorkspace(
        cfg,
        torch.empty(num_heads, cfg.splits, dtype=torch.float32, device=device),
        torch.empty(num_heads, cfg.splits, dtype=torch.float32, device=device),
        torch.empty(num_heads, cfg.splits, head_dim, dtype=torch.float32, device=device),
        torch.zeros(num_kv_heads or num_heads, dtype=torch.int32, device=device),
    )


@triton.jit
def _key_range(len_ptr, S, window, HAS_WINDOW: tl.constexpr, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Attended keys [lo, length) and the share of each split (a multiple of BLOCK_N; 0 when nothing is attended)."""
    length = tl.minimum(tl.load(len_ptr).to(tl.int32), S)
    lo = 0
    if HAS_WINDOW:  # keys k > (length - 1) - window
        lo = tl.maximum(length - window, 0)
    share = tl.cdiv(tl.cdiv(length - lo, SPLITS), BLOCK_N) * BLOCK_N
    return lo, length, share


@triton.jit
def _load_keys(k_head, v_head, n0, stop, stride_kn, stride_vn, BLOCK_N: tl.constexpr, D: tl.constexpr):
    """Cached keys and values n0..n0+BLOCK_N-1 ([BLOCK_N, D] each; rows >= stop read as zero) and their mask."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    key_ok = offs_n < stop
    k = tl.load(k_head + offs_n[:, None] * stride_kn + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    v = tl.load(v_head + offs_n[:, None] * stride_vn + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    return k, v, key_ok


@triton.jit
def _attend_block(q, k, v, key_ok, m_i, l_i, acc, qk_scale, DOT_PRECISION: tl.constexpr):
    """One online-softmax step over a block of keys; masked keys get no weight."""
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * qk_scale  # log2 units
    s = tl.where(key_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every block has a valid key
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
    return m_new, l_i * alpha + tl.sum(p, axis=1), acc


@triton.jit
def attention_prefetch(kv, split, len_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, stride_kh, stride_kn, stride_vh, stride_vn,
                       S, table_len, window, D: tl.constexpr, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
                       FIRST_N: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """What share ``split`` of KV head ``kv`` can load before the QKV projection exists.

    Only what no op of this step writes: the share's first FIRST_N earlier tokens' keys and values,
    and the RoPE row of the new position. Returns them with the attended range (lo, length, share).
    """
    lo, length, share = _key_range(len_ptr, S, window, HAS_WINDOW, SPLITS, BLOCK_N)
    pos = length - 1  # the token being decoded: its key and value are in qkv, not yet in the cache
    start = lo + split * share
    cached = tl.minimum(tl.minimum(start + share, length), pos)  # keys start..cached-1 come from the cache
    offs_d = tl.arange(0, D)
    k0, v0, ok0 = _load_keys(k_ptr + kv.to(tl.int64) * stride_kh, v_ptr + kv.to(tl.int64) * stride_vh, start, cached,
                             stride_kn, stride_vn, FIRST_N, D)
    in_table = (offs_d * 0 + pos < table_len) & (pos >= 0)
    cos = tl.load(cos_ptr + pos * D + offs_d, mask=in_table, other=0.0)
    sin = tl.load(sin_ptr + pos * D + offs_d, mask=in_table, other=0.0)
    return k0, v0, ok0, cos, sin, lo, length, share


@triton.jit
def attention_share(
    kv, split, k0, v0, ok0, cos, sin, lo, length, share,
    qkv_ptr, q_norm_ptr, k_norm_ptr, k_ptr, v_ptr, m_ptr, l_ptr, acc_ptr, arrivals_ptr, out_ptr, stride_oh,
    stride_kh, stride_kn, stride_vh, stride_vn, qk_scale, eps,
    HQ: tl.constexpr, HKV: tl.constexpr, GROUP_ROWS: tl.constexpr, D: tl.constexpr,
    SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, FIRST_N: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_Q_NORM: tl.constexpr, HAS_K_NORM: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    DOT_FP32: tl.constexpr,
    COMBINE: tl.constexpr, COMBINE_ROWS: tl.constexpr,
):
    """Share ``split`` of KV head ``kv`` once qkv is written (its first FIRST_N keys already loaded as k0, v0): its
    partial; with COMBINE, if it is the head's last share to finish, also the group's output (the whole-model
    kernel; standalone, ``_reduce_kernel`` does that), its GROUP heads padded to COMBINE_ROWS (a power of two)."""
    GROUP: tl.constexpr = HQ // HKV
    pos = length - 1
    start = lo + split * share
    stop = tl.minimum(start + share, length)
    cached = tl.minimum(stop, pos)
    offs_d = tl.arange(0, D)
    k_head = k_ptr + kv.to(tl.int64) * stride_kh
    v_head = v_ptr + kv.to(tl.int64) * stride_vh
    if start < stop:  # shares past the end write nothing: the combine never reads them
        rows = tl.arange(0, GROUP_ROWS)
        row_ok = rows < GROUP
        heads = kv * GROUP + rows
        q = norm_rope_rows(qkv_ptr + heads[:, None] * D, row_ok[:, None], q_norm_ptr, cos, sin, eps, D,
                            HAS_Q_NORM)
        q = q.to(k_ptr.dtype.element_ty)  # rounded as the separate RoPE launch stored it
        if DOT_FP32:  # K, V and P follow q's dtype into the dots
            q = q.to(tl.float32)
        m_i = tl.full((GROUP_ROWS,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((GROUP_ROWS,), dtype=tl.float32)
        acc = tl.zeros((GROUP_ROWS, D), dtype=tl.float32)
        if start < cached:
            m_i, l_i, acc = _attend_block(q, k0, v0, ok0, m_i, l_i, acc, qk_scale, DOT_PRECISION)
        if INTERPRET:  # the interpreter cannot run range() to a tensor bound (numpy >= 2.3)
            n0 = start + FIRST_N
            while n0 < cached:
                k, v, key_ok = _load_keys(k_head, v_head, n0, cached, stride_kn, stride_vn, BLOCK_N, D)
                m_i, l_i, acc = _attend_block(q, k, v, key_ok, m_i, l_i, acc, qk_scale, DOT_PRECISION)
                n0 += BLOCK_N
        else:
            for n0 in range(start + FIRST_N, cached, BLOCK_N):
                k, v, key_ok = _load_keys(k_head, v_head, n0, cached, stride_kn, stride_vn, BLOCK_N, D)
                m_i, l_i, acc = _attend_block(q, k, v, key_ok, m_i, l_i, acc, qk_scale, DOT_PRECISION)
        if stop == length:  # this share ends at the new token: rotate its key, append it, attend to it
            one = tl.full((1, 1), 1, tl.int1)
            k_new = norm_rope_rows(qkv_ptr + (HQ + kv) * D + tl.zeros((1, 1), tl.int32), one, k_norm_ptr, cos,
                                    sin, eps, D, HAS_K_NORM).to(k_ptr.dtype.element_ty)
            v_new = tl.load(qkv_ptr + (HQ + HKV + kv) * D + offs_d[None, :])
            tl.store(k_head + pos * stride_kn + offs_d[None, :], k_new)
            tl.store(v_head + pos * stride_vn + offs_d[None, :], v_new)
            s = tl.sum(q.to(tl.float32) * k_new.to(tl.float32), axis=1) * qk_scale
            m_new = tl.maximum(m_i, s)
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new)
            m_i, l_i = m_new, l_i * alpha + p
            acc = acc * alpha[:, None] + p[:, None] * v_new.to(tl.float32)
        slot = heads * SPLITS + split
        tl.store(m_ptr + slot, m_i, mask=row_ok)
        tl.store(l_ptr + slot, l_i, mask=row_ok)
        tl.store(acc_ptr + slot[:, None] * D + offs_d[None, :], acc, mask=row_ok[:, None])
        if COMBINE:
            tl.debug_barrier()  # every thread's partial is written before the release below
            arrived = tl.atomic_add(arrivals_ptr + kv, 1, sem="acq_rel")
            active = tl.cdiv(length - lo, share)  # shares that attend keys: all of them arrive here
            if arrived == active - 1:  # the last share of this KV head: combine the group's shares
                _combine_heads(m_ptr, l_ptr, acc_ptr, kv * GROUP, GROUP, active, out_ptr, stride_oh, D, SPLITS,
                               BLOCK_S, COMBINE_ROWS)
                tl.atomic_xchg(arrivals_ptr + kv, 0)  # ready for the next step


def combine_block(splits: int, heads: int = 1, head_dim: int = 1) -> int:
    """Shares the combine reads per step: at most 32 (as measured for the reduce launch), fewer where ``heads``
    heads of ``head_dim`` at once would hold more than COMBINE_VALUES partial outputs in registers."""
    most = COMBINE_VALUES // (triton.next_power_of_2(heads) * head_dim)
    return max(1, min(triton.next_power_of_2(splits), 32, most))


@triton.jit
def _combine_heads(m_ptr, l_ptr, acc_ptr, first_head, heads, active, out_ptr, stride_oh,
                   D: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, ROWS: tl.constexpr):
    """out[h] = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s over the ``active`` shares, for the ``heads``
    heads from ``first_head`` (ROWS >= heads, a power of two) at once, BLOCK_S shares a step.

    All heads in one pass, so the whole-model kernel's last share of a KV head waits for one round of
    loads, not one per query head of its group.
    """
    offs_d = tl.arange(0, D)
    rows = tl.arange(0, ROWS)
    row_ok = rows < heads
    head = first_head + rows
    big_m = tl.full((ROWS,), float("-inf"), dtype=tl.float32)
    total = tl.zeros((ROWS,), dtype=tl.float32)
    acc = tl.zeros((ROWS, D), dtype=tl.float32)
    first = 0
    while first < active:  # only the shares that attended keys: a short context reads one block, not SPLITS
        s = first + tl.arange(0, BLOCK_S)
        ok = row_ok[:, None] & (s[None, :] < active)
        slot = head[:, None] * SPLITS + s[None, :]
        m = tl.load(m_ptr + slot, mask=ok, other=float("-inf"))
        new_m = tl.maximum(big_m, tl.max(m, axis=1))
        safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)  # padded rows, or nothing attended (length 0)
        alpha = tl.exp2(big_m - safe_m)
        w = tl.exp2(m - safe_m[:, None])
        parts = tl.load(acc_ptr + slot[:, :, None] * D + offs_d[None, None, :], mask=ok[:, :, None], other=0.0)
        total = total * alpha + tl.sum(w * tl.load(l_ptr + slot, mask=ok, other=0.0), axis=1)
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * parts, axis=1)
        big_m = new_m
        first += BLOCK_S
    out = acc / tl.where(total > 0, total, 1.0)[:, None]
    tl.store(out_ptr + head[:, None] * stride_oh + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None])


@triton.jit
def _partial_kernel(
    qkv_ptr, len_ptr, cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr, k_ptr, v_ptr, m_ptr, l_ptr, acc_ptr,
    stride_kh, stride_kn, stride_vh, stride_vn, S, table_len, window, qk_scale, eps,
    HQ: tl.constexpr, HKV: tl.constexpr, GROUP_ROWS: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
    BLOCK_N: tl.constexpr, FIRST_N: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_Q_NORM: tl.constexpr,
    HAS_K_NORM: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr, DOT_FP32: tl.constexpr,
    PDL: tl.constexpr,
):
    kv, split = tl.program_id(0), tl.program_id(1)
    k0, v0, ok0, cos, sin, lo, length, share = attention_prefetch(
        kv, split, len_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, stride_kh, stride_kn, stride_vh, stride_vn, S, table_len,
        window, D, SPLITS, BLOCK_N, FIRST_N, HAS_WINDOW)
    release_dependents(PDL)
    wait_for_inputs(PDL)
    # Without COMBINE the arrival counters, output and its stride are never touched: placeholders.
    attention_share(kv, split, k0, v0, ok0, cos, sin, lo, length, share, qkv_ptr, q_norm_ptr, k_norm_ptr, k_ptr, v_ptr,
                    m_ptr, l_ptr, acc_ptr, len_ptr, acc_ptr, D, stride_kh, stride_kn, stride_vh, stride_vn,
                    qk_scale, eps, HQ, HKV, GROUP_ROWS, D, SPLITS, BLOCK_N, FIRST_N, 1, HAS_Q_NORM,
                    HAS_K_NORM, DOT_PRECISION, INTERPRET, DOT_FP32, False, 1)


@triton.jit
def _reduce_kernel(
    m_ptr, l_ptr, acc_ptr, len_ptr, out_ptr, stride_oh, S, window,
    D: tl.constexpr, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_WINDOW: tl.constexpr, PDL: tl.constexpr,
):
    """Query head program_id(0)'s output from the shares that attended keys.

    The length is read before the wait (no kernel of the step writes it, as the partial kernel's prefetch
    relies on too): after it, the shares' loads would wait for one more round trip to memory."""
    lo, length, share = _key_range(len_ptr, S, window, HAS_WINDOW, SPLITS, BLOCK_N)
    release_dependents(PDL)
    wait_for_inputs(PDL)
    active = tl.cdiv(length - lo, tl.maximum(share, 1))
    _combine_heads(m_ptr, l_ptr, acc_ptr, tl.program_id(0), 1, active, out_ptr, stride_oh, D, SPLITS, BLOCK_S, 1)


_INTERPRETED = interpreted(_partial_kernel)


def _check(qkv, k_cache, v_cache, length, cos, sin, num_heads, q_norm, k_norm, out, workspace, cfg
           ) -> tuple[int, int, int, int]:
    if k_cache.dim() != 3 or tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"k_cache and v_cache must both be [Hkv, S, D], got {tuple(k_cache.shape)} "
                         f"and {tuple(v_cache.shape)}")
    hq, (hkv, s, d) = num_heads, k_cache.shape
    if hkv == 0 or hq % hkv:
        raise ValueError(f"{hq} query heads cannot share {hkv} KV heads")
    if d < 16 or d & (d - 1):
        raise ValueError(f"head_dim {d} must be a power of two >= 16")
    width = (hq + 2 * hkv) * d
    if qkv.dtype not in (torch.float16, torch.bfloat16, torch.float32) or qkv.numel() != width \
            or not qkv.is_contiguous():
        raise ValueError(f"qkv must be one contiguous fp16/bf16/fp32 row of {width} values (q, k, v heads), "
                         f"got {tuple(qkv.shape)} {qkv.dtype}")
    if k_cache.dtype != qkv.dtype or v_cache.dtype != qkv.dtype:
        raise ValueError(f"qkv, k_cache and v_cache must share a dtype, got {qkv.dtype}, {k_cache.dtype}, "
                         f"{v_cache.dtype}")
    if k_cache.stride(2) != 1 or v_cache.stride(2) != 1:
        raise ValueError("k_cache and v_cache need contiguous head_dim rows")
    for name, table in (("cos", cos), ("sin", sin)):
        if table.dim() != 2 or table.shape[1] != d or table.dtype != torch.float32 or not table.is_contiguous():
            raise ValueError(f"{name} must be a contiguous fp32 [max_seq, {d}] table, got {tuple(table.shape)} "
                             f"{table.dtype}")
    if cos.shape != sin.shape:
        raise ValueError("cos and sin tables differ in shape")
    for name, weight in (("q_norm", q_norm), ("k_norm", k_norm)):
        if weight is not None and (tuple(weight.shape) != (d,) or not weight.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous [{d}] tensor, got {tuple(weight.shape)}")
    if length.numel() != 1 or length.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"length must be a one-element int32 tensor on the device, got {tuple(length.shape)} "
                         f"{length.dtype}")
    if cfg.splits < 1 or cfg.block_n < 16 or cfg.block_n & (cfg.block_n - 1) \
            or cfg.prefetch_blocks not in (1, 2, 4):
        raise ValueError(f"bad config {cfg}: splits >= 1, block_n a power of two >= 16, prefetch_blocks 1, 2 or 4")
    if out is not None and (tuple(out.shape) != (hq, d) or out.dtype != qkv.dtype or out.stride(1) != 1):
        raise ValueError(f"out must be [{hq}, {d}] {qkv.dtype} with contiguous rows")
    if workspace is not None:
        want = (hq, cfg.splits, d)
        if tuple(workspace.acc.shape) != want or tuple(workspace.max_logit.shape) != want[:2]:
            raise ValueError(f"workspace holds {tuple(workspace.acc.shape)} partials, this call needs {want}")
        if workspace.arrivals.numel() < hkv:
            raise ValueError(f"workspace counts arrivals for {workspace.arrivals.numel()} KV heads, this call has {hkv}")
    tensors = [t for t in (k_cache, v_cache, length, cos, sin, q_norm, k_norm, out) if t is not None]
    if workspace is not None:
        tensors.append(workspace.acc)
    if any(t.device != qkv.device for t in tensors):
        raise ValueError("all tensors must be on one device")
    return hq, hkv, s, d


def decode_attention(
    qkv: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    length: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    num_heads: int,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    eps: float = 1e-6,
    sliding_window: int | None = None,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    workspace: DecodeAttentionWorkspace | None = None,
    config: DecodeAttentionConfig | None = None,
) -> torch.Tensor:
    """Attention [Hq, D] of the token at position length-1 over keys 0..length-1; its key and value appended.

    ``qkv`` is the token's fused projection (q heads, k heads, v heads); its q and k are
    normalized (``q_norm``/``k_norm``, Qwen3) and rotated by ``cos``/``sin``
    (``ffchat.model.rope_tables``), and its k and v written to the caches at length-1, as
    ``ffchat.kernels.rope_kv`` would, in the same launch. ``length`` (int32 [1] on the
    device) must be 1..S (a larger value is clamped to S) and below the RoPE table's length.
    With ``workspace`` (and ``out``) nothing is allocated and nothing synchronises: safe to
    capture in a CUDA graph and replay after changing ``length`` in place.
    """
    cfg = config or (workspace.config if workspace is not None else
                     pick_config(k_cache.shape[1], k_cache.shape[0], k_cache.shape[2]))
    hq, hkv, s, d = _check(qkv, k_cache, v_cache, length, cos, sin, num_heads, q_norm, k_norm, out, workspace, cfg)
    if workspace is None:
        workspace = make_workspace(hq, d, s, cfg, device=qkv.device)
    if out is None:
        out = torch.empty((hq, d), dtype=qkv.dtype, device=qkv.device)
    scale = d ** -0.5 if scale is None else scale
    window = sliding_window if sliding_window is not None else 0
    _partial_kernel[(hkv, cfg.splits)](
        qkv, length, cos, sin, q_norm if q_norm is not None else cos, k_norm if k_norm is not None else cos,
        k_cache, v_cache, workspace.max_logit, workspace.sum_exp, workspace.acc,
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), s, cos.shape[0], window,
        scale * LOG2E, eps,
        HQ=hq, HKV=hkv, GROUP_ROWS=max(MIN_HEAD_ROWS, triton.next_power_of_2(hq // hkv)), D=d, SPLITS=cfg.splits,
        BLOCK_N=cfg.block_n, FIRST_N=cfg.block_n * cfg.prefetch_blocks, HAS_WINDOW=sliding_window is not None,
        HAS_Q_NORM=q_norm is not None, HAS_K_NORM=k_norm is not None,
        DOT_PRECISION="ieee" if qkv.dtype == torch.float32 else "tf32", INTERPRET=_INTERPRETED,
        DOT_FP32=_INTERPRETED and qkv.dtype == torch.bfloat16,  # the interpreter's tl.dot misreads bf16
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_options(qkv.device),
    )
    _reduce_kernel[(hq,)](
        workspace.max_logit, workspace.sum_exp, workspace.acc, length, out, out.stride(0), s, window,
        D=d, SPLITS=cfg.splits, BLOCK_N=cfg.block_n, BLOCK_S=combine_block(cfg.splits, 1, d),
        HAS_WINDOW=sliding_window is not None, num_warps=4, **launch_options(qkv.device),
    )
    return out


def decode_attention_reference(
    qkv: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    length: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    num_heads: int,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    eps: float = 1e-6,
    sliding_window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain torch: ``rope_kv_append_reference`` at position length-1 (writing the caches), then attention."""
    hkv, _, d = k_cache.shape
    start = torch.tensor([length - 1], dtype=torch.int32)
    q = rope_kv_append_reference(qkv.reshape(1, -1), start, cos, sin, k_cache, v_cache, num_heads=num_heads,
                                 num_kv_heads=hkv, head_dim=d, q_norm=q_norm, k_norm=k_norm, eps=eps)
    return cached_attention_reference(q[0], k_cache, v_cache, length, sliding_window=sliding_window, scale=scale)


def cached_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    length: int,
    *,
    sliding_window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain torch, fp32: the last query (position length-1) of ``ffchat.model``'s attention, in q's dtype."""
    hq, d = q.shape
    group = hq // k_cache.shape[0]
    keys = k_cache[:, :length].float().repeat_interleave(group, dim=0)  # [Hq, length, D]
    values = v_cache[:, :length].float().repeat_interleave(group, dim=0)
    scores = torch.einsum("hd,hnd->hn", q.float(), keys) * (d ** -0.5 if scale is None else scale)
    if sliding_window is not None:  # same rule as ffchat.model.attention_mask: k > p - window, p = length - 1
        visible = torch.arange(length, device=q.device) > (length - 1) - sliding_window
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hn,hnd->hd", torch.softmax(scores, dim=-1), values).to(q.dtype)
