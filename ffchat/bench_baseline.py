"""The "torch-compile" baseline: gpt-fast's recipe, run on exactly our weights.

Static KV cache, the decode step under ``torch.compile(mode="reduce-overhead")``
(CUDA graphs), bf16 activations, INT4 linears through torch's tinygemm
(``aten._weight_int4pack_mm``), q/k/v and gate/up fused. It is what a good stock
PyTorch stack reaches, so every ffchat backend quotes its speed as a ratio to it.

Our INT4 layout v1 converts to tinygemm without re-quantizing: tinygemm computes
W = (q - 8) * s + m, ours W = (q - z) * s, so the codes q stay the same and
m = (8 - z) * s; only scale and m are rounded to bf16, tinygemm's format.
Like gpt-fast, prefill runs eagerly and attention reads the whole static cache
under a mask. The module runs eagerly on the CPU too (torch's CPU int4 ops), so
its numerics are tested without a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ffchat.backend import check_prompt_fits, check_rewind, check_room_for_tokens
from ffchat.errors import FfchatError
from ffchat.model import apply_rope, rms_norm, rope_tables
from ffchat.quantize.layout import unpack_int4
from ffchat.shapes import EMBED, HEAD, BenchWeights, Int4Linear

TINYGEMM_GROUP_SIZES = (32, 64, 128, 256)
INNER_K_TILES = (8, 4, 2)  # tinygemm packs K in tiles of 16 * inner_k_tiles


def tinygemm_scales_and_zeros(scales: Tensor, zeros: Tensor) -> Tensor:
    """Our fp16 scales s and zeros z [N, K // G] -> tinygemm's bf16 [K // G, N, 2] of (s, (8 - z) * s)."""
    s = scales.float()
    return torch.stack([s, (8 - zeros.float()) * s], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)


def tinygemm_pack(linear: Int4Linear) -> tuple[Tensor, Tensor]:
    """(packed weight, scales_and_zeros) for ``_weight_int4pack_mm``, holding the same codes as ``linear``."""
    n, k = linear.qweight.shape[0], linear.qweight.shape[1] * 8
    tiles = next((t for t in INNER_K_TILES if k % (16 * t) == 0), None)
    if linear.group_size not in TINYGEMM_GROUP_SIZES or tiles is None or n % 8:
        raise FfchatError(
            f"the torch-compile baseline cannot run a {n}x{k} INT4 weight with group size {linear.group_size}",
            hint="tinygemm needs N a multiple of 8, K of 32 and a group size of 32-256",
        )
    q = unpack_int4(linear.qweight)
    if q.device.type == "cpu":
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), tiles)
    else:  # two codes per byte, the even-indexed one in the high nibble
        packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).contiguous(), tiles)
    return packed, tinygemm_scales_and_zeros(linear.scales, linear.zeros)


class Linear(nn.Module):
    """y = x W^T (+ b) for x [T, K] bf16: tinygemm INT4 or a bf16 matrix."""

    def __init__(self, weight: Tensor | Int4Linear, bias: Tensor | None):
        super().__init__()
        self.int4 = isinstance(weight, Int4Linear)
        if self.int4:
            packed, scales_and_zeros = tinygemm_pack(weight)
            self.group_size = weight.group_size
            self.register_buffer("packed", packed)
            self.register_buffer("scales_and_zeros", scales_and_zeros)
            self.cpu = packed.device.type == "cpu"
        else:
            self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x: Tensor) -> Tensor:
        if not self.int4:
            return F.linear(x, self.weight, self.bias)
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu if self.cpu else torch.ops.aten._weight_int4pack_mm
        y = mm(x, self.packed, self.group_size, self.scales_and_zeros)
        return y if self.bias is None else y + self.bias


def fused_linear(weights: BenchWeights, names: Sequence[str]) -> Linear:
    """One Linear computing the named linears side by side (their rows concatenated)."""
    biases = [weights.dense.get(f"{name}.bias") for name in names]
    bias = torch.cat(biases) if all(b is not None for b in biases) else None
    if any(b is not None for b in biases) and bias is None:
        raise FfchatError(f"cannot fuse {', '.join(names)}: only some have a bias")
    if all(name in weights.int4 for name in names):
        parts = [weights.int4[name] for name in names]
        if len({p.group_size for p in parts}) > 1:
            raise FfchatError(f"cannot fuse {', '.join(names)}: their INT4 group sizes differ")
        cat = [torch.cat([getattr(p, f) for p in parts]) for f in ("qweight", "scales", "zeros")]
        return Linear(Int4Linear(*cat, parts[0].group_size), bias)
    if len(names) == 1:  # no copy of a lone (possibly tied) weight
        return Linear(weights.weight(names[0]), bias)
    return Linear(torch.cat([weights.weight(name) for name in names]), bias)


