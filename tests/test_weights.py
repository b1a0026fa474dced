"""Weight loading: every on-disk layout gives the same tensors, and damaged files fail in one line."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ffchat.config import ModelConfig
from ffchat.errors import FfchatError
from ffchat.model import Transformer, load_model
from ffchat.store import ModelRecord
from ffchat.weights import load_state_dict


def reference_state(model_dir: Path) -> dict[str, torch.Tensor]:
    """The tiny model's tensors, read directly with safetensors."""
    return load_file(model_dir / "model.safetensors")


def model_folder(tmp_path: Path, model_dir: Path) -> Path:
    """A copy of the model's config only; each test writes the weights it wants."""
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(model_dir / "config.json", folder)
    return folder


def split(state: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    names = sorted(state)
    return [{name: state[name] for name in names[i::parts]} for i in range(parts)]


def write_shards(folder: Path, state: dict, stem: str, suffix: str, save) -> None:
    """Write ``state`` in three shards plus a Hugging Face index, the way save_pretrained does."""
    shards = split(state, 3)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        filename = f"{stem}-{i:05d}-of-{len(shards):05d}.{suffix}"
        save(shard, folder / filename)
        weight_map.update(dict.fromkeys(shard, filename))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / f"{stem}.{suffix}.index.json").write_text(json.dumps(index))


def assert_same_tensors(loaded: dict, expected: dict) -> None:
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


def test_sharded_safetensors(tmp_path, tiny_model_dir):
    state = reference_state(tiny_model_dir("llama"))
    folder = model_folder(tmp_path, tiny_model_dir("llama"))
    write_shards(folder, state, "model", "safetensors", lambda shard, path: save_file(shard, path))
    assert_same_tensors(load_state_dict(folder), state)
    tokens = torch.arange(12)
    sharded = load_model(folder, max_seq_len=16).forward(tokens, 0)
    assert torch.equal(sharded, load_model(tiny_model_dir("llama"), max_seq_len=16).forward(tokens, 0))


def test_bin_single_and_sharded_through_a_record(tmp_path, tiny_model_dir):
    state = reference_state(tiny_model_dir("qwen2"))
    single = model_folder(tmp_path, tiny_model_dir("qwen2"))
    torch.save(state, single / "pytorch_model.bin")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    write_shards(sharded, state, "pytorch_model", "bin", torch.save)
    for folder in (single, sharded):
        record = ModelRecord(name="tiny", source="folder", location=str(folder), weights_format="bin")
        assert_same_tensors(load_state_dict(record), state)


def test_dtype_casts_floating_tensors_only(tmp_path, tiny_model_dir):
    state = reference_state(tiny_model_dir("llama"))
    state["extra.int_tensor"] = torch.arange(4)
    folder = model_folder(tmp_path, tiny_model_dir("llama"))
    save_file(state, folder / "model.safetensors")
    loaded = load_state_dict(folder, dtype=torch.float16)
    assert loaded["extra.int_tensor"].dtype == torch.int64
    assert loaded["model.embed_tokens.weight"].dtype == torch.float16
    assert torch.equal(loaded["model.norm.weight"], state["model.norm.weight"].half())


