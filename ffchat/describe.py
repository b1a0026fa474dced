"""What `ffchat show` and `ffchat list` say about a stored model.

Everything shown is read from the record and the model's own files, so `show`
works offline and without loading any weights; the one exception, the GPU
profile line, describes this machine's GPU (``ffchat.profiles``).
"""

from __future__ import annotations

import json

import yaml

from ffchat.config import ModelConfig
from ffchat.profiles import describe_gpu
from ffchat.tuning_cache import tuning_status
from ffchat.store import ModelRecord


def describe(record: ModelRecord) -> list[tuple[str, str]]:
    """(label, value) rows for `ffchat show`."""
    config = ModelConfig.from_file(record.model_dir / "config.json")
    return [
        ("name", record.name),
        ("source", _source(record)),
        ("architecture", f"{config.model_type} ({config.family})"),
        ("parameters", human_count(config.num_parameters)),
        ("context length", f"{config.max_position_embeddings:,}"),
        ("layers", str(config.num_layers)),
        ("hidden size", f"{config.hidden_size:,}"),
        ("heads", f"{config.num_heads} query / {config.num_kv_heads} key-value, head_dim {config.head_dim}"),
        ("vocab", f"{config.vocab_size:,}"),
        ("tied embeddings", _yes_no(config.tie_word_embeddings)),
        ("chat template", _yes_no(has_chat_template(record))),
        ("quantization", quantization_label(record)),
        ("weights", f"{record.weights_format}, {human_size(record.size)} in all"),
        ("files", "\n".join(f"{f.name}  {human_size(f.size)}" for f in record.files)),
        ("gpu profile", describe_gpu()),
        ("tuning", tuning_status(config, int4_group_size(record))),
    ]


def int4_group_size(record: ModelRecord) -> int | None:
    """The INT4 artifact's group size, or None when the model is not quantized (or the manifest is unreadable)."""
    data = _manifest(record)
    return data.get("group_size") if data else None


def _manifest(record: ModelRecord) -> dict | None:
    """The INT4 manifest's fields: None without an artifact, empty when the manifest cannot be read."""
    manifest = record.record_dir / "int4" / "manifest.yaml" if record.record_dir else None
    if manifest is None or not manifest.is_file():
        return None
    try:
        data = yaml.safe_load(manifest.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def quantization_label(record: ModelRecord) -> str:
    """"no", or the INT4 artifact's method and group size (e.g. "int4 hqq g128")."""
    data = _manifest(record)
    if data is None:
        return "no"
    try:
        return f"int4 {data['method']} g{data['group_size']}"
    except KeyError:
        return "int4 (unreadable manifest)"


def has_chat_template(record: ModelRecord) -> bool:
    """A chat template in tokenizer_config.json or in chat_template.jinja (newer transformers write that)."""
    if (record.model_dir / "chat_template.jinja").is_file():
        return True
    try:
        return bool(json.loads((record.model_dir / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False


def human_count(n: int) -> str:
    """A parameter count the way model cards say it: 134.5M, 8.0B."""
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _source(record: ModelRecord) -> str:
    if record.source == "hub":
        pinned = f" ({record.revision})" if record.revision and record.revision != record.commit else ""
        return f"{record.repo_id}@{record.commit}{pinned}"
    return f"{'GGUF' if record.source == 'gguf' else 'folder'} {record.location}"


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def human_size(n: int) -> str:
    """Bytes in decimal units, as download tools show them."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"