class Block(nn.Module):
    """One decoder layer with its own static K/V cache [kv_heads, max_seq_len, head_dim]."""

    def __init__(self, weights: BenchWeights, index: int, max_seq_len: int):
        super().__init__()
        c, p = weights.config, f"model.layers.{index}."
        self.heads, self.kv_heads, self.head_dim, self.eps = c.num_heads, c.num_kv_heads, c.head_dim, c.rms_norm_eps
        self.ffn = c.intermediate_size
        self.wqkv = fused_linear(weights, [p + f"self_attn.{x}_proj" for x in "qkv"])
        self.wo = fused_linear(weights, [p + "self_attn.o_proj"])
        self.w13 = fused_linear(weights, [p + "mlp.gate_proj", p + "mlp.up_proj"])
        self.w2 = fused_linear(weights, [p + "mlp.down_proj"])
        for ours, hf in (("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm"),
                         ("q_norm", "self_attn.q_norm"), ("k_norm", "self_attn.k_norm")):
            self.register_buffer(ours, weights.dense.get(f"{p}{hf}.weight"))
        cache = torch.zeros(c.num_kv_heads, max_seq_len, c.head_dim, dtype=torch.bfloat16,
                            device=weights.dense[EMBED].device)
        self.register_buffer("k_cache", cache)
        self.register_buffer("v_cache", cache.clone())

    def forward(self, x: Tensor, positions: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        length, hd = x.shape[0], self.head_dim
        q, k, v = self.wqkv(rms_norm(x, self.attn_norm, self.eps)).split(
            [self.heads * hd, self.kv_heads * hd, self.kv_heads * hd], dim=-1)
        q, k, v = q.view(length, self.heads, hd), k.view(length, self.kv_heads, hd), v.view(length, self.kv_heads, hd)
        if self.q_norm is not None:  # Qwen3
            q, k = rms_norm(q, self.q_norm, self.eps), rms_norm(k, self.k_norm, self.eps)
        q = apply_rope(q.transpose(0, 1), cos, sin)
        self.k_cache.index_copy_(1, positions, apply_rope(k.transpose(0, 1), cos, sin))
        self.v_cache.index_copy_(1, positions, v.transpose(0, 1))
        out = F.scaled_dot_product_attention(q[None], self.k_cache[None], self.v_cache[None], attn_mask=mask,
                                             enable_gqa=True)
        x = x + self.wo(out[0].transpose(0, 1).reshape(length, self.heads * hd))
        gate, up = self.w13(rms_norm(x, self.mlp_norm, self.eps)).split([self.ffn, self.ffn], dim=-1)
        return x + self.w2(F.silu(gate) * up)


class Decoder(nn.Module):
    """The model over static caches: ``forward(tokens [T], positions [T])`` -> bf16 logits [1, vocab] of the last."""

    def __init__(self, weights: BenchWeights, max_seq_len: int):
        super().__init__()
        c = weights.config
        self.eps, self.window, self.max_seq_len = c.rms_norm_eps, c.sliding_window, max_seq_len
        self.register_buffer("embed", weights.dense[EMBED])
        self.layers = nn.ModuleList(Block(weights, i, max_seq_len) for i in range(c.num_layers))
        self.register_buffer("norm", weights.dense["model.norm.weight"])
        self.head = fused_linear(weights, [HEAD])
        cos, sin = rope_tables(c, max_seq_len)
        self.register_buffer("cos", cos.to(self.embed.device))
        self.register_buffer("sin", sin.to(self.embed.device))

    def forward(self, tokens: Tensor, positions: Tensor) -> Tensor:
        keys = torch.arange(self.max_seq_len, device=tokens.device)
        mask = keys[None, :] <= positions[:, None]
        if self.window is not None:
            mask &= keys[None, :] > positions[:, None] - self.window
        x = F.embedding(tokens, self.embed)
        cos, sin = self.cos[positions], self.sin[positions]
        for layer in self.layers:
            x = layer(x, positions, cos, sin, mask)
        return self.head(rms_norm(x[-1:], self.norm, self.eps))


class TorchCompileBackend:
    """The Decoder behind the Backend protocol: eager prefill, compiled CUDA-graph decode step.

    The step's token and position live in device tensors updated with ``fill_``,
    so a decode call never waits for the GPU (as in gpt-fast's loop).
    """

    def __init__(self, weights: BenchWeights, context_length: int, name: str = "torch-compile"):
        self.name = name
        self.config = weights.config
        self.context_length = context_length
        self.device = weights.dense[EMBED].device
        self.position = 0
        self.model = Decoder(weights, context_length)
        self.step = torch.compile(self.model, mode="reduce-overhead", fullgraph=True, dynamic=False)
        self._token = torch.zeros(1, dtype=torch.long, device=self.device)
        self._position = torch.zeros(1, dtype=torch.long, device=self.device)
        # For the bench report: what makes this baseline what it is.
        self.details = {"static_cache_tokens": context_length, "prefill": "eager", "cuda_graphs": None}

    def warm_up(self) -> None:
        """Compile and record the CUDA graph now (cudagraph trees record on the second call, replay from the third).

        ``details["cuda_graphs"]`` says whether inductor really used CUDA graphs:
        it falls back silently (bar a log line) when it cannot, and then this is
        no longer gpt-fast's recipe.
        """
        from torch._dynamo.utils import counters

        skips = counters["inductor"]["cudagraph_skips"]
        for _ in range(3):
            self.decode(0)
        self.rewind(0)
        self.details["cuda_graphs"] = counters["inductor"]["cudagraph_skips"] == skips

    @torch.no_grad()
    def prefill(self, tokens: Sequence[int]) -> Tensor:
        check_prompt_fits(self, len(tokens))
        ids = torch.tensor(list(tokens), dtype=torch.long, device=self.device)
        positions = torch.arange(self.position, self.position + len(tokens), device=self.device)
        logits = self.model(ids, positions)
        self.position += len(tokens)
        return logits[0].float()

    @torch.no_grad()
    def decode(self, token: int | Tensor) -> Tensor:
        check_room_for_tokens(self)
        if isinstance(token, Tensor):
            self._token.copy_(token)
        else:
            self._token.fill_(token)
        self._position.fill_(self.position)
        torch.compiler.cudagraph_mark_step_begin()
        logits = self.step(self._token, self._position)
        self.position += 1
        return logits[0].float()  # a fresh tensor: the graph's output is overwritten by the next replay

    def rewind(self, position: int) -> None:
        check_rewind(self, position)
        self.position = position
