"""The Triton backend: INT4 weights through fused Triton kernels, one CUDA graph per decode step.

A decode step is six launches per layer, each fusing what it can:
norm+QKV GEMV, RoPE+q/k-norm+KV-append+attention partials (split along the
sequence), attention reduce, O GEMV+residual, norm+gate/up GEMV+SiLU*up, down
GEMV+residual; then final norm+LM head. Every launch reads the token and the
cache length from one device tensor, so the step is captured once as a CUDA
graph and replayed for every token, with nothing from the host but two integers,
copied from pinned memory without blocking the host. The generation loop
chains steps instead (``decode_chain``): several steps and the picks between
them in one graph, each pick written where the next step reads its token.
A prompt is prefilled in chunks: each INT4 weight is dequantized into one
reusable scratch buffer and multiplied with torch (cuBLAS), attention by torch
SDPA over the cache.

``int8_activations`` (backend name ``triton-w4a8``) is an opt-in, lossy mode: the
norm+gate/up and final norm+LM head GEMVs become a small launch that normalizes
and rounds x to int8 per weight group, then a W4A8 GEMV (dp4a); see BENCHMARKS.md
for what it gains and `ffchat ppl --int8-activations` for what it costs.

It is the stepping stone to, and the fallback for, the whole-model kernel, and
shares its inputs: ``BenchWeights`` (the INT4 artifact) and the KV cache layout
[layers, kv_heads, context, head_dim].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ffchat.backend import Chooser, check_prompt_fits, check_rewind, check_room_for_tokens
from ffchat.config import ModelConfig
from ffchat.errors import FfchatError
from ffchat.kernels.decode_attention import decode_attention, make_workspace
from ffchat.kernels.dp2a_gemv import int4_gemv_dp2a
from ffchat.kernels.int4_dequant import dequantize_int4
from ffchat.kernels.int4_gemv import GemvConfig, int4_gemv, int4_gemv_w4a8
from ffchat.kernels.lane_gemv import int4_gemv_lanes
from ffchat.kernels.rope_kv import rope_kv_append
from ffchat.model import attention_mask, int8_round, rms_norm, rope_tables
from ffchat.profiles import GpuIdentity
from ffchat.shapes import EMBED, HEAD, BenchWeights, Int4Linear
from ffchat.tuning_cache import load_tuning

# GEMVs that let the next launch become resident before their own input is ready (``ffchat.kernels.pdl``), untuned:
# behind attention, which does the same, the O projection's release puts gate/up's first weights in flight too.
# `ffchat tune` settles the q/k/v GEMV's order per shape by the whole step (``ffchat.tune.RELEASE_CONTENDERS``).
EARLY_RELEASE_ROLES = frozenset({"o"})
# The decode GEMV kernels `ffchat tune` chooses between, by the name its cache stores: W4A16 (the profile's, and
# every untuned role's), dp2a (x as int16 codes) and the word-a-lane W4A16.
W4A16, DP2A, LANES = "w4a16", "dp2a", "lanes"
GEMV_KERNELS = {W4A16: int4_gemv, DP2A: int4_gemv_dp2a, LANES: int4_gemv_lanes}

# Captured chains of decode steps kept (``TritonBackend.decode_chain``): the generator chains a full and a
# single-token length for each of the sampling setups ``ffchat.sampling.Choices`` keeps.
MOST_CHAINS = 8
# Tokens per prefill pass: bounds the activations and the attention mask of a long prompt.
PREFILL_CHUNK = 1024
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class TritonLayer:
    """One layer's weights as the kernels take them: q/k/v and gate/up fused along the rows."""

    attn_norm: Tensor
    qkv: Int4Linear
    qkv_bias: Tensor | None
    q_norm: Tensor | None
    k_norm: Tensor | None
    o: Int4Linear
    o_bias: Tensor | None
    mlp_norm: Tensor
    gate_up: Int4Linear
    gate_up_bias: Tensor | None
    down: Int4Linear
    down_bias: Tensor | None


def unsupported_reason(config: ModelConfig) -> str | None:
    """Why the kernels cannot run this model, or None: they tile a head in one power-of-two block."""
    d = config.head_dim
    if d < 16 or d & (d - 1):
        return f"head dimension {d} is not a power of two >= 16"
    return None


