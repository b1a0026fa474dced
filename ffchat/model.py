"""The reference decoder: plain PyTorch, numerically faithful to Hugging Face.

Every faster backend is tested against this file, so it favours clarity over
speed. One ``Transformer`` covers all supported families; the differences are
flags on ``ModelConfig`` (q/k/v bias, q/k norm, RoPE scaling, sliding window,
tied embeddings).

Weights are plain tensors, not ``nn.Parameter``s, so other backends and the
quantizer can read them directly:

    model.embed            [vocab, hidden]       model.embed_tokens.weight
    model.norm             [hidden]              model.norm.weight
    model.lm_head          [vocab, hidden]       lm_head.weight (``embed`` itself when tied)
    model.layers[i].<name>                       model.layers.{i}.<Hugging Face name>, see LAYER_TENSORS
    model.k_cache, v_cache [layers, kv_heads, max_seq_len, head_dim]  (model dtype)
    model.rope_cos, rope_sin [max_seq_len, head_dim]                  (fp32)

Linear weights keep the Hugging Face [out_features, in_features] layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ffchat.config import ModelConfig, RopeConfig
from ffchat.errors import FfchatError
from ffchat.store import ModelRecord
from ffchat.weights import load_state_dict

# Context used when the caller names none: enough for chat, small enough that
# the KV cache of a 128k-context model does not fill the GPU.
DEFAULT_MAX_SEQ_LEN = 4096

# Our per-layer tensor name -> its Hugging Face name under "model.layers.{i}.".
LAYER_TENSORS = {
    "attn_norm": "input_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "bq": "self_attn.q_proj.bias",
    "bk": "self_attn.k_proj.bias",
    "bv": "self_attn.v_proj.bias",
    "bo": "self_attn.o_proj.bias",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "w_gate": "mlp.gate_proj.weight",
    "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
    "b_gate": "mlp.gate_proj.bias",
    "b_up": "mlp.up_proj.bias",
    "b_down": "mlp.down_proj.bias",
}

# Tensors some checkpoints carry that the model recomputes (old Llama .bin files).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class Layer:
    """One decoder layer's weights; the optional ones are None when the family has none."""

    attn_norm: Tensor | None = None
    wq: Tensor | None = None
    wk: Tensor | None = None
    wv: Tensor | None = None
    wo: Tensor | None = None
    bq: Tensor | None = None
    bk: Tensor | None = None
    bv: Tensor | None = None
    bo: Tensor | None = None
    q_norm: Tensor | None = None
    k_norm: Tensor | None = None
    mlp_norm: Tensor | None = None
    w_gate: Tensor | None = None
    w_up: Tensor | None = None
    w_down: Tensor | None = None
    b_gate: Tensor | None = None
    b_up: Tensor | None = None
    b_down: Tensor | None = None


def layer_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The per-layer tensors this config needs, with their shapes."""
    h, ffn, d = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_heads * d, config.num_kv_heads * d
    shapes = {
        "attn_norm": (h,), "wq": (q, h), "wk": (kv, h), "wv": (kv, h), "wo": (h, q),
        "mlp_norm": (h,), "w_gate": (ffn, h), "w_up": (ffn, h), "w_down": (h, ffn),
    }
    if config.qkv_bias:
        shapes.update(bq=(q,), bk=(kv,), bv=(kv,))
    if config.o_bias:
        shapes.update(bo=(h,))
    if config.qk_norm:
        shapes.update(q_norm=(d,), k_norm=(d,))
    if config.mlp_bias:
        shapes.update(b_gate=(ffn,), b_up=(ffn,), b_down=(h,))
    return shapes


def expected_tensors(config: ModelConfig) -> dict[str, tuple[int | None, str, tuple[int, ...]]]:
    """Hugging Face name -> (layer index or None, our name, shape) for every tensor the model needs."""
    vocab_by_hidden = (config.vocab_size, config.hidden_size)
    names = {
        "model.embed_tokens.weight": (None, "embed", vocab_by_hidden),
        "model.norm.weight": (None, "norm", (config.hidden_size,)),
    }
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = (None, "lm_head", vocab_by_hidden)
    for i in range(config.num_layers):
        for name, shape in layer_shapes(config).items():
            names[f"model.layers.{i}.{LAYER_TENSORS[name]}"] = (i, name, shape)
    return names


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim, statistics in fp32, scaled in the input dtype (as Hugging Face does)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def int8_codes(x: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per group of ``group_size`` along the last dim: fp32 codes in -127..127 and scales.

    scale = max|x| / 127 per group, code = floor(x / scale + 0.5): what ffchat's W4A8 GEMV
    feeds its dp4a products. Codes [..., K // G, G], scales [..., K // G].
    """
    groups = x.float().unflatten(-1, (-1, group_size))
    scales = groups.abs().amax(dim=-1).clamp(min=1e-30) / 127.0
    return torch.floor(groups / scales[..., None] + 0.5).clamp(-127, 127), scales


