"""The whole-model kernel: one persistent launch runs every layer and the LM head of a decode step.

Grid = ``programs`` co-resident programs (two per SM by default, one in the interpreter). Each
runs its row of the schedule (``ffchat.kernels.schedule``): a list of (op, layer, item)
entries, every op a fused step that the Triton backend runs as its own launch, here a branch
of one loop:

* embed: the token's embedding row into the residual stream;
* qkv: RMSNorm + QKV GEMV (+ bias), a row block per item;
* attention: RoPE (+ Qwen3 q/k norm) + KV append + one share of the keys of one KV head,
  the last share of a head combining the group's output (``decode_attention``'s pieces);
* o: O GEMV + residual; gate_up: RMSNorm + gate/up GEMV + SiLU * up; down: down GEMV + residual;
* head: final RMSNorm + LM head GEMV into the logits.

Dependencies go through counters in global memory (``ffchat.kernels.counters``): an item
requests its first weight tile (or, in attention, its first cached keys) before it waits
for the op before it, so the load overlaps the wait. Every wait is capped and sets the error
flag on running out; the last program to finish zeroes the counters for the next token. The
residual stream alternates between two buffers (attention and MLP halves), so no item reads
a row another item of its own op rewrites.

With ``MegakernelState.start_trace`` the launch also stamps every entry's start, end of wait and
end (``ffchat.kernels.trace``): where the step's time goes, which no profiler sees inside one launch.

Inputs are the Triton backend's: the INT4 layout-v1 weights of each role stacked over layers
([L, N, K / 8] words, [L, N, K / G] scales and zeros; q/k/v and gate/up fused along the rows),
its KV cache [L, Hkv, S, D], RoPE tables and attention workspace, and its step ids
(token, length once appended) on the device, so one CUDA graph of this launch serves every
token. ``megakernel_reference`` is the same step in plain torch from the kernels' references.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ffchat.kernels.counters import add_count, reset_when_last, wait_count
from ffchat.kernels.decode_attention import (
    LOG2E, MIN_HEAD_ROWS, DecodeAttentionConfig, DecodeAttentionWorkspace, attention_prefetch, attention_share, combine_block,
    decode_attention_reference,
)
from ffchat.kernels.int4_gemv import (
    HIGH_NIBBLE, LOW_NIBBLE, ONE_F32, GemvConfig, gemv_accumulate, gemv_epilogue, gemv_first_tile, gemv_norm_weights,
    int4_gemv_reference, load_bias, load_residual, sm_count, tile_rows,
)
from ffchat.kernels.interpreter import interpreted
from ffchat.kernels.schedule import (
    FIELDS, OP_ATTENTION, OP_DOWN, OP_EMBED, OP_GATE_UP, OP_HEAD, OP_O, OP_QKV, Stage, build_schedule, decode_stages,
)
from ffchat.kernels.trace import DONE, READY, STAMPS, STARTED, stamp, trace_buffer

GEMV_ROLES = ("qkv", "o", "gate_up", "down", "head")
# The op codes as the kernel sees them (a jit function reads only constexpr globals).
_EMBED, _QKV, _ATTENTION, _O, _GATE_UP, _DOWN, _HEAD = (tl.constexpr(op) for op in (
    OP_EMBED, OP_QKV, OP_ATTENTION, OP_O, OP_GATE_UP, OP_DOWN, OP_HEAD))
_STAMPS, _STARTED, _READY, _DONE = (tl.constexpr(value) for value in (STAMPS, STARTED, READY, DONE))
DEFAULT_SPIN_CAP = 1 << 22  # polls of one wait before it gives up: far beyond any real wait (~1 us per poll)


@dataclass(frozen=True)
class StackedLinear:
    """One role's INT4 weights over all layers (the LM head: one layer); bias [L, N] or None."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int
    bias: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return self.qweight.shape[1]

    @property
    def inputs(self) -> int:
        return self.qweight.shape[2] * 8


