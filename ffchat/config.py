"""One description of a decoder model, parsed from a Hugging Face config.json.

Every backend, the quantizer and the CLI read this dataclass instead of the raw
dict, so family quirks (Qwen2's q/k/v bias, Qwen3's q/k norm, Llama 3's RoPE
scaling, tied embeddings) are decided once, here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ffchat.errors import FfchatError

# model_type -> families it covers (for messages and `ffchat show`).
SUPPORTED_ARCHITECTURES = {
    "llama": "Llama 2/3/3.1/3.2, SmolLM2, TinyLlama",
    "mistral": "Mistral",
    "qwen2": "Qwen2, Qwen2.5",
    "qwen3": "Qwen3",
}


class UnsupportedArchitecture(FfchatError):
    """The config names a model type ffchat cannot run."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters; ``kind`` is "default" or "llama3"."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    hidden_act: str = "silu"
    torch_dtype: str = "bfloat16"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def family(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.model_type]

    @property
    def num_parameters(self) -> int:
        """Parameter count, the LM head counted once when tied to the embeddings."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        q = self.num_heads * self.head_dim
        attention = h * q + 2 * h * kv + q * h
        if self.qkv_bias:
            attention += q + 2 * kv
        if self.o_bias:
            attention += h
        if self.qk_norm:
            attention += 2 * self.head_dim
        mlp = 3 * h * self.intermediate_size
        if self.mlp_bias:
            mlp += 2 * self.intermediate_size + h
        per_layer = attention + mlp + 2 * h
        embeddings = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.num_layers * per_layer + embeddings + head + h

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Parse a Hugging Face config dict; raise a clear error for anything unsupported."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            names = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
            raise UnsupportedArchitecture(
                f"unsupported architecture {model_type!r} "
                f"({', '.join(hf.get('architectures') or []) or 'no architectures listed'}); "
                f"ffchat supports: {names}"
            )
        try:
            hidden = int(hf["hidden_size"])
            heads = int(hf["num_attention_heads"])
            head_dim = hf.get("head_dim") or hidden // heads
            if hf.get("hidden_act", "silu") != "silu":
                raise UnsupportedArchitecture(
                    f"unsupported activation {hf['hidden_act']!r}; ffchat supports silu"
                )
            attention_bias = bool(hf.get("attention_bias", False))
            qkv_bias = model_type == "qwen2" or attention_bias
            eos = hf.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            return cls(
                model_type=model_type,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(head_dim),
                max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope=_parse_rope(hf),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                qkv_bias=qkv_bias,
                o_bias=model_type != "qwen2" and attention_bias,
                mlp_bias=bool(hf.get("mlp_bias", False)),
                qk_norm=model_type == "qwen3",
                sliding_window=_sliding_window(hf),
                torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FfchatError(f"config.json is incomplete or malformed: {exc!r}") from exc

    @classmethod
    def from_file(cls, path: Path) -> "ModelConfig":
        try:
            hf = json.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise FfchatError(f"no config.json in {Path(path).parent}") from exc
        except (OSError, json.JSONDecodeError) as exc:
            raise FfchatError(f"cannot read {path}: {exc}") from exc
        return cls.from_hf(hf)


def _parse_rope(hf: dict[str, Any]) -> RopeConfig:
    # transformers >= 5 nests everything under rope_parameters; older configs
    # (and most config.json files on the Hub) use rope_theta + rope_scaling.
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    params = {**scaling, **params}
    theta = float(params.get("rope_theta") or hf.get("rope_theta") or 10000.0)
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind != "llama3":
        raise UnsupportedArchitecture(f"unsupported RoPE scaling {kind!r}; ffchat supports llama3")
    return RopeConfig(
        theta=theta,
        kind="llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )


def _sliding_window(hf: dict[str, Any]) -> int | None:
    window = hf.get("sliding_window")
    if window is None:
        return None
    if hf.get("model_type") in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        return None
    return int(window)
