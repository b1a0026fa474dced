"""Write small GGUF files for tests, laid out the way llama.cpp's converter lays them out.

Everything here is written from the format, independently of ffchat.gguf_import:
llama.cpp's tensor names, its q/k row permutation for Llama, its per-frequency
RoPE divisors for Llama 3 scaling, and its tokenizer keys. A test that reads
these files back with ffchat therefore checks ffchat against the format, not
against itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

CONTROL, NORMAL, UNUSED, BYTE, UNKNOWN = 3, 1, 5, 6, 2

# Hugging Face name (after "model.layers.N.") -> llama.cpp name (after "blk.N.").
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}


def write_gguf(path: Path, arch: str = "llama", metadata: dict | None = None, tensors: dict | None = None) -> Path:
    """A GGUF file with ``metadata`` (typed by Python type) and ``tensors`` (name -> array or (bytes, type))."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in (metadata or {}).items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, tensor in (tensors or {}).items():
        data, qtype = tensor if isinstance(tensor, tuple) else (tensor, None)
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def hparams(arch: str, *, layers=1, hidden=64, ffn=96, heads=4, kv_heads=2, context=256, **extra) -> dict:
    """The "<arch>.*" keys llama.cpp writes for a decoder."""
    keys = {
        "block_count": layers, "context_length": context, "embedding_length": hidden,
        "feed_forward_length": ffn, "attention.head_count": heads, "attention.head_count_kv": kv_heads,
        "attention.layer_norm_rms_epsilon": 1e-6, "rope.freq_base": 10000.0, **extra,
    }
    return {f"{arch}.{key}": value for key, value in keys.items()}


def byte_level_tokenizer_metadata(model_dir: Path, vocab_size: int, pre: str = "gpt-2") -> dict:
    """tokenizer.ggml.* keys for a Hugging Face byte-level BPE tokenizer, padded to the model's vocabulary."""
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    tokens = sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)
    special = {added["content"] for added in spec["added_tokens"] if added["special"]}
    types = [CONTROL if token in special else NORMAL for token in tokens]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    types += [UNUSED] * (vocab_size - len(types))
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": tokens.index(config["bos_token"]),
        "tokenizer.ggml.eos_token_id": tokens.index(config["eos_token"]),
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": config["chat_template"],
    }


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter order for Llama q/k rows: each head's two rotary halves interleaved."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def llama3_rope_freqs(rope_scaling: dict, head_dim: int, theta: float) -> np.ndarray:
    """The rope_freqs tensor llama.cpp writes for Llama 3 RoPE scaling: a divisor per frequency."""
    factor, low, high = rope_scaling["factor"], rope_scaling["low_freq_factor"], rope_scaling["high_freq_factor"]
    original = rope_scaling["original_max_position_embeddings"]
    divisors = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * np.pi * theta ** (i / head_dim)
        if wavelength < original / high:
            divisors.append(1.0)
        elif wavelength > original / low:
            divisors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(divisors, dtype=np.float32)


def hf_model_to_gguf(model_dir: Path, path: Path, name: str = "tiny") -> Path:
    """Convert a tiny Hugging Face model (tests/factory.py) to an F32 GGUF as llama.cpp would."""
    config = json.loads((model_dir / "config.json").read_text())
    arch = config["model_type"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {"rope_theta": config.get("rope_theta", 10000.0)}
    extra = {"attention.key_length": head_dim, "attention.value_length": head_dim}
    metadata = {
        "general.name": name, "general.file_type": 0,
        **hparams(arch, layers=config["num_hidden_layers"], hidden=config["hidden_size"],
                  ffn=config["intermediate_size"], heads=heads, kv_heads=kv_heads,
                  context=config["max_position_embeddings"], **extra),
        f"{arch}.attention.layer_norm_rms_epsilon": float(config["rms_norm_eps"]),
        f"{arch}.rope.freq_base": float(rope["rope_theta"]),
        **byte_level_tokenizer_metadata(model_dir, config["vocab_size"]),
    }
    tensors = {}
    for hf_name, value in load_file(str(model_dir / "model.safetensors")).items():
        value = value.astype(np.float32)
        if arch == "llama" and ".q_proj." in hf_name:
            value = llama_cpp_permute(value, heads)
        elif arch == "llama" and ".k_proj." in hf_name:
            value = llama_cpp_permute(value, kv_heads)
        tensors[_gguf_name(hf_name)] = value
    if rope.get("rope_type") == "llama3":
        tensors["rope_freqs.weight"] = llama3_rope_freqs(rope, head_dim, float(rope["rope_theta"]))
    return write_gguf(path, arch, metadata, tensors)


def _gguf_name(hf_name: str) -> str:
    if hf_name in TOP_NAMES:
        return TOP_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{LAYER_NAMES[module]}.{kind}"


def sentencepiece_metadata() -> dict:
    """A tiny Llama-2-style SentencePiece vocabulary: control tokens, 256 byte tokens, scored pieces."""
    # In merge order: each piece is two earlier pieces (or characters) joined.
    merged = ["\u2581t", "\u2581th", "\u2581the", "\u2581w", "or", "\u2581wor", "ld", "\u2581world",
              "\u2581h", "el", "\u2581hel", "lo", "\u2581hello", "Hel", "Hello", "\u2581Hello",
              "in", "\u2581in", "\u2581a", "an", "\u2581an"]
    chars = sorted(set("".join(merged)) | set("abcdefghijklmnopqrstuvwxyzHT.,!?"))
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + chars + merged
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * (len(chars) + len(merged))
    scores = [0.0] * 259 + [-1000.0 - i for i in range(len(chars))] + [-float(i) for i in range(len(merged))]
    return {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True,
    }