@dataclass(frozen=True)
class DecodeModel:
    """Everything a decode step reads besides the caches: weights stacked over layers, and the shape."""

    embed: torch.Tensor  # [V, H]
    attn_norm: torch.Tensor  # [L, H]
    mlp_norm: torch.Tensor  # [L, H]
    final_norm: torch.Tensor  # [H]
    q_norm: torch.Tensor | None  # [L, D] (Qwen3)
    k_norm: torch.Tensor | None
    qkv: StackedLinear  # rows: q heads, k heads, v heads
    o: StackedLinear
    gate_up: StackedLinear  # rows: gate, then up
    down: StackedLinear
    head: StackedLinear
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    sliding_window: int | None = None

    @property
    def num_layers(self) -> int:
        return self.attn_norm.shape[0]

    @property
    def hidden(self) -> int:
        return self.embed.shape[1]

    @property
    def intermediate(self) -> int:
        return self.gate_up.rows // 2


@dataclass(frozen=True)
class MegakernelConfig:
    """Grid, warps, one GEMV tile per role (split-K is not used: items are row blocks), attention shares, spin cap.

    ``attention_splits`` shares per KV head (each of whole ``attention_block``-key blocks) make
    one layer's attention items; the attention workspace must be made for them (``attention_config``).

    ``max_registers``: a per-thread register cap for ptxas, which lets more programs share an SM.
    Every program must be resident at once (they wait on each other): ``megakernel_decode``
    refuses a grid the compiled kernel cannot keep resident.
    """

    programs: int
    num_warps: int
    tiles: dict[str, GemvConfig]
    attention_splits: int = 32
    attention_block: int = 64
    embed_block: int = 1024
    spin_cap: int = DEFAULT_SPIN_CAP
    max_registers: int | None = None

    def attention_config(self) -> DecodeAttentionConfig:
        return DecodeAttentionConfig(splits=self.attention_splits, block_n=self.attention_block)


@dataclass
class MegakernelState:
    """The launch's own buffers: activations, schedule, counters and error flag (allocate once, before capture)."""

    config: MegakernelConfig
    stages: list[Stage]
    schedule: torch.Tensor  # int32 [programs, slots + 1, FIELDS]
    counters: torch.Tensor  # int32 [power of two >= stages]
    exits: torch.Tensor  # int32 [1]: programs finished this launch
    error: torch.Tensor  # int32 [1]: 0, or the index + 1 of the counter a wait gave up on
    stream: tuple[torch.Tensor, torch.Tensor]  # the residual stream, alternating [H] buffers
    qkv: torch.Tensor  # [(Hq + 2 Hkv) D]
    attention: torch.Tensor  # [Hq, D]
    hidden: torch.Tensor  # [I]
    logits: torch.Tensor  # [V] in the activation dtype
    resident_checked: bool = False
    trace: torch.Tensor | None = None  # stamps of every entry (``ffchat.kernels.trace``), or None: not traced

    def start_trace(self) -> None:
        """Have the next launches stamp every entry into a fresh ``trace`` (a kernel compiled with the stamps)."""
        self.trace = trace_buffer(self.schedule)


def _stage_items(model: DecodeModel, config: MegakernelConfig, splits: int) -> dict[int, int]:
    tiles = config.tiles
    return {
        OP_EMBED: triton.cdiv(model.hidden, config.embed_block),
        OP_QKV: triton.cdiv(model.qkv.rows, tiles["qkv"].block_n),
        OP_ATTENTION: model.num_kv_heads * splits,
        OP_O: triton.cdiv(model.o.rows, tiles["o"].block_n),
        OP_GATE_UP: triton.cdiv(model.intermediate, tiles["gate_up"].block_n),
        OP_DOWN: triton.cdiv(model.down.rows, tiles["down"].block_n),
        OP_HEAD: triton.cdiv(model.head.rows, tiles["head"].block_n),
    }


