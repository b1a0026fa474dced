"""Read a model's weights, in any supported format, as one state dict with Hugging Face names.

Formats: safetensors and PyTorch .bin (one file, or shards listed in an
index), and GGUF (through ffchat.gguf_import). Tensors are read one at a time
and cast as they arrive, so a dtype change never holds two copies of the model.
A damaged file is the user's problem to fix, so it raises a one-line
FfchatError naming the file, never a traceback.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from ffchat.errors import FfchatError
from ffchat.store import ModelRecord

SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
PYTORCH_BIN = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def load_state_dict(record: ModelRecord | Path | str, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """All tensors of a record (or a Hugging Face model directory), floating ones cast to ``dtype`` if given."""
    if isinstance(record, ModelRecord):
        weights_format, location = record.weights_format, Path(record.location)
    else:
        location = Path(record)
        weights_format = _detect_format(location)
    if weights_format == "gguf":
        from ffchat.gguf_import import load_gguf_state_dict  # needs the gguf package: import only when used

        return load_gguf_state_dict(location) if dtype is None else load_gguf_state_dict(location, dtype=dtype)
    if weights_format == "safetensors":
        return _load_files(_weight_files(location, *SAFETENSORS), _read_safetensors, dtype)
    if weights_format == "bin":
        return _load_files(_weight_files(location, *PYTORCH_BIN), _read_bin, dtype)
    raise FfchatError(f"unknown weights format {weights_format!r}")


def _detect_format(directory: Path) -> str:
    """The format of the weights in a plain directory; safetensors preferred when both are present."""
    for weights_format, names in (("safetensors", SAFETENSORS), ("bin", PYTORCH_BIN)):
        if any((directory / name).is_file() for name in names):
            return weights_format
    raise FfchatError(f"no model.safetensors or pytorch_model.bin in {directory}")


def _weight_files(directory: Path, single: str, index: str) -> list[Path]:
    """The shard files named by the index if there is one, else the single weights file."""
    index_path = directory / index
    if not index_path.is_file():
        if not (directory / single).is_file():
            raise FfchatError(f"no {single} or {index} in {directory}")
        return [directory / single]
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        shards = [directory / name for name in sorted(set(weight_map.values()))]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FfchatError(f"cannot read the shard index {index_path}: {_first_line(exc)}") from exc
    missing = [shard.name for shard in shards if not shard.is_file()]
    if missing:
        raise FfchatError(f"{index_path} lists shards that are not there: {', '.join(missing)}")
    return shards


def _load_files(paths: list[Path], read, dtype: torch.dtype | None) -> dict[str, Tensor]:
    state_dict = {}
    for path in paths:
        for name, tensor in read(path):
            state_dict[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return state_dict


def _read_safetensors(path: Path):
    """Yield (name, tensor) from one safetensors file, one tensor in memory at a time."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            for name in file.keys():
                yield name, file.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise FfchatError(f"cannot read weights file {path}: {_first_line(exc)}") from exc


def _read_bin(path: Path):
    """Yield (name, tensor) from one torch.save file, memory-mapped where the format allows."""
    try:
        # mmap needs the zip format; files from before torch 1.6 are read whole.
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, KeyError) as exc:
        raise FfchatError(
            f"cannot read weights file {path}: damaged or not a PyTorch checkpoint ({_first_line(exc)})"
        ) from exc
    if not isinstance(loaded, dict) or not all(isinstance(t, Tensor) for t in loaded.values()):
        raise FfchatError(f"weights file {path} does not hold a dict of tensors")
    yield from loaded.items()


def _first_line(exc: Exception, limit: int = 120) -> str:
    """The exception's type and first sentence, short enough for a one-line message."""
    text = (str(exc).strip().splitlines() or [""])[0].split(". ")[0]
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
