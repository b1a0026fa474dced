"""Import a GGUF file (llama.cpp's format) as an ffchat model, and read its weights.

``import_gguf`` records the file where it is, never copying it, and stores what
the rest of ffchat needs beside the record: a Hugging Face style config.json
and the tokenizer files (ffchat.gguf_tokenizer). ``load_gguf_state_dict``
dequantizes the tensors with the ``gguf`` package and renames them to Hugging
Face names, undoing the row order llama.cpp gives Llama's q/k projections.

The ``gguf`` package is imported only here: the GPU machines do not have it.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ffchat.config import SUPPORTED_ARCHITECTURES, ModelConfig, UnsupportedArchitecture
from ffchat.errors import FfchatError
from ffchat.gguf_tokenizer import eos_token_ids, special_token_id, tokenizer_files
from ffchat.store import FileEntry, ModelRecord, Store

# GGUF general.architecture -> Hugging Face model_type.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# Tensor types we read: floats, llama.cpp's classic quants and its K-quants (every Q2_K..Q8_0 file mix).
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1",
                          "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Llama 3's RoPE scaling, which llama.cpp stores as per-frequency factors instead of config values.
ROPE_FREQS = "rope_freqs.weight"

# general.file_type -> the dtype the weights were in before quantization, where the file says.
FILE_DTYPES = {0: "float32", 1: "float16", 32: "bfloat16"}


def import_gguf(store: Store, path: Path | str, *, name: str | None = None, console=None) -> ModelRecord:
    """Record a GGUF file in the store with its derived config and tokenizer; nothing is written on any error."""
    path = Path(path).expanduser().resolve()
    reader, meta = _open(path)
    _check_tensors(reader, meta, path)
    config = _derive_config(meta, reader)
    ModelConfig.from_hf(config)  # the same checks every model passes, before anything is stored
    files = {"config.json": _json_bytes(config),
             **tokenizer_files(meta, context_length=config["max_position_embeddings"])}
    record = ModelRecord(
        name=name or path.stem, source="gguf", location=str(path), weights_format="gguf",
        files=[FileEntry(path.name, path.stat().st_size)],
    )
    record = store.save(record, derived_files=files)
    if console is not None:
        summary = (f"imported {record.name}: {config['model_type']}, {config['num_hidden_layers']} layers, "
                   f"{len(reader.tensors)} tensors ({', '.join(_type_counts(reader))})")
        console.print(summary, markup=False, highlight=False)
    return record


def load_gguf_state_dict(path: Path | str, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every weight of a GGUF file, dequantized to ``dtype``, under its Hugging Face name and shape."""
    path = Path(path).expanduser()
    reader, meta = _open(path)
    _check_tensors(reader, meta, path)
    permuted = meta["general.architecture"] == "llama"  # llama.cpp reorders q/k rows for this architecture only
    key = _arch_key(meta)
    heads = int(key("attention.head_count"))
    kv_heads = int(key("attention.head_count_kv", heads))
    state_dict = {}
    for tensor in reader.tensors:
        hf_name = _hf_name(tensor.name)
        if hf_name is None:
            continue
        values = _dequantize(tensor)
        if permuted and ".q_proj." in hf_name:
            values = _unpermute_rows(values, heads)
        elif permuted and ".k_proj." in hf_name:
            values = _unpermute_rows(values, kv_heads)
        state_dict[hf_name] = torch.from_numpy(values).to(dtype)
    return state_dict


# llama.cpp's 4-bit block types with one scale (and Q4_1 one min) per 32 weights: bytes per block.
Q4_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20}
Q4_BLOCK_SIZE = 32


class Q4Blocks(NamedTuple):
    """A Q4_0/Q4_1 tensor as stored, [out, in]: w[n, k] = d[n, k // 32] * q[n, k] + m[n, k // 32]."""

    kind: str  # "Q4_0" or "Q4_1"
    q: torch.Tensor  # uint8 codes 0..15 [N, K]
    d: torch.Tensor  # float32 [N, K // 32]: the file's fp16 scales
    m: torch.Tensor  # float32 [N, K // 32]: Q4_1's fp16 mins; Q4_0's codes are centred on 8, so -8 * d


def read_q4_blocks(path: Path | str) -> dict[str, Q4Blocks]:
    """The codes, scales and mins of every Q4_0/Q4_1 tensor, by Hugging Face name, rows in
    ``load_gguf_state_dict``'s order: INT4 quantization can then keep them exactly instead of re-fitting.

    Block layout (as the gguf package dequantizes it): fp16 d, for Q4_1 an fp16 m, then 16 bytes whose
    low nibbles are weights 0..15 of the block and high nibbles weights 16..31.
    """
    path = Path(path).expanduser()
    reader, meta = _open(path)
    _check_tensors(reader, meta, path)
    permuted = meta["general.architecture"] == "llama"
    key = _arch_key(meta)
    heads = int(key("attention.head_count"))
    kv_heads = int(key("attention.head_count_kv", heads))
    blocks = {}
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        hf_name = _hf_name(tensor.name)
        if kind not in Q4_BLOCK_BYTES or hf_name is None:
            continue
        parts = _q4_parts(tensor, kind)
        if permuted and ".q_proj." in hf_name:
            parts = [_unpermute_rows(part, heads) for part in parts]
        elif permuted and ".k_proj." in hf_name:
            parts = [_unpermute_rows(part, kv_heads) for part in parts]
        blocks[hf_name] = Q4Blocks(kind, *(torch.from_numpy(np.ascontiguousarray(part)) for part in parts))
    return blocks


