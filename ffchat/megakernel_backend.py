"""The megakernel backend: each decode step is one persistent Triton launch (``ffchat.kernels.megakernel``).

It is the Triton backend with its decode step replaced: the same INT4 weights (stacked over
layers here, the Triton backend's per-layer tensors becoming views of the stacks), the same KV
cache and RoPE tables, the same prefill. The attention workspace is its own: the Triton
backend's is sized for one KV head at the full context (hundreds of shares per head at 128k),
the megakernel's has a fixed number of shares per KV head, together about one per program. The step is captured once in a
CUDA graph (the launch and the logits copy) and replayed per token.

The kernel's error flag (a dependency wait that gave up) is copied to pinned host memory at the
end of every step without a sync; the next ``decode`` reads that copy without waiting (it is
current whenever the caller has synchronised, as sampling does), ``check`` waits for it.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from ffchat.backend import Chooser
from ffchat.errors import FfchatError
from ffchat.kernels.decode_attention import make_workspace
from ffchat.kernels.int4_gemv import GemvConfig, pick_config, sm_count
from ffchat.kernels.megakernel import (
    GEMV_ROLES, DecodeModel, MegakernelConfig, StackedLinear, compile_megakernel, megakernel_decode, prepare,
)
from ffchat.kernels.schedule import stage_of_error
from ffchat.kernels.trace import StageTime, stage_times
from ffchat.shapes import BenchWeights, Int4Linear
from ffchat.triton_backend import TritonBackend, TritonLayer


# Largest logit difference from the Triton backend's step, relative to the largest logit, that the start-up
# check accepts: both round bf16 activations, in different orders (split-K, tiles).
SELF_CHECK_TOLERANCE = 3e-2
PROGRAMS_PER_SM = 2
MOST_ATTENTION_SPLITS = 32


def default_config(model: DecodeModel, device: torch.device) -> MegakernelConfig:
    """Two programs of 4 warps per SM (one in the interpreter), the GPU profile's W4A16 tiles
    without split-K or register cap, each requesting its next tile before computing the current one;
    attention in about one share per program (a power of two from 2 to 32 per KV head) of 64-key blocks.

    Measured on an H200 (1B, context 512; BENCHMARKS.md, 2026-12-02): one program per SM 894 us, two 598,
    three or four under a register cap 636-648; 8 warps 929 (and then only one fits an SM); prefetch 583.
    Attention (1B): 32 shares of 64-key blocks 599 us at context 512 and 661 at 4096, of 16-key blocks
    615 and 760, 16 shares of 16 keys 640 at 512.
    """
    programs = PROGRAMS_PER_SM * sm_count(device) if device.type == "cuda" else 1
    tiles = {}
    for role in GEMV_ROLES:
        linear: StackedLinear = getattr(model, role)
        tiles[role] = megakernel_tile(pick_config(linear.rows, linear.inputs, linear.group_size,
                                                  gated=role == "gate_up", device=device))
    return MegakernelConfig(programs=programs, num_warps=4, tiles=tiles,
                            attention_splits=attention_splits(programs, model.num_kv_heads))


def megakernel_tile(tile: GemvConfig) -> GemvConfig:
    """A GEMV tile as the megakernel runs it: one K slice, no register cap of its own (the kernel's applies), the
    next tile requested before the current one is computed."""
    return replace(tile, split_k=1, max_registers=None, prefetch=True, programs_per_sm=0)


def config_from_fields(fields: dict) -> MegakernelConfig:
    """A config from its ``dataclasses.asdict`` fields, the tuning cache's form."""
    return MegakernelConfig(**{**fields, "tiles": {role: GemvConfig(**tile) for role, tile in fields["tiles"].items()}})


def attention_splits(programs: int, num_kv_heads: int) -> int:
    """Shares per KV head for one layer's attention items to about fill the grid: a power of two, 2 to 32.

    Independent of the context: each share's keys grow with the length, not the number of items.
    """
    per_head = max(2, programs // num_kv_heads)
    return min(MOST_ATTENTION_SPLITS, 1 << (per_head.bit_length() - 1))


def _stack_role(layers: list[TritonLayer], role: str, bias_role: str) -> StackedLinear:
    """The role's weights of every layer in one [L, ...] tensor each; the layers then hold views of them."""
    linears: list[Int4Linear] = [getattr(layer, role) for layer in layers]
    qweight, scales, zeros = (torch.stack(parts) for parts in zip(*((l.qweight, l.scales, l.zeros) for l in linears)))
    biases = [getattr(layer, bias_role) for layer in layers]
    bias = None if biases[0] is None else torch.stack(biases)
    group_size = linears[0].group_size
    for index, layer in enumerate(layers):
        setattr(layer, role, Int4Linear(qweight[index], scales[index], zeros[index], group_size))
        if bias is not None:
            setattr(layer, bias_role, bias[index])
    return StackedLinear(qweight, scales, zeros, group_size, bias)


class MegakernelBackend(TritonBackend):
    """One conversation on the whole-model kernel (see ffchat.backend.Backend); prefill as the Triton backend."""

    def __init__(self, weights: BenchWeights, context_length: int, *, dtype: torch.dtype = torch.bfloat16,
                 use_graph: bool | None = None, config: MegakernelConfig | None = None,
                 schedule: Tensor | None = None):
        """``config`` and ``schedule`` override the tuned or default ones (tuning and tests)."""
        super().__init__(weights, context_length, dtype=dtype, name="megakernel", use_graph=use_graph)
        if not isinstance(self.head, Int4Linear):
            raise FfchatError("the megakernel needs an INT4 LM head and this model keeps it in 16 bits",
                              hint="use --backend triton")
        self.model = self._stack_model()
        cached = self.cached_tuning.megakernel if self.cached_tuning else None
        tuned = config_from_fields(cached.config) if cached and cached.config and not config else None
        self.kernel_config = config or tuned or default_config(self.model, self.device)
        self.attention_workspace = self._workspace(self.kernel_config)
        self.state = prepare(self.model, self.kernel_config, self.attention_workspace, schedule)
        self.error_seen = torch.zeros(1, dtype=torch.int32, pin_memory=self.device.type == "cuda")
        self.details = {**self.details, "megakernel_tuned": tuned is not None, "programs": self.kernel_config.programs,
                        "attention_splits": self.kernel_config.attention_splits,
                        "schedule_slots": self.state.schedule.shape[1] - 1}
        if self.device.type == "cuda":
            self._self_check()

    def _self_check(self) -> None:
        """Before first use on a GPU: one step against the Triton backend's kernels on the same weights and cache.

        Raises FfchatError if the grid cannot be resident, a wait gave up, or the logits disagree.
        """
        self._set_step(0)  # token 0 at position 0
        TritonBackend._decode_step(self)
        want = self.logits.clone()
        try:
            self._decode_step()
        except ValueError as exc:  # a grid that cannot be resident: never launched again
            raise FfchatError(f"the megakernel cannot run on this GPU: {exc}", hint="use --backend triton") from None
        self.check()
        error = float((self.logits - want).abs().max() / want.abs().max())
        if error > SELF_CHECK_TOLERANCE:  # within it, a different argmax is a near-tie of rounding
            raise FfchatError(f"the megakernel failed its start-up check against the triton backend (relative "
                              f"error {error:.1e})", hint="use --backend triton")
        self.details["self_check_error"] = error

    def _stack_model(self) -> DecodeModel:
        layers, config = self.layers, self.config

        def stacked(name: str) -> Tensor | None:
            parts = [getattr(layer, name) for layer in layers]
            return None if parts[0] is None else torch.stack(parts)

        head = self.head
        return DecodeModel(
            embed=self.embed, attn_norm=stacked("attn_norm"), mlp_norm=stacked("mlp_norm"),
            final_norm=self.final_norm, q_norm=stacked("q_norm"), k_norm=stacked("k_norm"),
            qkv=_stack_role(layers, "qkv", "qkv_bias"), o=_stack_role(layers, "o", "o_bias"),
            gate_up=_stack_role(layers, "gate_up", "gate_up_bias"), down=_stack_role(layers, "down", "down_bias"),
            head=StackedLinear(head.qweight[None], head.scales[None], head.zeros[None], head.group_size),
            num_heads=config.num_heads, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
            eps=config.rms_norm_eps, sliding_window=config.sliding_window,
        )

    def _workspace(self, config: MegakernelConfig):
        """An attention workspace for ``config``'s shares at this backend's context."""
        return make_workspace(self.config.num_heads, self.config.head_dim, self.context_length,
                              config.attention_config(), num_kv_heads=self.config.num_kv_heads, device=self.device)

    def compile_config(self, config: MegakernelConfig) -> None:
        """Compile the kernel of ``config`` for this backend's shape and tensors, without running it (tuning)."""
        workspace = self._workspace(config)
        compile_megakernel(self.model, self.k_cache, self.v_cache, self.rope_cos, self.rope_sin, self.step_ids,
                           workspace, prepare(self.model, config, workspace))

    def decode(self, token: int | Tensor) -> Tensor:
        self._raise_on_error()
        return super().decode(token)

    def decode_chain(self, token: Tensor, chooser: Chooser, count: int) -> Tensor:
        self._raise_on_error()
        return super().decode_chain(token, chooser, count)

    def trace_step(self, token: int) -> list[StageTime]:
        """Decode ``token`` at the current position once more outside the graph, stamping every schedule entry
        (``ffchat.kernels.trace``): a row per stage. The position does not advance; the logits are the step's."""
        self._set_step(token)
        self.state.start_trace()
        try:
            for _ in range(2):  # the first compiles the stamped kernel and warms the caches
                self._decode_step()
            self.check()
            return stage_times(self.state.stages, self.state.schedule, self.state.trace)
        finally:
            self.state.trace = None

    def check(self) -> None:
        """Wait for the steps queued so far; raise if one had a dependency wait give up (its logits are garbage)."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        self._raise_on_error()

    def _raise_on_error(self) -> None:
        flag = int(self.error_seen[0])
        if flag:
            raise FfchatError(f"the whole-model kernel stopped waiting for {stage_of_error(self.state.stages, flag)} "
                              "(a scheduling bug; its output is wrong)", hint="use --backend triton")

    def _decode_step(self) -> None:
        megakernel_decode(self.model, self.k_cache, self.v_cache, self.rope_cos, self.rope_sin, self.step_ids,
                          self.attention_workspace, self.state)
        self.logits.copy_(self.state.logits)
        self.error_seen.copy_(self.state.error, non_blocking=True)