@pytest.mark.parametrize("keep", [0.5, 0.999, 5e-5])  # data cut short, last bytes gone, header cut
def test_truncated_safetensors_is_a_one_line_error(tmp_path, tiny_model_dir, keep):
    folder = model_folder(tmp_path, tiny_model_dir("llama"))
    data = (tiny_model_dir("llama") / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(FfchatError, match="model.safetensors") as error:
        load_state_dict(folder)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("content", [
    b"not a pickle at all", b"PK\x03\x04 truncated zip", b"",
    pickle.dumps(os.getcwd, protocol=2),  # code, not tensors: weights_only must refuse to run it
])
def test_garbage_bin_is_a_one_line_error(tmp_path, content):
    (tmp_path / "pytorch_model.bin").write_bytes(content)
    with pytest.raises(FfchatError, match="pytorch_model.bin: damaged") as error:
        load_state_dict(tmp_path)
    assert "\n" not in str(error.value)


def test_bin_that_is_not_a_state_dict_is_refused(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "pytorch_model.bin")
    with pytest.raises(FfchatError, match="dict of tensors"):
        load_state_dict(tmp_path)


def test_missing_weights_and_missing_shards(tmp_path):
    with pytest.raises(FfchatError, match="no model.safetensors"):
        load_state_dict(tmp_path)
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FfchatError, match="model-00001-of-00002.safetensors"):
        load_state_dict(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(FfchatError, match="shard index"):
        load_state_dict(tmp_path)


def test_tied_model_has_no_lm_head_and_still_works(tiny_model_dir):
    """Tied: the embeddings are the LM head, so it equals an untied model given a copy of them."""
    directory = tiny_model_dir("llama-tied")
    state = load_state_dict(directory)
    assert "lm_head.weight" not in state
    tied = load_model(directory, max_seq_len=16)
    assert tied.lm_head is tied.embed
    config = ModelConfig.from_file(directory / "config.json")
    untied = Transformer(dataclasses.replace(config, tie_word_embeddings=False), 16)
    untied.load_state_dict({**state, "lm_head.weight": state["model.embed_tokens.weight"].clone()})
    tokens = torch.arange(10)
    assert torch.equal(tied.forward(tokens, 0), untied.forward(tokens, 0))


def test_tied_model_uses_a_head_it_is_given(tiny_model_dir):
    """The INT4 artifact quantizes a tied model's head separately: that head, not the embeddings, must score."""
    directory = tiny_model_dir("llama-tied")
    state = load_state_dict(directory)
    config = ModelConfig.from_file(directory / "config.json")
    head = state["model.embed_tokens.weight"] * 0.5
    model = Transformer(config, 16)
    model.load_state_dict({**state, "lm_head.weight": head})
    assert torch.equal(model.lm_head, head) and not torch.equal(model.embed, head)
    tied = load_model(directory, max_seq_len=16)
    tokens = torch.arange(10)
    assert not torch.allclose(model.forward(tokens, 0), tied.forward(tokens, 0))


def test_tensor_mismatches_are_named(tiny_model_dir):
    directory = tiny_model_dir("llama")
    config = ModelConfig.from_file(directory / "config.json")
    state = reference_state(directory)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old checkpoints: ignored
    Transformer(config, 8).load_state_dict(state)

    with pytest.raises(FfchatError, match="unexpected tensors model.layers.9.mlp.up_proj.weight"):
        Transformer(config, 8).load_state_dict({**state, "model.layers.9.mlp.up_proj.weight": torch.ones(1)})
    del state["lm_head.weight"]
    with pytest.raises(FfchatError, match="missing tensors lm_head.weight"):
        Transformer(config, 8).load_state_dict(state)
    state["lm_head.weight"] = torch.zeros(10, config.hidden_size)
    with pytest.raises(FfchatError, match=r"lm_head.weight has shape \(10, 64\)"):
        Transformer(config, 8).load_state_dict(state)


def test_gguf_records_go_through_gguf_import(monkeypatch, tmp_path):
    calls = []
    fake = types.ModuleType("ffchat.gguf_import")
    fake.load_gguf_state_dict = lambda path, dtype=torch.float32: calls.append((path, dtype)) or {"x": torch.ones(1)}
    monkeypatch.setitem(sys.modules, "ffchat.gguf_import", fake)
    gguf = tmp_path / "model.gguf"
    record = ModelRecord(name="g", source="gguf", location=str(gguf), weights_format="gguf", record_dir=tmp_path)
    assert list(load_state_dict(record, dtype=torch.bfloat16)) == ["x"]
    assert calls == [(gguf, torch.bfloat16)]
