"""The `ffchat tune` cache: the GEMV tiles measured for a model shape on one GPU, and the whole-model
kernel's configuration with its step time against the Triton backend's.

Separate from the search (``ffchat.tune``) so that reading it needs no kernel or Triton
import: `ffchat show`, the backends' start-up and ``auto``'s choice only look a file up. A
file is keyed by the GPU identity (name, compute capability, SMs, driver, CUDA and Triton
versions), the GEMV shapes and the layer and head counts, stored beside Triton's compile
cache, and written through a temporary name, so a half-written file is never read.
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

# Of the cache file; another value is ignored (re-tune). 3: the megakernel timed at two contexts; 4: each GEMV role's
# kernel (W4A16, or dp2a with its quantizing launch); 5: dp2a codes x itself (its tiles were timed another way);
# 6: dp2a row loops (``programs_per_sm``) among the LM head's candidates; 7: and other GEMVs' of many row blocks;
# 8: and of a row block an SM; 9: each role's choice settled by the whole step among its near ties; 10: and whether
# a GEMV releases the next launch before its wait (``release_early``); 11: the word-a-lane kernel ("lanes") among the
# candidates of GEMVs without a fused norm; 12: and of those with one (q/k/v, gate/up, the LM head).
FORMAT = 12


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


@dataclass(frozen=True)
class MegakernelTuning:
    """The whole-model kernel's fastest correct configuration (``MegakernelConfig`` fields) and the decode step
    time, in us, the mean over ``contexts`` cached tokens, of it and of the Triton backend, measured in one
    process."""

    config: dict
    us: float
    triton_us: float
    contexts: list[int]
    rejected: int  # candidates that failed to compile, to be resident, or the check against the Triton backend
    tried: int  # candidate configurations

    @property
    def faster(self) -> bool:
        return self.us < self.triton_us


@dataclass(frozen=True)
class Tuning:
    """One cache file: ``GemvConfig`` fields and the kernel ("w4a16", "dp2a" or "lanes") by role, the roles that
    release the next launch before their wait; the megakernel's result when it was tuned too."""

    date: str
    gemv: dict[str, dict]
    kernels: dict[str, str]
    megakernel: MegakernelTuning | None
    release_early: frozenset[str]


def tuning_path(identity: GpuIdentity, config: ModelConfig, group_size: int) -> Path:
    """The cache file of this GPU setup and this model shape (a hash of both)."""
    shape = {"layers": config.num_layers, "heads": config.num_heads, "kv_heads": config.num_kv_heads,
             "head_dim": config.head_dim}
    key = json.dumps({"format": FORMAT, "gpu": dataclasses.asdict(identity), "shape": shape,
                      "problems": [dataclasses.asdict(p) for p in decode_problems(config, group_size)]},
                     sort_keys=True)
    return tuning_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def save_tuning(path: Path, identity: GpuIdentity, results: list, seconds: float,
                megakernel: MegakernelTuning | None = None) -> None:
    """Write the winners through a temporary file and a rename: a later run never reads half a file."""
    record = {
        "format": FORMAT,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "gpu": dataclasses.asdict(identity),
        "seconds": round(seconds, 1),
        "gemv": {r.problem.role: {"problem": dataclasses.asdict(r.problem), "config": dataclasses.asdict(r.config),
                                  "kernel": r.kernel, "release_early": r.release_early, "us": r.us,
                                  "profile_us": r.profile_us, "rejected": r.rejected,
                                  "runners_up": [dataclasses.asdict(c) for c in r.runners_up]}
                 for r in results},
        "megakernel": None if megakernel is None else dataclasses.asdict(megakernel),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(temporary, path)


def load_tuning(identity: GpuIdentity, config: ModelConfig, group_size: int) -> Tuning | None:
    """What this GPU setup measured for this shape, or None when it has not been tuned (or the file is unreadable
    or of another format)."""
    path = tuning_path(identity, config, group_size)
    try:
        record = json.loads(path.read_text())
        if record.get("format") != FORMAT:
            return None
        mega = record.get("megakernel")
        gemv = record["gemv"]
        return Tuning(str(record["date"]), {role: dict(entry["config"]) for role, entry in gemv.items()},
                      {role: str(entry["kernel"]) for role, entry in gemv.items()},
                      None if mega is None else MegakernelTuning(**mega),
                      frozenset(role for role, entry in gemv.items() if bool(entry["release_early"])))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def tuning_status(config: ModelConfig, group_size: int | None) -> str:
    """The `ffchat show` line: whether this shape is tuned on this machine's GPU, and which backend won."""
    if not torch.cuda.is_available():
        return "no CUDA GPU here"
    if group_size is None:
        return "not quantized: the Triton kernels run INT4 weights"
    identity = GpuIdentity.of(torch.device("cuda"))
    tuning = load_tuning(identity, config, group_size)
    if tuning is None:
        return "not tuned on this GPU: the profile's tables (the first `ffchat run` tunes, or `ffchat tune`)"
    kernels = ""
    for name, what in (("dp2a", "dp2a"), ("lanes", "the word-a-lane kernel")):
        roles = sorted(role for role, kernel in tuning.kernels.items() if kernel == name)
        kernels += f"GEMVs on {what}: {', '.join(roles)}; " if roles else ""
    if tuning.release_early:
        kernels += f"releasing the next launch before their wait: {', '.join(sorted(tuning.release_early))}; "
    return f"tuned on this GPU {tuning.date}; {kernels}{describe_megakernel(tuning.megakernel)} " \
           f"({tuning_path(identity, config, group_size)})"


def describe_megakernel(tuning: MegakernelTuning | None) -> str:
    """Which decode backend ``auto`` runs after this tuning, and why (one phrase)."""
    if tuning is None:
        return "whole-model kernel not tuned"
    if not tuning.config:
        return "auto runs the triton backend (no megakernel configuration passed its checks on this GPU)"
    verdict = "auto runs the megakernel" if tuning.faster else "auto runs the triton backend"
    contexts = " and ".join(map(str, tuning.contexts))
    return f"{verdict} (megakernel {tuning.us:.0f} us, fastest of {tuning.tried} configurations, triton " \
           f"{tuning.triton_us:.0f} us per step at {contexts} tokens, averaged)"
