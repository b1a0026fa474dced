"""The `ffchat tune` cache: which GEMV shapes a model launches, and the tiles measured for them on one GPU.

Separate from the search (``ffchat.tune``) so that reading it needs no kernel or Triton
import: `ffchat show` and the Triton backend's start-up only look a file up. A file is
keyed by the GPU identity (name, compute capability, SMs, driver, CUDA and Triton versions)
and the GEMV shapes, stored beside Triton's compile cache, and written through a
temporary name, so a half-written file is never read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from ffchat.config import ModelConfig
from ffchat.profiles import GpuIdentity
from ffchat.quantize.layout import choose_group_size

FORMAT = 1  # of the cache file; another value is ignored (re-tune)


@dataclass(frozen=True)
class GemvProblem:
    """One decode GEMV of a model: its role, weight rows N, inputs K, group size and fused epilogue."""

    role: str
    n: int
    k: int
    group_size: int
    gated: bool = False
    norm: bool = False
    residual: bool = False


def decode_problems(config: ModelConfig, group_size: int) -> list[GemvProblem]:
    """The W4A16 GEMVs of one decode step, as the Triton backend launches them."""
    q_rows = config.num_heads * config.head_dim
    qkv_rows = q_rows + 2 * config.num_kv_heads * config.head_dim
    hidden, inter = config.hidden_size, config.intermediate_size

    def group(k: int) -> int:
        return choose_group_size(k, group_size)

    return [
        GemvProblem("qkv", qkv_rows, hidden, group(hidden), norm=True),
        GemvProblem("o", hidden, q_rows, group(q_rows), residual=True),
        GemvProblem("gate_up", 2 * inter, hidden, group(hidden), gated=True, norm=True),
        GemvProblem("down", hidden, inter, group(inter), residual=True),
        GemvProblem("head", config.vocab_size, hidden, group(hidden), norm=True),
    ]


def tuning_dir() -> Path:
    """Beside Triton's compile cache ($TRITON_CACHE_DIR, default ~/.triton/cache): its sibling ffchat-tuning."""
    triton_cache = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache").expanduser()
    return triton_cache.parent / "ffchat-tuning"


def tuning_path(identity: GpuIdentity, problems: list[GemvProblem]) -> Path:
    """The cache file of this GPU setup and these GEMV shapes (a hash of both)."""
    key = json.dumps({"format": FORMAT, "gpu": dataclasses.asdict(identity),
                      "problems": [dataclasses.asdict(p) for p in problems]}, sort_keys=True)
    return tuning_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def save_tuning(path: Path, identity: GpuIdentity, results: list, seconds: float) -> None:
    """Write the winners through a temporary file and a rename: a later run never reads half a file."""
    record = {
        "format": FORMAT,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "gpu": dataclasses.asdict(identity),
        "seconds": round(seconds, 1),
        "gemv": {r.problem.role: {"problem": dataclasses.asdict(r.problem), "config": dataclasses.asdict(r.config),
                                  "us": r.us, "profile_us": r.profile_us, "rejected": r.rejected} for r in results},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(temporary, path)


def load_tuning(identity: GpuIdentity, problems: list[GemvProblem]) -> dict[str, dict] | None:
    """The cached ``GemvConfig`` fields by role, or None when this GPU setup has not tuned these shapes (or the
    file is unreadable)."""
    path = tuning_path(identity, problems)
    try:
        record = json.loads(path.read_text())
        if record.get("format") != FORMAT:
            return None
        return {role: dict(entry["config"]) for role, entry in record["gemv"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def tuning_status(config: ModelConfig, group_size: int | None) -> str:
    """The `ffchat show` line: whether this shape is tuned on this machine's GPU."""
    if not torch.cuda.is_available():
        return "no CUDA GPU here"
    if group_size is None:
        return "not quantized: the Triton kernels run INT4 weights"
    path = tuning_path(GpuIdentity.of(torch.device("cuda")), decode_problems(config, group_size))
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return "not tuned on this GPU: the profile's tables (run `ffchat tune` to measure)"
    return f"tuned on this GPU {record.get('date', '?')} ({path})"