def stack_rows(name: str, *linears: Int4Linear) -> Int4Linear:
    """One INT4 linear whose rows are the given linears' rows in order (same K and group size)."""
    sizes = {linear.group_size for linear in linears}
    if len(sizes) != 1:
        raise FfchatError(f"the triton backend needs one INT4 group size across {name}, found {sorted(sizes)}",
                          hint="re-quantize with one --group-size, or use --backend reference")
    return Int4Linear(*(torch.cat(parts) for parts in zip(*((l.qweight, l.scales, l.zeros) for l in linears))),
                      sizes.pop())


def prompt_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm for the prefill, through torch's own (one fused kernel on CUDA, not ``ffchat.model.rms_norm``'s
    eight): a prompt's prefill is bound by the host's launches (BENCHMARKS.md, stop 27), and the two norms were
    half of a layer's torch launches. It scales in fp32 and rounds once, where Hugging Face rounds before the
    weight: within a rounding of the reference."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _cat_or_none(tensors: Sequence[Tensor | None]) -> Tensor | None:
    return None if tensors[0] is None else torch.cat(list(tensors))


class TritonBackend:
    """One conversation's KV cache and decode graph over INT4 weights (see ffchat.backend.Backend)."""

    def __init__(self, weights: BenchWeights, context_length: int, *, dtype: torch.dtype = torch.bfloat16,
                 name: str | None = None, use_graph: bool | None = None, int8_activations: bool = False):
        """``int8_activations``: the W4A8 mode, where gate/up and the LM head read their input rounded to
        int8 per weight group (dp4a products, ~1e-2 relative error per output; see `ffchat ppl
        --int8-activations` for what it costs a model). The other GEMVs, where int8 measured no faster,
        stay W4A16."""
        if not weights.int4:
            raise FfchatError("the triton backend runs INT4 weights", hint="run `ffchat quantize` first, or use "
                                                                           "--backend reference")
        reason = unsupported_reason(weights.config)
        if reason:
            raise FfchatError(f"the triton backend cannot run this model: {reason}", hint="use --backend reference")
        if dtype not in ACTIVATION_DTYPES:
            raise FfchatError(f"the triton backend computes in fp16 or bf16, not {str(dtype).removeprefix('torch.')}")
        config = self.config = weights.config
        self.int8_activations = int8_activations
        self.name = name or ("triton-w4a8" if int8_activations else "triton")
        self.dtype = dtype
        self.context_length = context_length
        self.position = 0
        self.device = weights.dense[EMBED].device
        self.use_graph = self.device.type == "cuda" if use_graph is None else use_graph
        self.layers = [self._layer(weights, i) for i in range(config.num_layers)]
        self.embed = self._dense(weights, EMBED)
        self.final_norm = self._dense(weights, "model.norm.weight")
        self.head: Int4Linear | Tensor = weights.int4.get(HEAD) or self._dense(
            weights, f"{HEAD}.weight" if f"{HEAD}.weight" in weights.dense else EMBED)
        cache_shape = (config.num_layers, config.num_kv_heads, context_length, config.head_dim)
        self.k_cache = torch.zeros(cache_shape, dtype=dtype, device=self.device)
        self.v_cache = torch.zeros(cache_shape, dtype=dtype, device=self.device)
        self.rope_cos, self.rope_sin = (t.to(self.device) for t in rope_tables(config, context_length))
        # (token, tokens cached once it is appended): everything the captured step reads from the host.
        self.step_ids = torch.zeros(2, dtype=torch.int32, device=self.device)
        self.logits = torch.zeros(config.vocab_size, dtype=torch.float32, device=self.device)
        # Shares sized for the model's KV heads: sized for one (the worst case), a 128k cache gave the 1B 512
        # shares a head, 4096 programs a layer, mostly idle: 707 instead of 506 us a step at 128 cached tokens.
        self.attention_workspace = make_workspace(config.num_heads, config.head_dim, context_length,
                                                  num_kv_heads=config.num_kv_heads, device=self.device)
        largest = max(linear.qweight.numel() * 8 for layer in self.layers
                      for linear in (layer.qkv, layer.o, layer.gate_up, layer.down))
        self.scratch = torch.empty(largest, dtype=dtype, device=self.device)  # prefill's dequantized weight
        self.graph: torch.cuda.CUDAGraph | None = None
        self.captures = 0
        # (chooser, count) -> a captured chain of steps and its picks' buffer (``decode_chain``)
        self.chains: dict[tuple[Chooser, int], tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        # What `ffchat tune` measured for this shape on this GPU: the GEMV tiles and kernels by role, else the
        # profile's W4A16 tables.
        self.cached_tuning = load_tuning(GpuIdentity.of(self.device), config, weights.group_size) \
            if self.device.type == "cuda" else None
        self.tuning = None if self.cached_tuning is None else {
            role: GemvConfig(**fields) for role, fields in self.cached_tuning.gemv.items()}
        self.role_kernels = {} if self.cached_tuning is None else dict(self.cached_tuning.kernels)
        self.early_release_roles = EARLY_RELEASE_ROLES if self.cached_tuning is None \
            else self.cached_tuning.release_early
        self.details = {"tuned": self.tuning is not None, "kernels": dict(self.role_kernels),
                        "early_release_roles": sorted(self.early_release_roles)}

    def use_kernels(self, tuning: dict[str, GemvConfig] | None, role_kernels: dict[str, str],
                    early_release_roles: frozenset[str] = EARLY_RELEASE_ROLES) -> None:
        """Run the decode GEMVs with these tiles, kernels by role (``GEMV_KERNELS``' names; W4A16 where absent) and
        early releases from the next step on (tuning compares choices)."""
        self.tuning, self.role_kernels = tuning, dict(role_kernels)
        self.early_release_roles = frozenset(early_release_roles)
        self.graph = None  # captured with the old ones
        self.chains.clear()

    def _dense(self, weights: BenchWeights, name: str) -> Tensor:
        return weights.dense[name].to(device=self.device, dtype=self.dtype)

    def _layer(self, weights: BenchWeights, index: int) -> TritonLayer:
        prefix = f"model.layers.{index}."

        def linear(name: str) -> Int4Linear:
            return weights.int4[prefix + name]

        def dense(name: str) -> Tensor | None:
            tensor = weights.dense.get(prefix + name)
            return None if tensor is None else tensor.to(device=self.device, dtype=self.dtype)

        attn, mlp = "self_attn.", "mlp."
        return TritonLayer(
            attn_norm=dense("input_layernorm.weight"),
            qkv=stack_rows(f"layer {index}'s q/k/v", *(linear(f"{attn}{p}_proj") for p in "qkv")),
            qkv_bias=_cat_or_none([dense(f"{attn}{p}_proj.bias") for p in "qkv"]),
            q_norm=dense(f"{attn}q_norm.weight"),
            k_norm=dense(f"{attn}k_norm.weight"),
            o=linear(f"{attn}o_proj"),
            o_bias=dense(f"{attn}o_proj.bias"),
            mlp_norm=dense("post_attention_layernorm.weight"),
            gate_up=stack_rows(f"layer {index}'s gate/up", linear(f"{mlp}gate_proj"), linear(f"{mlp}up_proj")),
            gate_up_bias=_cat_or_none([dense(f"{mlp}gate_proj.bias"), dense(f"{mlp}up_proj.bias")]),
            down=linear(f"{mlp}down_proj"),
            down_bias=dense(f"{mlp}down_proj.bias"),
        )

    # --- the Backend protocol ---------------------------------------------------------------

    def prefill(self, tokens: Sequence[int]) -> Tensor:
        check_prompt_fits(self, len(tokens))
        ids = torch.tensor(list(tokens), dtype=torch.long, device=self.device)
        for start in range(0, len(tokens), PREFILL_CHUNK):
            last = self._prefill_chunk(ids[start:start + PREFILL_CHUNK])
        self._head(last)
        return self.logits.clone()

    def decode(self, token: int | Tensor) -> Tensor:
        self._set_step(token)
        if not self.use_graph:
            self._decode_step()
        elif self.graph is None:
            self._capture()
        else:
            self.graph.replay()
        self.position += 1
        return self.logits.clone()  # samplers may edit logits in place; the graph owns self.logits

    def decode_chain(self, token: Tensor, chooser: Chooser, count: int) -> Tensor:
        """``count`` steps, each feeding the token ``chooser`` picks to the next on the device (see
        ``ffchat.backend.ChainingBackend``): one graph replay, captured at the first use of each (chooser, count)
        after a run that compiles what it needs and computes these picks."""
        check_room_for_tokens(self, count)
        self._set_step(token)
        key = (chooser, count)
        if key in self.chains:
            graph, picks = self.chains[key]
            graph.replay()
        else:
            picks = torch.empty(count, dtype=torch.long, device=self.device)
            self._chain(chooser, picks)
            if self.use_graph:
                self._capture_chain(key)
        self.position += count
        return picks

    def _chain(self, chooser: Chooser, picks: Tensor) -> None:
        """One step a pick, each pick written where the next step reads its token: device work only."""
        for slot in range(picks.numel()):
            self._decode_step()
            token = chooser.choose(self.logits, slot)
            self.step_ids[0:1].copy_(token)
            self.step_ids[1:2].add_(1)
            picks[slot:slot + 1].copy_(token)

    def _capture_chain(self, key: tuple[Chooser, int]) -> None:
        """Capture the chain of ``key``; the oldest chain goes once more than ``MOST_CHAINS`` are kept."""
        picks = torch.empty(key[1], dtype=torch.long, device=self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._chain(key[0], picks)
        self.chains[key] = graph, picks
        while len(self.chains) > MOST_CHAINS:
            del self.chains[next(iter(self.chains))]

    def warm_up(self) -> None:
        """Compile and capture the decode step now, so the first answer's tokens do not wait for it (seconds
        where Triton must compile, tens of ms otherwise; once). The step it runs decodes token 0 into the next
        free slot of the cache, which the next prefill or decode overwrites; the position does not move. Nothing
        to do without a graph or once captured."""
        if self.use_graph and self.graph is None:
            self._set_step(0)
            self._capture()

    def _set_step(self, token: int | Tensor) -> None:
        """Queue ``step_ids`` = (token, length with it) for a step at the current position, which does not move.

        From pinned memory without blocking: the host queues the replay while the GPU still runs the last step
        (torch keeps the pinned block until the copy has run). A token on the device is copied there.
        """
        check_room_for_tokens(self)
        on_device = isinstance(token, Tensor)
        ids = torch.tensor([0 if on_device else token, self.position + 1], dtype=torch.int32,
                           pin_memory=self.device.type == "cuda")
        self.step_ids.copy_(ids, non_blocking=True)
        if on_device:
            self.step_ids[:1].copy_(token)

    def rewind(self, position: int) -> None:
        check_rewind(self, position)
        self.position = position  # later tokens are overwritten before they are read again

    # --- decode: the captured step ----------------------------------------------------------

    def _decode_step(self) -> None:
        """One token through every layer, reading (token, length with it) from ``step_ids``."""
        config, eps = self.config, self.config.rms_norm_eps
        length = self.step_ids[1:2]
        x = self.embed.index_select(0, self.step_ids[0:1])[0]
        for index, layer in enumerate(self.layers):
            qkv = self._gemv("qkv", x, layer.qkv, bias=layer.qkv_bias, norm_weight=layer.attn_norm)
            attention = decode_attention(qkv, self.k_cache[index], self.v_cache[index], length, self.rope_cos,
                                         self.rope_sin, num_heads=config.num_heads, q_norm=layer.q_norm,
                                         k_norm=layer.k_norm, eps=eps, sliding_window=config.sliding_window,
                                         workspace=self.attention_workspace)
            x = self._gemv("o", attention.view(-1), layer.o, bias=layer.o_bias, residual=x)
            hidden = self._gemv("gate_up", x, layer.gate_up, bias=layer.gate_up_bias, norm_weight=layer.mlp_norm,
                                gated=True, int8=self.int8_activations)
            x = self._gemv("down", hidden, layer.down, bias=layer.down_bias, residual=x)
        self._head(x)

    def _gemv(self, role: str, x: Tensor, linear: Int4Linear, *, int8: bool = False, **epilogue) -> Tensor:
        """The kernel (``GEMV_KERNELS``) and tile `ffchat tune` chose for ``role``, the profile's W4A16 tile if
        untuned; with ``int8`` W4A8 (x rounded to int8 per group, after the norm if one is given; its tiles come
        from the profile)."""
        if int8:
            return int4_gemv_w4a8(x, linear.qweight, linear.scales, linear.zeros, linear.group_size,
                                  norm_eps=self.config.rms_norm_eps, **epilogue)
        config = self.tuning.get(role) if self.tuning else None
        gemv = GEMV_KERNELS[self.role_kernels.get(role, W4A16)]
        return gemv(x, linear.qweight, linear.scales, linear.zeros, linear.group_size, config=config,
                    norm_eps=self.config.rms_norm_eps, release_early=role in self.early_release_roles, **epilogue)

    def _head(self, x: Tensor) -> None:
        """Final norm and LM head of one hidden vector into ``self.logits`` (fp32). An INT4 head's GEMV stores
        its fp32 sums there itself: a copy from the activation dtype was one more launch a step (~3.5 us on an
        H100, BENCHMARKS.md stop 28)."""
        if isinstance(self.head, Int4Linear):
            self._gemv("head", x, self.head, norm_weight=self.final_norm, int8=self.int8_activations, out=self.logits)
        else:
            self.logits.copy_(F.linear(rms_norm(x, self.final_norm, self.config.rms_norm_eps), self.head))

    def _capture(self) -> None:
        """Run the step once (compiling every kernel, and computing this token), then capture it."""
        self._decode_step()
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._decode_step()
        self.graph = graph
        self.captures += 1

    # --- prefill ----------------------------------------------------------------------------

    def _prefill_chunk(self, ids: Tensor) -> Tensor:
        """Run tokens at positions position.. through the model; return the last one's hidden vector."""
        config, eps = self.config, self.config.rms_norm_eps
        count, start = ids.shape[0], self.position
        end = start + count
        start_ids = torch.tensor([start], dtype=torch.int32, device=self.device)
        window = config.sliding_window
        # A fresh prompt that the sliding window does not cut is plain causal attention, which SDPA runs
        # as one flash-attention kernel (GQA included); anything else needs the explicit mask.
        mask = None if start == 0 and (window is None or window >= count) else attention_mask(
            start, count, window, self.device)
        x = self.embed[ids]
        for index, layer in enumerate(self.layers):
            qkv = self._matmul(prompt_rms_norm(x, layer.attn_norm, eps), layer.qkv, layer.qkv_bias)
            q = rope_kv_append(qkv, start_ids, self.rope_cos, self.rope_sin, self.k_cache[index],
                               self.v_cache[index], num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
                               head_dim=config.head_dim, q_norm=layer.q_norm, k_norm=layer.k_norm, eps=eps)
            attention = self._prompt_attention(q.transpose(0, 1), self.k_cache[index, :, :end],
                                               self.v_cache[index, :, :end], mask)
            x = x + self._matmul(attention.transpose(0, 1).reshape(count, -1), layer.o, layer.o_bias)
            mlp_in = prompt_rms_norm(x, layer.mlp_norm, eps)
            if self.int8_activations:  # the prompt sees the rounding its decoded tokens will see
                mlp_in = int8_round(mlp_in, layer.gate_up.group_size)
            gate, up = self._matmul(mlp_in, layer.gate_up, layer.gate_up_bias).chunk(2, -1)
            x = x + self._matmul(F.silu(gate) * up, layer.down, layer.down_bias)
        self.position = end
        return x[-1]

    def _prompt_attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """q [Hq, T, D] over k, v [Hkv, S, D] -> [Hq, T, D], through SDPA's fused kernels.

        Those take only 4-D inputs and (with a mask) no GQA; anything else falls back to SDPA's fp32
        math path of many launches, which an H200 profile showed as most of a 512-token prefill's
        host time. So: a batch dimension, and K/V heads repeated for the query heads.
        """
        group = self.config.num_heads // self.config.num_kv_heads
        q, k, v = q[None], k.repeat_interleave(group, 0)[None], v.repeat_interleave(group, 0)[None]
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)[0]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)[0]

    def _matmul(self, x: Tensor, linear: Int4Linear, bias: Tensor | None) -> Tensor:
        """x [T, K] @ W.T with W dequantized into the shared scratch buffer."""
        n, k = linear.qweight.shape[0], linear.qweight.shape[1] * 8
        weight = dequantize_int4(linear.qweight, linear.scales, linear.zeros, linear.group_size,
                                 out=self.scratch[: n * k].view(n, k))
        return F.linear(x, weight, bias)