def _q4_parts(tensor, kind: str) -> list[np.ndarray]:
    """(q uint8 [N, K], d, m float32 [N, K // 32]) of one Q4_0/Q4_1 tensor's raw bytes."""
    k = int(tensor.shape[0])  # GGUF lists the innermost (input) dimension first
    raw = np.asarray(tensor.data, dtype=np.uint8).reshape(-1, k // Q4_BLOCK_SIZE, Q4_BLOCK_BYTES[kind])
    d = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "Q4_1":
        m = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    else:
        m = -8 * d
    nibbles = raw[..., -Q4_BLOCK_SIZE // 2:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(raw.shape[0], k)
    return [q, d, m]


def read_metadata(path: Path | str) -> dict[str, Any]:
    """A GGUF file's key/value metadata as plain Python values (lists for arrays)."""
    return _open(Path(path).expanduser())[1]


def _hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, None for one folded into the config, KeyError if unknown."""
    if gguf_name == ROPE_FREQS:
        return None
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    match = LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match[2] not in LAYER_TENSORS:
        raise KeyError(gguf_name)
    return f"model.layers.{match[1]}.{LAYER_TENSORS[match[2]]}.{match[3]}"


def _derive_config(meta: dict[str, Any], reader) -> dict[str, Any]:
    """A Hugging Face config.json for the model a GGUF describes."""
    model_type = _model_type(meta)
    key = _arch_key(meta)
    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // heads))
    rotary = key("rope.dimension_count", head_dim)
    if rotary != head_dim:
        raise UnsupportedArchitecture(f"partial rotary embeddings ({rotary} of {head_dim} dims) are not supported")
    if key("expert_count", 0):
        raise UnsupportedArchitecture("mixture-of-experts GGUF files are not supported")
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    eos = list(eos_token_ids(meta))
    config = {
        "architectures": [HF_ARCHITECTURES[model_type]],
        "model_type": model_type,
        # The embedding's row count (GGUF lists dimensions innermost first) is the vocabulary the model has.
        "vocab_size": int(tensors["token_embd.weight"].shape[-1]) if "token_embd.weight" in tensors
        else int(key("vocab_size")),
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length")),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": model_type == "qwen2" or "blk.0.attn_q.bias" in tensors,
        "bos_token_id": special_token_id(meta, "bos"),
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "torch_dtype": FILE_DTYPES.get(meta.get("general.file_type"), "bfloat16"),
    }
    scaling = _rope_scaling(key, tensors, head_dim, config["rope_theta"])
    if scaling is not None:
        config["rope_scaling"] = scaling
    return config


def _model_type(meta: dict[str, Any]) -> str:
    """The Hugging Face model_type; llama.cpp writes Mistral 7B as "llama", so its name tells them apart."""
    architecture = meta.get("general.architecture")
    if architecture not in ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"unsupported GGUF architecture {architecture!r}; ffchat reads GGUF files of: "
            f"{', '.join(sorted(ARCHITECTURES))} (models: {', '.join(SUPPORTED_ARCHITECTURES.values())})"
        )
    if architecture == "llama" and "mistral" in str(meta.get("general.name", "")).lower():
        return "mistral"
    return ARCHITECTURES[architecture]


def _arch_key(meta: dict[str, Any]):
    """A reader of "<architecture>.<key>" values that names the missing key when there is no default."""
    prefix = meta["general.architecture"]
    missing = object()

    def get(key: str, default: Any = missing) -> Any:
        value = meta.get(f"{prefix}.{key}", default)
        if value is missing:
            raise FfchatError(f"the GGUF file lacks the metadata key {prefix}.{key}")
        if isinstance(value, list):
            raise FfchatError(f"per-layer values for {prefix}.{key} are not supported")
        return value

    return get


def _rope_scaling(key, tensors: dict[str, Any], head_dim: int, theta: float) -> dict[str, Any] | None:
    """rope_scaling as Hugging Face writes it, from the rope.scaling.* keys or Llama 3's rope_freqs tensor."""
    if ROPE_FREQS in tensors:
        return _llama3_scaling(_dequantize(tensors[ROPE_FREQS]).reshape(-1), head_dim, theta)
    kind = key("rope.scaling.type", "none")
    if kind == "none":
        return None
    scaling = {"rope_type": kind, "factor": _f32(key("rope.scaling.factor"))}
    original = key("rope.scaling.original_context_length", None)
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _llama3_scaling(factors: np.ndarray, head_dim: int, theta: float) -> dict[str, Any]:
    """Recover Llama 3's rope_scaling parameters from llama.cpp's per-frequency divisors.

    Divisors are 1 for short wavelengths, ``factor`` for long ones, and between
    them 1/f = (1-s)/factor + s with s = (original/wavelength - low)/(high - low).
    Only the ratios original:low:high show in the divisors, so low is fixed at 1
    (as in every Llama 3.x release) and high and original are fitted to the
    in-between divisors; the result is checked by recomputing all of them.
    """
    wavelengths = 2 * np.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factors = factors.astype(np.float64)
    factor = float(factors.max())
    between = (factors > 1 + 1e-4) & (factors < factor * (1 - 1e-4))
    smooth = (1 / factors[between] - 1 / factor) / (1 - 1 / factor)
    inverse = 1 / wavelengths[between]
    if len(smooth) >= 2:  # s * (high - 1) + 1 = original / wavelength: a line through every point
        slope, intercept = np.polyfit(inverse, smooth, 1)
        high = 1 - 1 / intercept
        original = slope * (high - 1)
    elif len(smooth) == 1:
        high = 4.0
        original = float((smooth[0] * (high - 1) + 1) / inverse[0])
    else:
        raise FfchatError("cannot recover the RoPE scaling from rope_freqs: no frequency lies in the transition")
    scaling = {"rope_type": "llama3", "factor": _round(factor), "low_freq_factor": 1.0,
               "high_freq_factor": _round(high), "original_max_position_embeddings": int(round(original))}
    if not np.allclose(_llama3_divisors(scaling, head_dim, theta), factors, rtol=1e-3):
        raise FfchatError("the GGUF's rope_freqs do not follow Llama 3's RoPE scaling; ffchat cannot run it")
    return scaling


def _llama3_divisors(scaling: dict[str, Any], head_dim: int, theta: float) -> np.ndarray:
    """What llama.cpp stores as rope_freqs for a Llama 3 rope_scaling (one divisor per frequency)."""
    wavelengths = 2 * np.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    smooth = (original / wavelengths - low) / (high - low)
    divisors = 1 / ((1 - smooth) / factor + smooth)
    divisors = np.where(wavelengths < original / high, 1.0, divisors)
    return np.where(wavelengths > original / low, factor, divisors)


def _round(value: float) -> float:
    return float(f"{value:.6g}")


def _f32(value: Any) -> float:
    """A float32 metadata value at its shortest spelling (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def _unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: it interleaves each head's two rotary halves, we want them apart."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


# ---- reading the file ---------------------------------------------------------------------------------------


def _gguf():
    try:
        import gguf
    except ImportError as exc:
        raise FfchatError("reading GGUF files needs the gguf package", hint="pip install gguf") from exc
    return gguf


@functools.cache
def _reader_class():
    """GGUFReader over a plain ndarray view of its memory map.

    The reader slices its buffer once per string in the vocabulary, and slicing
    an np.memmap costs about five times more than slicing the ndarray it wraps:
    this takes SmolLM2's metadata from ~5 s to ~1 s. Same bytes, same mapping.
    """
    class FastReader(_gguf().GGUFReader):
        @property
        def data(self):
            return self._buffer

        @data.setter
        def data(self, value):
            self._buffer = value.view(np.ndarray)

    return FastReader


def _open(path: Path):
    """A GGUF reader for ``path`` and its metadata, every tensor's bytes present; damage becomes one FfchatError."""
    if not path.is_file():
        raise FfchatError(f"no such GGUF file: {path}")
    try:
        reader = _reader_class()(path)
        for tensor in reader.tensors:
            if tensor.data.nbytes != tensor.n_bytes:
                raise ValueError(f"tensor {tensor.name} is cut short (file truncated?)")
        # Every key/value as plain Python values (lists for arrays).
        meta = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    except (ValueError, IndexError, KeyError, OSError, OverflowError, UnicodeDecodeError) as exc:
        raise FfchatError(f"cannot read GGUF file {path}: {exc}") from exc
    return reader, meta


def _check_tensors(reader, meta: dict[str, Any], path: Path) -> None:
    """Fail before any work on an architecture, tensor type or tensor we cannot handle."""
    _model_type(meta)
    for tensor in reader.tensors:
        if tensor.tensor_type.name not in SUPPORTED_TENSOR_TYPES:
            raise FfchatError(
                f"{path.name}: tensor {tensor.name} has type {tensor.tensor_type.name}, which ffchat cannot read; "
                f"supported types: {', '.join(SUPPORTED_TENSOR_TYPES)}"
            )
        try:
            _hf_name(tensor.name)
        except KeyError:
            raise FfchatError(
                f"{path.name}: tensor {tensor.name} has no place in a {meta['general.architecture']} model "
                "as ffchat runs it"
            ) from None


def _dequantize(tensor) -> np.ndarray:
    """A tensor's values as a writable float32 array in Hugging Face orientation ([out, in])."""
    values = _gguf().quants.dequantize(tensor.data, tensor.tensor_type)
    values = values.reshape(tuple(reversed([int(d) for d in tensor.shape])))
    return values if values.flags.writeable and values.dtype == np.float32 else values.astype(np.float32)


def _type_counts(reader) -> list[str]:
    counts = Counter(tensor.tensor_type.name for tensor in reader.tensors)
    return [f"{count} {kind}" for kind, count in counts.most_common()]


def _json_bytes(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()
