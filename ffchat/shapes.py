"""What `ffchat bench` runs on: real model shapes with random weights, or a stored model.

Decode speed depends on the shapes and the bytes, not on the values, so the
benchmark shapes need no download: their weights are drawn on the GPU from a
seeded generator and quantized to INT4 layout v1 with RTN, exactly as a
quantized model is stored. Every backend then runs the same ``BenchWeights``.
``decode_bytes`` counts what one decode step must read; it is the numerator of
the bandwidth roofline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ffchat.config import ModelConfig
from ffchat.errors import FfchatError
from ffchat.model import IGNORED_SUFFIXES, expected_tensors, layer_shapes
from ffchat.quantize.layout import choose_group_size, dequantize, pack_int4
from ffchat.quantize.rtn import quantize_rtn

# Hugging Face config.json fields of the benchmark shapes (GUIDE section 4); the
# tiny ones are smoke-test shapes (tinygemm needs K a multiple of 128 and N of 8).
_LLAMA3_ROPE = {
    "rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
}
SHAPES: dict[str, dict] = {
    "llama-3.2-1b": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 32.0, **_LLAMA3_ROPE}, "tie_word_embeddings": True,
    },
    "llama-3.1-8b": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 8.0, **_LLAMA3_ROPE}, "tie_word_embeddings": False,
    },
    "qwen2.5-0.5b": {
        "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True,
    },
    "tiny": {
        "model_type": "llama", "vocab_size": 1024, "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 8.0, **_LLAMA3_ROPE}, "tie_word_embeddings": False,
    },
    "tiny-qwen": {
        "model_type": "qwen2", "vocab_size": 1024, "hidden_size": 256, "intermediate_size": 768,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True,
    },
}

# Per-layer linears (our names in ffchat.model) and the LM head: what INT4 covers.
LINEARS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
HEAD = "lm_head"
EMBED = "model.embed_tokens.weight"
KV_ELEMENT_BYTES = 2  # every backend keeps its KV cache in bf16
DENSE_BYTES = 2  # bf16
# Elements per quantization chunk: bounds the int64 temporaries of a 128k-row head.
CHUNK_ELEMENTS = 1 << 26


def shape_config(name: str) -> ModelConfig:
    """The ModelConfig of a benchmark shape, parsed like a real config.json."""
    if name not in SHAPES:
        raise FfchatError(f"unknown shape {name!r}; choose one of: {', '.join(SHAPES)}")
    return ModelConfig.from_hf(SHAPES[name])


@dataclass
class Int4Linear:
    """One linear in INT4 layout v1: W [N, K] ~ (q - zeros) * scales per group."""

    qweight: Tensor  # int32 [N, K // 8]
    scales: Tensor  # fp16 [N, K // G]
    zeros: Tensor  # fp16 [N, K // G]
    group_size: int

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        """W [N, K] in ``dtype`` on the tensors' device, in row chunks."""
        n, k = self.qweight.shape[0], self.qweight.shape[1] * 8
        out = torch.empty(n, k, dtype=dtype, device=self.qweight.device)
        rows = max(1, CHUNK_ELEMENTS // k)
        for start in range(0, n, rows):
            part = slice(start, start + rows)
            out[part] = dequantize(self.qweight[part], self.scales[part], self.zeros[part], self.group_size, dtype)
        return out


@dataclass
class BenchWeights:
    """One model's weights as every backend receives them, by Hugging Face name.

    ``dense`` holds bf16 tensors (embeddings, norms, biases, and the linears when
    not INT4); ``int4`` holds the INT4 linears under their name without ``.weight``
    (``lm_head`` included when the head is quantized, tied models too).
    """

    config: ModelConfig
    label: str
    dense: dict[str, Tensor]
    int4: dict[str, Int4Linear]
    group_size: int | None  # the nominal INT4 group size; None for bf16 weights
    quantizer: str | None

    def weight(self, name: str) -> Tensor:
        """A linear's bf16 weight [N, K] by its name without ``.weight`` (dequantized if INT4)."""
        if name in self.int4:
            return self.int4[name].dequantize(torch.bfloat16)
        if name == HEAD and f"{HEAD}.weight" not in self.dense:
            return self.dense[EMBED]  # tied, unquantized
        return self.dense[f"{name}.weight"]

    def reference_state_dict(self) -> dict[str, Tensor]:
        """Hugging Face-named bf16 tensors for ffchat.model.Transformer (INT4 linears dequantized)."""
        state = dict(self.dense)
        for name in self.int4:
            state[f"{name}.weight"] = self.weight(name)
        return state

    def decode_bytes(self, context: int) -> dict[str, int]:
        """What one decode step with ``context`` tokens already cached reads (see ``decode_bytes``)."""
        return decode_bytes(self.config, context, group_size=self.group_size, head_int4=HEAD in self.int4)


def decode_bytes(config: ModelConfig, context: int, *, group_size: int | None,
                 head_int4: bool = True) -> dict[str, int]:
    """Bytes one decode step reads, by part; ``group_size`` None means bf16 linears.

    INT4 linears count their nibbles plus fp16 scale and zero per group (the
    group shrinks where K needs it, as the quantizer does); the step reads the
    whole LM head, one embedding row, every norm and bias, and the K and V of
    ``context + 1`` positions (the cached ones and its own).
    """

    def linear(n: int, k: int, int4: bool) -> int:
        if not int4:
            return n * k * DENSE_BYTES
        return n * k // 2 + n * (k // choose_group_size(k, group_size)) * 2 * 2

    layers = 0
    for name, shape in layer_shapes(config).items():
        if name in LINEARS:
            layers += linear(*shape, group_size is not None)
        else:
            layers += shape[0] * DENSE_BYTES
    kv_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * KV_ELEMENT_BYTES
    parts = {
        "layers": config.num_layers * layers + config.hidden_size * DENSE_BYTES,  # + the final norm
        "lm_head": linear(config.vocab_size, config.hidden_size, group_size is not None and head_int4),
        "embedding_row": config.hidden_size * DENSE_BYTES,
        "kv_cache": kv_per_token * (context + 1),
    }
    parts["total"] = sum(parts.values())
    return parts


@torch.no_grad()
def random_weights(config: ModelConfig, *, label: str, int4: bool, seed: int = 0, group_size: int = 128,
                   device: str | torch.device = "cuda") -> BenchWeights:
    """Seeded random weights of ``config`` on ``device``: N(0, 1/K) linears, INT4 via RTN unless ``int4`` is False.

    Norm weights are 1 + noise and biases small noise, so a backend that mixes
    up tensors cannot match the reference by luck. Tied models get an INT4 head
    quantized from the embeddings, as `ffchat quantize` makes it.
    """
    gen = torch.Generator(device=device).manual_seed(seed)

    def normal(*shape: int, std: float) -> Tensor:
        return torch.randn(*shape, generator=gen, device=device) * std

    dense: dict[str, Tensor] = {}
    quantized: dict[str, Int4Linear] = {}
    for name, (_, ours, shape) in expected_tensors(config).items():
        if len(shape) == 1:
            value = 1 + normal(*shape, std=0.1) if ours.endswith("norm") else normal(*shape, std=0.1)
            dense[name] = value.to(torch.bfloat16)
        elif int4 and (ours in LINEARS or ours == HEAD):
            quantized[name.removesuffix(".weight")] = _quantize(normal(*shape, std=shape[1] ** -0.5), group_size)
        else:
            dense[name] = normal(*shape, std=shape[1] ** -0.5).to(torch.bfloat16)
    if int4 and config.tie_word_embeddings:
        quantized[HEAD] = _quantize(dense[EMBED], group_size)
    return BenchWeights(config, label, dense, quantized, group_size if int4 else None, "rtn" if int4 else None)


def _quantize(w: Tensor, group_size: int) -> Int4Linear:
    """RTN-quantize W [N, K] into layout v1 on its device, in row chunks."""
    n, k = w.shape
    group = choose_group_size(k, group_size)
    rows = max(1, CHUNK_ELEMENTS // k)
    parts = [quantize_rtn(w[start:start + rows], group) for start in range(0, n, rows)]
    return Int4Linear(torch.cat([pack_int4(q) for q, _, _ in parts]), torch.cat([s for _, s, _ in parts]),
                      torch.cat([z for _, _, z in parts]), group)


def stored_weights(record, *, int4: bool, device: str | torch.device = "cuda") -> BenchWeights:
    """A stored model's weights: its INT4 artifact (``int4``) or its original weights in bf16."""
    from ffchat.int4 import artifact_dir, check_source, has_int4
    from ffchat.quantize.artifact import INT4_PARTS, group_size_of, read_artifact
    from ffchat.weights import load_state_dict

    config = ModelConfig.from_file(record.model_dir / "config.json")

    def dense(tensors: dict[str, Tensor], skip=frozenset()) -> dict[str, Tensor]:
        return {k: v.to(device=device, dtype=torch.bfloat16 if v.is_floating_point() else v.dtype)
                for k, v in tensors.items() if k not in skip and not k.endswith(IGNORED_SUFFIXES)}

    if not int4:
        return BenchWeights(config, record.name, dense(load_state_dict(record)), {}, None, None)
    if not has_int4(record):
        raise FfchatError(f"{record.name} has no INT4 weights",
                          hint=f"run `ffchat quantize {record.name}` first, or bench it with --bf16")
    tensors, manifest = read_artifact(artifact_dir(record))
    check_source(record, manifest)
    names = manifest["int4_tensors"]
    quantized = {
        name: Int4Linear(*(tensors[f"{name}.{part}"].to(device) for part in INT4_PARTS), group_size_of(manifest, name))
        for name in names
    }
    parts = {f"{name}.{part}" for name in names for part in INT4_PARTS}
    return BenchWeights(config, record.name, dense(tensors, parts), quantized, int(manifest["group_size"]),
                        manifest["method"])