def prepare(model: DecodeModel, config: MegakernelConfig, workspace: DecodeAttentionWorkspace,
            schedule: torch.Tensor | None = None) -> MegakernelState:
    """Buffers and the schedule for ``model`` (``schedule`` overrides the built one: tests break it on purpose)."""
    for role in GEMV_ROLES:
        tile, linear = config.tiles[role], getattr(model, role)
        if tile.block_k % linear.group_size or tile.split_k != 1:
            raise ValueError(f"{role}: block_k {tile.block_k} must be a multiple of the group size "
                             f"{linear.group_size}, and split_k 1")
    if (workspace.config.splits, workspace.config.block_n) != (config.attention_splits, config.attention_block):
        raise ValueError(f"the attention workspace is made for {workspace.config}, the megakernel config wants "
                         f"{config.attention_splits} shares of {config.attention_block}-key blocks")
    stages = decode_stages(model.num_layers, _stage_items(model, config, config.attention_splits))
    if schedule is None:
        schedule = build_schedule(stages, config.programs)
    if schedule.shape[0] != config.programs or schedule.shape[2] != FIELDS:
        raise ValueError(f"schedule must be [{config.programs}, slots, {FIELDS}], got {tuple(schedule.shape)}")
    device, dtype = model.embed.device, model.embed.dtype

    def empty(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device)

    return MegakernelState(
        config, stages, schedule.to(device=device, dtype=torch.int32).contiguous(),
        torch.zeros(triton.next_power_of_2(len(stages)), dtype=torch.int32, device=device),
        torch.zeros(1, dtype=torch.int32, device=device), torch.zeros(1, dtype=torch.int32, device=device),
        (empty(model.hidden), empty(model.hidden)), empty(model.qkv.rows),
        empty(model.num_heads, model.head_dim), empty(model.intermediate), empty(model.head.rows),
    )


@triton.jit
def _entry(schedule_ptr, slot, FIELDS: tl.constexpr):
    """The seven fields of one schedule entry: op, layer, item, wait counter and target, done counter and count."""
    entry = schedule_ptr + slot * FIELDS
    return (tl.load(entry), tl.load(entry + 1), tl.load(entry + 2), tl.load(entry + 3), tl.load(entry + 4),
            tl.load(entry + 5), tl.load(entry + 6))


