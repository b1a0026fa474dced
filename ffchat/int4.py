"""A stored model's INT4 artifact: make it once, find it, and trust it only if it still fits.

The artifact lives in the model's store directory under ``int4/``. Its
manifest names the source it was made from; a run refuses an artifact whose
source changed (new Hub commit, edited file) or whose layout this ffchat does
not read, rather than chat with weights that belong to something else.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ffchat.config import ModelConfig
from ffchat.errors import FfchatError
from ffchat.quantize.artifact import (
    LINEAR_WEIGHT,
    dequantize_state_dict,
    describe_source,
    fits_exactly,
    int4_targets,
    quantize_state_dict,
    read_artifact,
    write_artifact,
)
from ffchat.quantize.calibrate import SEQUENCE_LENGTH, SEQUENCES, input_importance
from ffchat.quantize.exact import BLOCK_SIZE, affine_blocks_to_layout
from ffchat.quantize.methods import CALIBRATED, default_device
from ffchat.store import ModelRecord
from ffchat.weights import load_state_dict

ARTIFACT_DIR = "int4"
DEFAULT_GROUP_SIZE = 128


def artifact_dir(record: ModelRecord) -> Path:
    assert record.record_dir is not None
    return record.record_dir / ARTIFACT_DIR


def has_int4(record: ModelRecord) -> bool:
    return (artifact_dir(record) / "manifest.yaml").is_file()


def file_fingerprint(record: ModelRecord) -> dict[str, list[int]]:
    """Size and modification time of each weight file: a cheap check before hashing."""
    files = [Path(record.location)] if record.source == "gguf" else [Path(record.location) / f.name for f in record.files]
    return {path.name: [path.stat().st_size, path.stat().st_mtime_ns] for path in files if path.exists()}


def quantize_model(
    record: ModelRecord,
    *,
    method: str,
    group_size: int | None,
    keep_head_fp16: bool,
    console: Console,
    device: str | None = None,
) -> dict[str, Any]:
    """Quantize the record's weights and write the artifact atomically; return its manifest fields.

    ``group_size`` None: 32 for a GGUF whose block linears are all Q4_0/Q4_1 (their blocks are
    then kept exactly), else 128. Whatever the group size, tensors whose GGUF blocks line up
    with it are kept exactly; calibrated methods measure activations for the others.
    """
    started = time.perf_counter()
    state = load_state_dict(record)
    targets = int4_targets(state, keep_head_fp16=keep_head_fp16)
    exact, block_kinds = _gguf_exact_parts(record)
    reason = None
    if group_size is None:
        group_size, reason = _default_group_size(list(targets.values()), block_kinds)
    device = torch.device(device) if device is not None else default_device()
    importance = None
    refit = [name for name, key in targets.items() if not fits_exactly(exact.get(key), state[key], group_size)]
    if method in CALIBRATED and refit:
        console.print(f"measuring activations: {SEQUENCES} x {SEQUENCE_LENGTH} random tokens through the model")
        config = ModelConfig.from_file(record.model_dir / "config.json")
        importance = input_importance(config, state, refit, device=device)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(f"quantizing ({method})", total=len(targets))
        tensors, info = quantize_state_dict(
            state, method=method, group_size=group_size, keep_head_fp16=keep_head_fp16, device=device,
            importance=importance, exact=exact,
            progress=lambda name: progress.update(task, advance=1, description=f"quantizing {name}"),
        )
    if reason:
        info["group_size_reason"] = reason
    manifest = {**info, "source": describe_source(record), "fingerprint": file_fingerprint(record)}
    write_artifact(artifact_dir(record), tensors, manifest)
    manifest["seconds"] = time.perf_counter() - started
    return manifest


def _default_group_size(keys: list[str], block_kinds: dict[str, str]) -> tuple[int, str | None]:
    """32 with the reason when every block linear is a GGUF Q4_0/Q4_1 tensor (kept exactly then), else 128."""
    linears = [key for key in keys if LINEAR_WEIGHT.match(key)]
    if not linears or any(key not in block_kinds for key in linears):
        return DEFAULT_GROUP_SIZE, None
    kinds = "/".join(sorted({block_kinds[key] for key in linears}))
    return BLOCK_SIZE, f"the GGUF's {kinds} blocks (groups of {BLOCK_SIZE}), kept exactly"


def _gguf_exact_parts(record: ModelRecord) -> tuple[dict[str, tuple], dict[str, str]]:
    """A GGUF's Q4_0/Q4_1 tensors in layout v1 (group 32), and their block types, by state-dict key."""
    if record.weights_format != "gguf":
        return {}, {}
    from ffchat.gguf_import import read_q4_blocks  # needs the gguf package: import only when used

    blocks = read_q4_blocks(record.location)
    parts = {key: affine_blocks_to_layout(b.q, b.d, b.m) for key, b in blocks.items()}
    return parts, {key: b.kind for key, b in blocks.items()}


def load_int4_state_dict(record: ModelRecord, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The artifact dequantized to Hugging Face names (for the reference engine), after checking its source."""
    tensors, manifest = read_artifact(artifact_dir(record))
    check_source(record, manifest)
    return dequantize_state_dict(tensors, manifest, dtype=dtype), manifest


def check_source(record: ModelRecord, manifest: dict[str, Any]) -> None:
    """Refuse an artifact made from other weights than the record's."""
    source = manifest.get("source") or {}
    if record.repo_id and record.commit:
        matches = source == {"repo": record.repo_id, "commit": record.commit}
    elif manifest.get("fingerprint") == file_fingerprint(record):
        matches = True
    else:  # touched or copied files: only the content decides
        matches = source == describe_source(record)
    if not matches:
        raise FfchatError(
            f"the INT4 weights of {record.name} were made from a different version of the model",
            hint=f"re-quantize with `ffchat quantize {record.name}`, or run with --fp16",
        )