def int8_round(x: Tensor, group_size: int) -> Tensor:
    """x rounded through ``int8_codes`` and back, in x's dtype: the activation the W4A8 GEMV sees."""
    codes, scales = int8_codes(x, group_size)
    return (codes * scales[..., None]).flatten(-2).to(x.dtype)


def rope_inv_freq(head_dim: int, rope: RopeConfig) -> Tensor:
    """Rotation speed of each pair of dims (fp32), with Llama 3's frequency-dependent scaling if set."""
    inv_freq = 1.0 / rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    if rope.kind == "default":
        return inv_freq
    # Llama 3: stretch long wavelengths by `factor`, keep short ones, blend in between.
    old_context = rope.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    blend = (old_context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - blend) * inv_freq / rope.factor + blend * inv_freq
    scaled = torch.where(wavelen > old_context / rope.low_freq_factor, inv_freq / rope.factor, blended)
    return torch.where(wavelen < old_context / rope.high_freq_factor, inv_freq, scaled)


def rope_tables(config: ModelConfig, max_seq_len: int) -> tuple[Tensor, Tensor]:
    """cos and sin of every position's angles, [max_seq_len, head_dim] fp32, halves repeated."""
    angles = torch.outer(torch.arange(max_seq_len).float(), rope_inv_freq(config.head_dim, config.rope))
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate [heads, T, head_dim] by position; dim j pairs with j + head_dim/2 (the "rotate half" layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def attention_mask(start_pos: int, length: int, sliding_window: int | None, device: torch.device) -> Tensor:
    """[length, start_pos + length] bool: query at p sees keys k <= p, and k > p - window with a window."""
    queries = torch.arange(start_pos, start_pos + length, device=device)[:, None]
    keys = torch.arange(start_pos + length, device=device)[None, :]
    mask = keys <= queries
    if sliding_window is not None:
        mask &= keys > queries - sliding_window
    return mask


class Transformer:
    """A decoder with a KV cache preallocated for ``max_seq_len`` tokens; load weights with ``load_state_dict``."""

    def __init__(self, config: ModelConfig, max_seq_len: int, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", *, int8_activation_group: int | None = None):
        """``int8_activation_group``: round the inputs of gate/up and of the LM head to int8 per group of
        that size (``int8_round``), as the triton backend's W4A8 mode does; None keeps them exact."""
        if config.num_heads % config.num_kv_heads:
            raise FfchatError(f"{config.num_heads} attention heads cannot share {config.num_kv_heads} KV heads")
        if max_seq_len < 1:
            raise FfchatError(f"the context length must be positive, got {max_seq_len}")
        self.config = config
        self.max_seq_len = max_seq_len
        self.int8_activation_group = int8_activation_group
        self.dtype = dtype
        self.device = torch.device(device)
        self.embed: Tensor | None = None
        self.norm: Tensor | None = None
        self.lm_head: Tensor | None = None
        self.layers = [Layer() for _ in range(config.num_layers)]
        cache_shape = (config.num_layers, config.num_kv_heads, max_seq_len, config.head_dim)
        self.k_cache = torch.zeros(cache_shape, dtype=dtype, device=self.device)
        self.v_cache = torch.zeros(cache_shape, dtype=dtype, device=self.device)
        self.rope_cos, self.rope_sin = (t.to(self.device) for t in rope_tables(config, max_seq_len))

    def load_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Take weights by Hugging Face name, cast to the model dtype and device; refuse any mismatch."""
        expected = expected_tensors(self.config)
        present = {name for name in state_dict if not name.endswith(IGNORED_SUFFIXES)}
        # A tied model may still bring its own head: a stored copy, or the INT4
        # artifact's quantized head (the embedding lookup stays full precision).
        own_head = self.config.tie_word_embeddings and "lm_head.weight" in present
        if own_head:
            expected["lm_head.weight"] = (None, "lm_head", (self.config.vocab_size, self.config.hidden_size))
        _refuse("missing tensors", sorted(expected.keys() - present))
        _refuse("unexpected tensors", sorted(present - expected.keys()))
        for name, (index, attr, shape) in expected.items():
            tensor = state_dict[name]
            if tuple(tensor.shape) != shape:
                raise FfchatError(f"tensor {name} has shape {tuple(tensor.shape)}, the config implies {shape}")
            target = self if index is None else self.layers[index]
            setattr(target, attr, tensor.to(device=self.device, dtype=self.dtype))
        if self.config.tie_word_embeddings and not own_head:
            self.lm_head = self.embed

    @torch.inference_mode()
    def forward(self, tokens: Tensor, start_pos: int, *, last_only: bool = False) -> Tensor:
        """Run tokens [T] at positions start_pos.. through the model, caching their K/V.

        Returns fp32 logits [T, vocab], or [1, vocab] for the last token with
        ``last_only`` (a long prompt's full logits can take gigabytes).
        """
        length = tokens.shape[0]
        if length < 1:
            raise FfchatError("no tokens to run")
        if start_pos < 0 or start_pos + length > self.max_seq_len:
            raise FfchatError(
                f"positions {start_pos}..{start_pos + length - 1} are outside the context of {self.max_seq_len} tokens"
            )
        cos = self.rope_cos[start_pos:start_pos + length]
        sin = self.rope_sin[start_pos:start_pos + length]
        mask = attention_mask(start_pos, length, self.config.sliding_window, self.device)
        eps = self.config.rms_norm_eps
        x = F.embedding(tokens.to(self.device), self.embed)
        for index, layer in enumerate(self.layers):
            x = x + self._attention(index, layer, rms_norm(x, layer.attn_norm, eps), cos, sin, start_pos, mask)
            x = x + self._mlp(layer, self._w4a8_input(rms_norm(x, layer.mlp_norm, eps)))
        if last_only:
            x = x[-1:]
        return F.linear(self._w4a8_input(rms_norm(x, self.norm, eps)), self.lm_head).float()

    def _w4a8_input(self, x: Tensor) -> Tensor:
        """x as a W4A8 GEMV sees it (int8 per group) when the model emulates that mode, else x."""
        return x if self.int8_activation_group is None else int8_round(x, self.int8_activation_group)

    def _attention(self, index: int, layer: Layer, x: Tensor, cos: Tensor, sin: Tensor, start_pos: int,
                   mask: Tensor) -> Tensor:
        """Grouped-query attention of x [T, hidden] over the cache, after appending x's keys and values."""
        config, length = self.config, x.shape[0]
        q = F.linear(x, layer.wq, layer.bq).view(length, config.num_heads, config.head_dim)
        k = F.linear(x, layer.wk, layer.bk).view(length, config.num_kv_heads, config.head_dim)
        v = F.linear(x, layer.wv, layer.bv).view(length, config.num_kv_heads, config.head_dim)
        if config.qk_norm:  # Qwen3: per-head RMSNorm, before RoPE
            q = rms_norm(q, layer.q_norm, config.rms_norm_eps)
            k = rms_norm(k, layer.k_norm, config.rms_norm_eps)
        q = apply_rope(q.transpose(0, 1), cos, sin)
        k = apply_rope(k.transpose(0, 1), cos, sin)
        end = start_pos + length
        self.k_cache[index, :, start_pos:end] = k
        self.v_cache[index, :, start_pos:end] = v.transpose(0, 1)
        group = config.num_heads // config.num_kv_heads  # query head h reads KV head h // group
        keys = self.k_cache[index, :, :end].repeat_interleave(group, dim=0)
        values = self.v_cache[index, :, :end].repeat_interleave(group, dim=0)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return F.linear(out.transpose(0, 1).reshape(length, -1), layer.wo, layer.bo)

    @staticmethod
    def _mlp(layer: Layer, x: Tensor) -> Tensor:
        """SwiGLU: down(silu(gate(x)) * up(x))."""
        gate = F.silu(F.linear(x, layer.w_gate, layer.b_gate))
        return F.linear(gate * F.linear(x, layer.w_up, layer.b_up), layer.w_down, layer.b_down)


def _refuse(what: str, names: list[str]) -> None:
    """Raise one line naming a few of ``names``, if there are any."""
    if names:
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        raise FfchatError(f"the weights do not fit the config: {what} {', '.join(names[:3])}{more}")


def load_model(record_or_dir: ModelRecord | Path | str, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", max_seq_len: int | None = None) -> Transformer:
    """Build the model of a store record (or a Hugging Face model directory) with its weights.

    ``max_seq_len`` defaults to the model's maximum, capped at DEFAULT_MAX_SEQ_LEN.
    """
    model_dir = record_or_dir.model_dir if isinstance(record_or_dir, ModelRecord) else Path(record_or_dir)
    config = ModelConfig.from_file(model_dir / "config.json")
    if max_seq_len is None:
        max_seq_len = min(config.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
    model = Transformer(config, max_seq_len, dtype=dtype, device=device)
    model.load_state_dict(load_state_dict(record_or_dir, dtype=dtype))
    return model
