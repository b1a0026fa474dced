"""`pull_model` on local paths: Hugging Face folders (checked, recorded, never copied) and the dispatch rules."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
from factory import FAMILIES
from hub_server import copy_model, make_bin_only, make_sharded, set_model_type, truncate

from ffchat.config import ModelConfig
from ffchat.errors import FfchatError
from ffchat.pull import pull_model
from ffchat.store import RECORD_FILE, Store

SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


@pytest.fixture
def folder(tiny_model_dir, tmp_path) -> Path:
    """A fresh copy of the tiny Llama, to import (and damage)."""
    return copy_model(tiny_model_dir(), tmp_path / "tiny-llama")


def assert_refused(folder: Path, *fragments: str) -> None:
    with pytest.raises(FfchatError) as raised:
        pull_model(Store(), str(folder))
    for fragment in fragments:
        assert fragment in str(raised.value)
    assert Store().list() == []


def test_import_each_family(family, tiny_model_dir):
    source = tiny_model_dir(family)

    record = pull_model(Store(), str(source))

    assert (record.name, record.source, record.location) == (source.name, "folder", str(source.resolve()))
    assert record.weights_format == "safetensors"
    assert {f.name: f.size for f in record.files} == {p.name: p.stat().st_size for p in source.iterdir()}
    assert [p.name for p in record.record_dir.iterdir()] == [RECORD_FILE]  # weights are not copied
    assert Store().get(source.name).location == str(source.resolve())
    assert ModelConfig.from_file(record.model_dir / "config.json").model_type == FAMILIES[family]["model_type"]


def test_sharded_checkpoint(folder):
    record = pull_model(Store(), str(make_sharded(folder)))
    assert {"model.safetensors.index.json", *SHARDS} <= {f.name for f in record.files}
    assert "model.safetensors" not in {f.name for f in record.files}


def test_sharded_checkpoint_missing_a_shard(folder):
    (make_sharded(folder) / SHARDS[1]).unlink()
    assert_refused(folder, f"model.safetensors.index.json lists {SHARDS[1]}, which is missing")


def test_sharded_checkpoint_with_a_truncated_shard(folder):
    truncate(make_sharded(folder) / SHARDS[0], keep=0.9)
    assert_refused(folder, SHARDS[0], "damaged or truncated")


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.0005])
def test_truncated_safetensors(folder, keep):
    truncate(folder / "model.safetensors", keep)
    assert_refused(folder, "model.safetensors", "damaged or truncated")


def test_safetensors_with_a_garbage_header(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:8] + b"\xff" * 16 + data[24:])
    assert_refused(folder, "model.safetensors", "unreadable header")


def test_bin_only_folder(folder):
    record = pull_model(Store(), str(make_bin_only(folder)))
    assert record.weights_format == "bin"
    assert "pytorch_model.bin" in {f.name for f in record.files}


def test_safetensors_preferred_over_bin(folder):
    (folder / "pytorch_model.bin").write_bytes(b"stale")
    record = pull_model(Store(), str(folder))
    assert record.weights_format == "safetensors"
    assert "pytorch_model.bin" not in {f.name for f in record.files}


def test_missing_tokenizer(folder):
    (folder / "tokenizer.json").unlink()
    assert_refused(folder, "no tokenizer.json")


def test_missing_weights(folder):
    (folder / "model.safetensors").unlink()
    assert_refused(folder, "no weights in")


def test_missing_config(folder):
    (folder / "config.json").unlink()
    assert_refused(folder, "no config.json")


def test_unsupported_architecture(folder):
    set_model_type(folder, "gpt2", ["GPT2LMHeadModel"])
    assert_refused(folder, "unsupported architecture 'gpt2'", "GPT2LMHeadModel", "llama, mistral, qwen2, qwen3")


def test_name_override_and_relative_path(folder, monkeypatch):
    monkeypatch.chdir(folder.parent)
    record = pull_model(Store(), f"./{folder.name}", name="my-model")
    assert (record.name, record.location) == ("my-model", str(folder))
    assert [r.name for r in Store().list()] == ["my-model"]


def test_pulling_again_replaces_the_record(folder):
    pull_model(Store(), str(folder))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "note": "changed"}))

    record = pull_model(Store(), str(folder))

    assert [r.name for r in Store().list()] == [folder.name]
    assert Store().get(folder.name).files == record.files
    assert {f.name: f.size for f in record.files}["config.json"] == (folder / "config.json").stat().st_size
    assert not [p for p in Store().models_dir.iterdir() if p.name.startswith(".")]  # no staging or trash left


@pytest.mark.parametrize("path", ["./nope", "/no/such/dir", "~/no-such-model", "nope.gguf"])
def test_missing_path(path):
    with pytest.raises(FfchatError, match="no such file or folder"):
        pull_model(Store(), path)


def test_a_file_that_is_not_gguf(folder):
    with pytest.raises(FfchatError, match="not a .gguf"):
        pull_model(Store(), str(folder / "config.json"))


def test_revision_with_a_local_path(folder):
    with pytest.raises(FfchatError, match="only apply to Hub repos"):
        pull_model(Store(), str(folder), revision="main")


def test_gguf_goes_to_gguf_import(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("ffchat.gguf_import")
    fake.import_gguf = lambda store, path, *, name=None, console=None: calls.append((store, path, name, console)) or "record"
    monkeypatch.setitem(sys.modules, "ffchat.gguf_import", fake)
    (tmp_path / "model.GGUF").write_bytes(b"GGUF")
    store, console = Store(), object()

    assert pull_model(store, str(tmp_path / "model.GGUF"), name="x", console=console) == "record"
    assert calls == [(store, tmp_path / "model.GGUF", "x", console)]