@triton.jit
def _gemv_op(
    entry_stamps, clock_ptr, TRACE: tl.constexpr, INTERPRET: tl.constexpr,
    item, layer, x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, res_ptr, out_ptr, nw_ptr, eps, high_mask, low_mask, one,
    counters_ptr, wait_index, wait_target, cap, error_ptr,
    N: tl.constexpr, K: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PREFETCH: tl.constexpr, NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, NORM_CHUNKS: tl.constexpr,
    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
):
    """Row block ``item`` of layer ``layer``'s GEMV: first tile requested, wait for x, the rest, epilogue.

    N counts outputs (GATED: I, with 2I weight rows); the norm weight is [L, K] and the bias [L, rows].
    """
    ROWS: tl.constexpr = 2 * N if GATED else N
    CHUNKS: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
    EVEN: tl.constexpr = (N % BLOCK_N == 0) and (K % BLOCK_K == 0)
    W_ALIGN: tl.constexpr = 4 if (K // 8) % 4 == 0 else 1
    at = layer.to(tl.int64)
    w_ptr += at * (ROWS * (K // 8))
    s_ptr += at * (ROWS * (K // G))
    z_ptr += at * (ROWS * (K // G))
    bias_ptr += at * ROWS
    nw_ptr += at * K
    n, k = item * 0 + N, item * 0 + K  # as values, the way the GEMV pieces take them
    w, s, z = gemv_first_tile(item, 0, w_ptr, s_ptr, z_ptr, n, k, CHUNKS, G, BLOCK_N, BLOCK_K, W_ALIGN, EVEN, GATED)
    nw = gemv_norm_weights(nw_ptr, 0, k, G, BLOCK_K, NORM, EVEN)
    rows, row_ok = tile_rows(item, n, BLOCK_N, GATED)
    bias = load_bias(bias_ptr, item, rows, row_ok, n, HAS_BIAS, GATED, BLOCK_N)
    wait_count(counters_ptr, wait_index, wait_target, cap, error_ptr)
    stamp(entry_stamps, _READY, clock_ptr, TRACE, INTERPRET)
    res = load_residual(res_ptr, rows, row_ok, HAS_RES)
    y = gemv_accumulate(item, 0, w, s, z, nw, x_ptr, w_ptr, s_ptr, z_ptr, n, k, high_mask, low_mask, one, nw_ptr, eps,
                        CHUNKS, G, BLOCK_N, BLOCK_K, W_ALIGN, EVEN, NORM, NORM_BLOCK, NORM_CHUNKS, GATED, PREFETCH)
    gemv_epilogue(y, item, rows, row_ok, n, bias, res, out_ptr, HAS_BIAS, HAS_RES, GATED, BLOCK_N)


@triton.jit
def _megakernel(
    trace_ptr, clock_ptr, schedule_ptr, counters_ptr, exits_ptr, error_ptr, step_ptr, cap,
    embed_ptr, x0_ptr, x1_ptr, qkv_ptr, attn_ptr, hidden_ptr, logits_ptr,
    attn_norm_ptr, mlp_norm_ptr, final_norm_ptr, q_norm_ptr, k_norm_ptr,
    qkv_w, qkv_s, qkv_z, qkv_b, o_w, o_s, o_z, o_b, gu_w, gu_s, gu_z, gu_b, down_w, down_s, down_z, down_b,
    head_w, head_s, head_z,
    k_ptr, v_ptr, cos_ptr, sin_ptr, m_ptr, l_ptr, acc_ptr, arrivals_ptr,
    S, table_len, window, qk_scale, eps, high_mask, low_mask, one,
    SLOTS: tl.constexpr, FIELDS: tl.constexpr, NUM_COUNTERS: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
    H: tl.constexpr, I: tl.constexpr, V: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
    EMBED_BLOCK: tl.constexpr, NORM_BLOCK: tl.constexpr, NORM_CHUNKS: tl.constexpr,
    QKV_G: tl.constexpr, QKV_BN: tl.constexpr, QKV_BK: tl.constexpr, QKV_PF: tl.constexpr, QKV_BIAS: tl.constexpr,
    O_G: tl.constexpr, O_BN: tl.constexpr, O_BK: tl.constexpr, O_PF: tl.constexpr, O_BIAS: tl.constexpr,
    GU_G: tl.constexpr, GU_BN: tl.constexpr, GU_BK: tl.constexpr, GU_PF: tl.constexpr, GU_BIAS: tl.constexpr,
    DOWN_G: tl.constexpr, DOWN_BN: tl.constexpr, DOWN_BK: tl.constexpr, DOWN_PF: tl.constexpr,
    DOWN_BIAS: tl.constexpr,
    HEAD_G: tl.constexpr, HEAD_BN: tl.constexpr, HEAD_BK: tl.constexpr, HEAD_PF: tl.constexpr,
    SPLITS: tl.constexpr, ATT_BLOCK_N: tl.constexpr, GROUP_ROWS: tl.constexpr,
    BLOCK_S: tl.constexpr, COMBINE_ROWS: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_Q_NORM: tl.constexpr,
    HAS_K_NORM: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr, DOT_FP32: tl.constexpr, TRACE: tl.constexpr,
):
    NQKV: tl.constexpr = (HQ + 2 * HKV) * D
    stride_kh = S * D  # the caches are contiguous [L, Hkv, S, D]
    base = schedule_ptr + tl.program_id(0) * ((SLOTS + 1) * FIELDS)
    op, layer, item, wait_index, wait_target, done_index, done_count = _entry(base, 0, FIELDS)
    for slot in range(SLOTS):
        entry_stamps = trace_ptr + (tl.program_id(0) * SLOTS + slot) * _STAMPS
        stamp(entry_stamps, _STARTED, clock_ptr, TRACE, INTERPRET)
        # The next entry is requested now, so its fields are in registers when this item is done.
        n_op, n_layer, n_item, n_wait_index, n_wait_target, n_done_index, n_done_count = _entry(base, slot + 1, FIELDS)
        if op == _EMBED:
            stamp(entry_stamps, _READY, clock_ptr, TRACE, INTERPRET)  # it waits for nothing
            offs = item * EMBED_BLOCK + tl.arange(0, EMBED_BLOCK)
            token = tl.load(step_ptr).to(tl.int64)
            tl.store(x0_ptr + offs, tl.load(embed_ptr + token * H + offs, mask=offs < H), mask=offs < H)
        if op == _QKV:
            _gemv_op(entry_stamps, clock_ptr, TRACE, INTERPRET,
                     item, layer, x0_ptr, qkv_w, qkv_s, qkv_z, qkv_b, x0_ptr, qkv_ptr, attn_norm_ptr, eps, high_mask,
                     low_mask, one, counters_ptr, wait_index, wait_target, cap, error_ptr,
                     NQKV, H, QKV_G, QKV_BN, QKV_BK, QKV_PF, True, NORM_BLOCK, NORM_CHUNKS, False, QKV_BIAS, False)
        if op == _ATTENTION:
            kv, split = item // SPLITS, item % SPLITS
            at = layer.to(tl.int64)
            k_layer = k_ptr + at * (HKV * stride_kh)
            v_layer = v_ptr + at * (HKV * stride_kh)
            k0, v0, ok0, cos, sin, lo, length, share = attention_prefetch(
                kv, split, step_ptr + 1, cos_ptr, sin_ptr, k_layer, v_layer, stride_kh, D, stride_kh, D, S,
                table_len, window, D, SPLITS, ATT_BLOCK_N, ATT_BLOCK_N, HAS_WINDOW)
            wait_count(counters_ptr, wait_index, wait_target, cap, error_ptr)
            stamp(entry_stamps, _READY, clock_ptr, TRACE, INTERPRET)
            attention_share(kv, split, k0, v0, ok0, cos, sin, lo, length, share, qkv_ptr, q_norm_ptr + at * D,
                            k_norm_ptr + at * D, k_layer, v_layer, m_ptr, l_ptr, acc_ptr, arrivals_ptr, attn_ptr, D,
                            stride_kh, D, stride_kh, D, qk_scale, eps, HQ, HKV, GROUP_ROWS, D, SPLITS,
                            ATT_BLOCK_N, ATT_BLOCK_N, BLOCK_S, HAS_Q_NORM, HAS_K_NORM, DOT_PRECISION, INTERPRET, DOT_FP32,
                            True, COMBINE_ROWS)
        if op == _O:
            _gemv_op(entry_stamps, clock_ptr, TRACE, INTERPRET,
                     item, layer, attn_ptr, o_w, o_s, o_z, o_b, x0_ptr, x1_ptr, attn_norm_ptr, eps, high_mask,
                     low_mask, one, counters_ptr, wait_index, wait_target, cap, error_ptr,
                     H, HQ * D, O_G, O_BN, O_BK, O_PF, False, NORM_BLOCK, NORM_CHUNKS, False, O_BIAS, True)
        if op == _GATE_UP:
            _gemv_op(entry_stamps, clock_ptr, TRACE, INTERPRET,
                     item, layer, x1_ptr, gu_w, gu_s, gu_z, gu_b, x1_ptr, hidden_ptr, mlp_norm_ptr, eps, high_mask,
                     low_mask, one, counters_ptr, wait_index, wait_target, cap, error_ptr,
                     I, H, GU_G, GU_BN, GU_BK, GU_PF, True, NORM_BLOCK, NORM_CHUNKS, True, GU_BIAS, False)
        if op == _DOWN:
            _gemv_op(entry_stamps, clock_ptr, TRACE, INTERPRET,
                     item, layer, hidden_ptr, down_w, down_s, down_z, down_b, x1_ptr, x0_ptr, mlp_norm_ptr, eps,
                     high_mask, low_mask, one, counters_ptr, wait_index, wait_target, cap, error_ptr,
                     H, I, DOWN_G, DOWN_BN, DOWN_BK, DOWN_PF, False, NORM_BLOCK, NORM_CHUNKS, False, DOWN_BIAS, True)
        if op == _HEAD:
            _gemv_op(entry_stamps, clock_ptr, TRACE, INTERPRET,
                     item, layer, x0_ptr, head_w, head_s, head_z, head_w, x0_ptr, logits_ptr, final_norm_ptr, eps,
                     high_mask, low_mask, one, counters_ptr, wait_index, wait_target, cap, error_ptr,
                     V, H, HEAD_G, HEAD_BN, HEAD_BK, HEAD_PF, True, NORM_BLOCK, NORM_CHUNKS, False, False, False)
        add_count(counters_ptr, done_index, done_count)
        stamp(entry_stamps, _DONE, clock_ptr, TRACE, INTERPRET)
        op, layer, item, wait_index, wait_target = n_op, n_layer, n_item, n_wait_index, n_wait_target
        done_index, done_count = n_done_index, n_done_count
    reset_when_last(counters_ptr, exits_ptr, NUM_COUNTERS, NUM_PROGRAMS)


_INTERPRETED = interpreted(_megakernel)


def megakernel_decode(model: DecodeModel, k_cache: torch.Tensor, v_cache: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, step_ids: torch.Tensor, workspace: DecodeAttentionWorkspace,
                      state: MegakernelState) -> torch.Tensor:
    """One decode step in one launch: logits [V] (``state.logits``) of token ``step_ids[0]``, its k/v appended at
    ``step_ids[1] - 1``. Allocates nothing and never synchronises: capture it in a CUDA graph once, replay per token.

    The error flag (``state.error``) is left non-zero if a wait gave up; the caller reads it when it syncs anyway.
    """
    cfg = state.config
    args, options = _launch_arguments(model, k_cache, v_cache, cos, sin, step_ids, workspace, state)
    kernel = _megakernel[(cfg.programs,)](*args, **options)
    if not state.resident_checked and not _INTERPRETED:
        most = resident_per_sm(kernel, cfg.num_warps, k_cache.device) * sm_count(k_cache.device)
        if cfg.programs > most:
            raise ValueError(f"the megakernel's {cfg.programs} programs cannot all be resident on this GPU (at most "
                             f"{most} with {kernel.n_regs} registers per thread); its waits would run out")
        state.resident_checked = True
    return state.logits


def compile_megakernel(model: DecodeModel, k_cache: torch.Tensor, v_cache: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, step_ids: torch.Tensor, workspace: DecodeAttentionWorkspace,
                       state: MegakernelState) -> None:
    """Compile the kernel ``megakernel_decode`` would launch with these arguments, without launching it.

    Compiling releases the GIL: tuning compiles its candidate configurations from several threads at once,
    and each one's first launch then finds its kernel compiled.
    """
    args, options = _launch_arguments(model, k_cache, v_cache, cos, sin, step_ids, workspace, state)
    _megakernel.warmup(*args, grid=(state.config.programs,), **options)


def _launch_arguments(model: DecodeModel, k_cache: torch.Tensor, v_cache: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, step_ids: torch.Tensor, workspace: DecodeAttentionWorkspace,
                      state: MegakernelState) -> tuple[tuple, dict]:
    """The kernel's positional arguments and its constants and launch options, for ``state``'s config."""
    cfg, tiles = state.config, state.config.tiles
    hkv, s, d = k_cache.shape[1:]
    if tuple(k_cache.shape) != (model.num_layers, model.num_kv_heads, s, model.head_dim) or not k_cache.is_contiguous():
        raise ValueError(f"k_cache must be a contiguous [{model.num_layers}, {model.num_kv_heads}, S, "
                         f"{model.head_dim}] tensor, got {tuple(k_cache.shape)}")
    group = model.num_heads // hkv
    norm_block = min(triton.next_power_of_2(model.hidden), 4096)

    def bias(linear: StackedLinear) -> torch.Tensor:
        return linear.bias if linear.bias is not None else linear.scales

    def tile(role: str, prefix: str) -> dict:
        t = tiles[role]
        return {f"{prefix}_G": getattr(model, role).group_size, f"{prefix}_BN": t.block_n, f"{prefix}_BK": t.block_k,
                f"{prefix}_PF": t.prefetch}

    def weights(linear: StackedLinear) -> tuple:
        return linear.qweight, linear.scales, linear.zeros

    dummy = model.final_norm
    trace = state.trace if state.trace is not None else state.counters  # untraced: a pointer never written
    args = (
        trace, trace[-1:], state.schedule, state.counters, state.exits, state.error, step_ids, cfg.spin_cap,
        model.embed, *state.stream, state.qkv, state.attention, state.hidden, state.logits,
        model.attn_norm, model.mlp_norm, model.final_norm,
        model.q_norm if model.q_norm is not None else dummy, model.k_norm if model.k_norm is not None else dummy,
        *weights(model.qkv), bias(model.qkv), *weights(model.o), bias(model.o), *weights(model.gate_up),
        bias(model.gate_up), *weights(model.down), bias(model.down), *weights(model.head),
        k_cache, v_cache, cos, sin, workspace.max_logit, workspace.sum_exp, workspace.acc, workspace.arrivals,
        s, cos.shape[0], model.sliding_window or 0, d ** -0.5 * LOG2E, model.eps, HIGH_NIBBLE, LOW_NIBBLE, ONE_F32,
    )
    options = dict(
        SLOTS=state.schedule.shape[1] - 1, FIELDS=FIELDS, NUM_COUNTERS=state.counters.numel(),
        NUM_PROGRAMS=cfg.programs, H=model.hidden, I=model.intermediate, V=model.head.rows, HQ=model.num_heads,
        HKV=hkv, D=d, EMBED_BLOCK=cfg.embed_block, NORM_BLOCK=norm_block,
        NORM_CHUNKS=triton.cdiv(model.hidden, norm_block),
        **tile("qkv", "QKV"), QKV_BIAS=model.qkv.bias is not None, **tile("o", "O"), O_BIAS=model.o.bias is not None,
        **tile("gate_up", "GU"), GU_BIAS=model.gate_up.bias is not None, **tile("down", "DOWN"),
        DOWN_BIAS=model.down.bias is not None, **tile("head", "HEAD"),
        SPLITS=cfg.attention_splits, ATT_BLOCK_N=cfg.attention_block,
        GROUP_ROWS=max(MIN_HEAD_ROWS, triton.next_power_of_2(group)),
        BLOCK_S=combine_block(cfg.attention_splits, group, d), COMBINE_ROWS=triton.next_power_of_2(group),
        HAS_WINDOW=model.sliding_window is not None, HAS_Q_NORM=model.q_norm is not None,
        HAS_K_NORM=model.k_norm is not None, DOT_PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32",
        INTERPRET=_INTERPRETED, DOT_FP32=_INTERPRETED and k_cache.dtype == torch.bfloat16,
        TRACE=state.trace is not None,
        num_warps=cfg.num_warps, num_stages=1, **({"maxnreg": cfg.max_registers} if cfg.max_registers else {}),
    )
    return args, options


def registers_per_sm(device: torch.device) -> int:
    return getattr(torch.cuda.get_device_properties(device), "regs_per_multiprocessor", 65536)


def resident_per_sm(kernel, num_warps: int, device: torch.device) -> int:
    """How many programs of a compiled kernel one SM holds at once: its registers, threads and shared memory."""
    props = torch.cuda.get_device_properties(device)
    registers = registers_per_sm(device)
    threads = getattr(props, "max_threads_per_multi_processor", 2048)
    shared = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    warp_registers = -(-kernel.n_regs * 32 // 256) * 256  # allocated per warp in units of 256
    return min(registers // (warp_registers * num_warps), threads // (32 * num_warps),
               shared // max(kernel.metadata.shared, 1), 32)


def megakernel_reference(model: DecodeModel, k_cache: torch.Tensor, v_cache: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, token: int, length: int) -> torch.Tensor:
    """Plain torch, from the kernels' references: the logits of ``token`` at position length-1 (caches updated)."""
    def layer_linear(linear: StackedLinear, layer: int) -> tuple:
        return linear.qweight[layer], linear.scales[layer], linear.zeros[layer], linear.group_size

    def bias(linear: StackedLinear, layer: int) -> torch.Tensor | None:
        return None if linear.bias is None else linear.bias[layer]

    eps = model.eps
    x = model.embed[token]
    for layer in range(model.num_layers):
        qkv = int4_gemv_reference(x, *layer_linear(model.qkv, layer), bias=bias(model.qkv, layer),
                                  norm_weight=model.attn_norm[layer], norm_eps=eps)
        attention = decode_attention_reference(
            qkv, k_cache[layer], v_cache[layer], length, cos, sin, num_heads=model.num_heads,
            q_norm=None if model.q_norm is None else model.q_norm[layer],
            k_norm=None if model.k_norm is None else model.k_norm[layer], eps=eps,
            sliding_window=model.sliding_window)
        x = int4_gemv_reference(attention.reshape(-1), *layer_linear(model.o, layer), bias=bias(model.o, layer),
                                residual=x)
        hidden = int4_gemv_reference(x, *layer_linear(model.gate_up, layer), bias=bias(model.gate_up, layer),
                                     norm_weight=model.mlp_norm[layer], norm_eps=eps, gated=True)
        x = int4_gemv_reference(hidden, *layer_linear(model.down, layer), bias=bias(model.down, layer), residual=x)
    return int4_gemv_reference(x, *layer_linear(model.head, 0), norm_weight=model.final_norm, norm_eps=eps)
