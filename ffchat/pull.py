"""`ffchat pull`: bring a model into the store from the Hub, a local folder or a GGUF file.

Nothing is recorded until the files are known to be usable: config.json
describes a supported architecture, tokenizer.json exists, and every weight
file is whole. Config and tokenizer are checked before any weights are
downloaded. Weights are never copied: a record points at the Hugging Face
cache snapshot or at the user's folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from rich.console import Console

from ffchat import hub
from ffchat.config import ModelConfig
from ffchat.errors import FfchatError
from ffchat.store import FileEntry, ModelRecord, Store

METADATA_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
# (weights_format, sharded index, single file), in order of preference: .bin only without safetensors.
WEIGHT_LAYOUTS = (
    ("safetensors", "model.safetensors.index.json", "model.safetensors"),
    ("bin", "pytorch_model.bin.index.json", "pytorch_model.bin"),
)
PATH_PREFIXES = ("/", "./", "../", "~")


def pull_model(
    store: Store,
    model: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    name: str | None = None,
    console: Console | None = None,
) -> ModelRecord:
    """Record `model`: an existing folder or .gguf file is imported, anything else not path-like is a Hub repo id."""
    path = Path(model).expanduser()
    if path.exists() and (revision or token):
        raise FfchatError("--revision and --token only apply to Hub repos")
    if path.is_dir():
        return _import_folder(store, path.resolve(), name)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise FfchatError(f"{model} is a file but not a .gguf", hint="pass a .gguf file, a Hugging Face folder or a Hub repo id")
        from ffchat.gguf_import import import_gguf

        return import_gguf(store, path.resolve(), name=name, console=console)
    if model.startswith(PATH_PREFIXES) or model.lower().endswith(".gguf"):
        raise FfchatError(f"no such file or folder: {model}")
    return _pull_hub(store, model, revision=revision, token=token, name=name, console=console or Console(stderr=True))


def purge_hub_cache(record: ModelRecord) -> bool:
    """Delete the record's snapshot from the shared Hugging Face cache; False when it was not there."""
    if record.source != "hub" or not record.repo_id or not record.commit:
        raise FfchatError(f"{record.name} is not from the Hub: it has nothing in the Hugging Face cache")
    return hub.purge(record.repo_id, record.commit)


def _import_folder(store: Store, folder: Path, name: str | None) -> ModelRecord:
    store.ensure_writable()
    names = {p.name for p in folder.iterdir() if p.is_file()}
    weights_format, files = _inspect(folder, names, str(folder), fetch=lambda _: None)
    record = ModelRecord(
        name=name or folder.name,
        source="folder",
        location=str(folder),
        weights_format=weights_format,
        files=_entries(folder, files),
    )
    return store.save(record)


def _pull_hub(store: Store, repo_id: str, *, revision: str | None, token: str | None, name: str | None, console: Console) -> ModelRecord:
    store.ensure_writable()  # before downloading gigabytes
    snapshot = hub.open_snapshot(repo_id, revision=revision, token=token)
    weights_format, files = _inspect(
        snapshot.directory, set(snapshot.sizes), repo_id, fetch=lambda names: hub.fetch(snapshot, names, console)
    )
    record = ModelRecord(
        name=name or repo_id,
        source="hub",
        location=str(snapshot.directory),
        weights_format=weights_format,
        files=_entries(snapshot.directory, files),
        repo_id=repo_id,
        revision=snapshot.revision,
        commit=snapshot.commit,
    )
    return store.save(record)


def _inspect(directory: Path, names: set[str], where: str, fetch: Callable[[list[str]], None]) -> tuple[str, list[str]]:
    """Check config, tokenizer and weights, fetching each file before it is read; return the format and the files to record.

    `names` are the files available (a folder's listing or the repo's), `where`
    names the source in messages.
    """
    metadata = [name for name in METADATA_FILES if name in names]
    fetch(metadata)
    ModelConfig.from_file(directory / "config.json")
    if "tokenizer.json" not in names:
        raise FfchatError(f"no tokenizer.json in {where}", hint="ffchat needs the fast tokenizer file, tokenizer.json")
    weights_format, entry = _weights_layout(names, where)
    fetch([entry])
    weights = [entry, *_shards(directory / entry, names, where)] if entry.endswith(".index.json") else [entry]
    fetch(weights)
    for file in weights:
        if file.endswith(".safetensors"):
            _check_safetensors(directory / file, where)
    return weights_format, metadata + weights


def _weights_layout(names: set[str], where: str) -> tuple[str, str]:
    """The weights format and the file to start from (an index or the single weights file)."""
    for weights_format, index, single in WEIGHT_LAYOUTS:
        for entry in (index, single):
            if entry in names:
                return weights_format, entry
    raise FfchatError(
        f"no weights in {where}",
        hint="expected model.safetensors, model.safetensors.index.json, pytorch_model.bin or its index",
    )


def _shards(index: Path, names: set[str], where: str) -> list[str]:
    """The weight files a sharded checkpoint's index lists, each of which must exist."""
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FfchatError(f"{index.name} in {where} is not a valid weights index: {exc!r}") from exc
    for shard in shards:
        if shard not in names:
            raise FfchatError(f"{index.name} lists {shard}, which is missing from {where}")
    return shards


def _check_safetensors(path: Path, where: str) -> None:
    """Raise unless the file is a whole safetensors file: its header parses and the file is as long as it says."""
    size = path.stat().st_size
    with path.open("rb") as f:
        header_length = int.from_bytes(f.read(8), "little")
        if size < 8 or not 0 < header_length <= size - 8:
            raise _damaged(path, where, f"{size} bytes, too short for its header")
        try:
            header = json.loads(f.read(header_length))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise _damaged(path, where, f"unreadable header ({exc.__class__.__name__})") from exc
    expected = 8 + header_length + end
    if size != expected:
        raise _damaged(path, where, f"{size} bytes where its header says {expected}")


def _damaged(path: Path, where: str, reason: str) -> FfchatError:
    return FfchatError(f"{path.name} in {where} is damaged or truncated: {reason}")


def _entries(directory: Path, files: list[str]) -> list[FileEntry]:
    return [FileEntry(name=file, size=(directory / file).stat().st_size) for file in files]
