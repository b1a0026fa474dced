"""The INT4 artifact: what gets quantized, round trips, atomic writes, validation, size."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import ffchat.quantize.artifact as artifact
from ffchat.errors import FfchatError
from ffchat.quantize.layout import LAYOUT_VERSION

SOURCE = {"repo": "test/tiny", "commit": "0" * 40}


def tiny_state(tiny_model_dir, family: str) -> dict[str, torch.Tensor]:
    return load_file(tiny_model_dir(family) / "model.safetensors")


def quantized(state, **options):
    tensors, info = artifact.quantize_state_dict(state, device="cpu", **options)
    return tensors, {**info, "source": SOURCE}


def test_tied_model_gets_an_int4_head_from_its_embeddings(tiny_model_dir):
    state = tiny_state(tiny_model_dir, "llama-tied")
    assert "lm_head.weight" not in state
    seen = []
    tensors, info = artifact.quantize_state_dict(state, method="rtn", progress=seen.append, device="cpu")
    linears = [k[: -len(".weight")] for k in state if artifact.LINEAR_WEIGHT.match(k)]
    assert len(linears) == 3 * 7
    assert info["int4_tensors"] == seen == linears + ["lm_head"]
    assert info["lm_head"] == "int4" and info["method"] == "rtn" and info["layout_version"] == LAYOUT_VERSION
    # hidden 72 and FFN 136 are multiples of 8 only
    assert info["group_size"] == 128 and set(info["group_sizes"].values()) == {8}
    assert torch.equal(tensors["model.embed_tokens.weight"], state["model.embed_tokens.weight"].half())
    assert tensors["lm_head.qweight"].shape == (state["model.embed_tokens.weight"].shape[0], 72 // 8)
    assert not any(k.endswith("proj.weight") for k in tensors)
    norms = [k for k in state if "norm" in k]
    assert norms and all(tensors[k].dtype == torch.float16 for k in norms)


def test_untied_head_can_stay_fp16_and_biases_are_kept(tiny_model_dir):
    state = tiny_state(tiny_model_dir, "llama")
    state["model.layers.0.self_attn.q_proj.bias"] = torch.randn(64)  # as in Qwen2
    tensors, info = artifact.quantize_state_dict(state, keep_head_fp16=True, device="cpu")
    assert info["lm_head"] == "fp16" and "lm_head" not in info["int4_tensors"]
    assert torch.equal(tensors["lm_head.weight"], state["lm_head.weight"].half())
    assert torch.equal(tensors["model.layers.0.self_attn.q_proj.bias"], state["model.layers.0.self_attn.q_proj.bias"].half())
    # hidden 64 -> groups of 64; FFN 160 -> 32 (down_proj's K)
    assert info["group_sizes"]["model.layers.1.self_attn.q_proj"] == 64
    assert info["group_sizes"]["model.layers.1.mlp.down_proj"] == 32
    assert info["method"] == "wmse" and "exact" not in info


def test_exact_parts_are_kept_where_their_group_size_is_chosen(tiny_model_dir):
    """Precomputed layout parts (a GGUF's Q4 blocks) are stored as they are at their group size, re-fitted otherwise."""
    state = tiny_state(tiny_model_dir, "llama")
    key = "model.layers.0.mlp.up_proj.weight"  # [160, 64]
    marker = (torch.full((160, 8), 0x11111111, dtype=torch.int32), torch.full((160, 2), 0.5, dtype=torch.float16),
              torch.full((160, 2), 3.0, dtype=torch.float16))
    tensors, info = artifact.quantize_state_dict(state, group_size=32, exact={key: marker}, device="cpu")
    assert info["exact"] == ["model.layers.0.mlp.up_proj"]
    assert all(torch.equal(tensors[f"model.layers.0.mlp.up_proj.{part}"], value)
               for part, value in zip(artifact.INT4_PARTS, marker))
    tensors, info = artifact.quantize_state_dict(state, group_size=64, exact={key: marker}, device="cpu")
    assert "exact" not in info and tensors["model.layers.0.mlp.up_proj.scales"].shape == (160, 1)


def test_importance_reaches_the_method(tiny_model_dir):
    """Statistics given by INT4 name change that tensor's result, and only under a calibrated method."""
    state = tiny_state(tiny_model_dir, "llama")
    skewed = torch.ones(64)
    skewed[:4] = 1000.0
    importance = {"model.layers.0.self_attn.q_proj": skewed}
    plain = artifact.quantize_state_dict(state, device="cpu")[0]
    weighted = artifact.quantize_state_dict(state, importance=importance, device="cpu")[0]
    changed = {k for k in plain if not torch.equal(plain[k], weighted[k])}
    assert changed and all(k.startswith("model.layers.0.self_attn.q_proj.") for k in changed)
    rtn = artifact.quantize_state_dict(state, method="rtn", device="cpu")[0]
    rtn_weighted = artifact.quantize_state_dict(state, method="rtn", importance=importance, device="cpu")[0]
    assert all(torch.equal(rtn[k], rtn_weighted[k]) for k in rtn)


def test_float32_tensors_that_overflow_fp16_are_stored_as_bf16():
    state = {"model.norm.weight": torch.tensor([1.0, 7e4]), "model.embed_tokens.weight": torch.ones(4, 8)}
    tensors, info = artifact.quantize_state_dict(state, keep_head_fp16=True, device="cpu")
    assert tensors["model.norm.weight"].dtype == torch.bfloat16
    assert tensors["model.embed_tokens.weight"].dtype == torch.float16
    assert info["int4_tensors"] == [] and info["lm_head"] == "embeddings"


def test_write_read_round_trip_and_dequantize(tiny_model_dir, tmp_path):
    state = tiny_state(tiny_model_dir, "llama")
    tensors, manifest = quantized(state)
    target = tmp_path / "record" / "int4"
    artifact.write_artifact(target, tensors, manifest)
    assert sorted(p.name for p in target.iterdir()) == ["manifest.yaml", "model.safetensors"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["int4"]
    loaded, read_manifest = artifact.read_artifact(target)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert read_manifest["source"] == SOURCE and read_manifest["ffchat_version"]
    assert read_manifest["created"] and read_manifest["int4_tensors"] == manifest["int4_tensors"]

    restored = artifact.dequantize_state_dict(loaded, read_manifest)
    assert restored.keys() == state.keys()
    for name, original in state.items():
        assert restored[name].dtype == torch.float32 and restored[name].shape == original.shape
        relative = ((restored[name] - original).norm() / original.norm()).item()
        assert relative < (0.15 if name.endswith("proj.weight") or name == "lm_head.weight" else 1e-3), name


def test_rewrite_replaces_the_old_artifact(tiny_model_dir, tmp_path):
    state = tiny_state(tiny_model_dir, "llama")
    target = tmp_path / "int4"
    artifact.write_artifact(target, *quantized(state, method="rtn"))
    artifact.write_artifact(target, *quantized(state, method="wmse"))
    assert artifact.read_artifact(target)[1]["method"] == "wmse"
    assert [p.name for p in tmp_path.iterdir()] == ["int4"]


def test_failed_write_leaves_nothing_behind(tiny_model_dir, tmp_path, monkeypatch):
    state = tiny_state(tiny_model_dir, "llama")
    tensors, manifest = quantized(state, method="rtn")

    def broken_save(tensors, path, metadata=None):
        save_file(dict(list(tensors.items())[:2]), path, metadata=metadata)
        raise OSError("disk full")

    monkeypatch.setattr(artifact, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        artifact.write_artifact(tmp_path / "int4", tensors, manifest)
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_the_old_artifact(tiny_model_dir, tmp_path, monkeypatch):
    state = tiny_state(tiny_model_dir, "llama")
    target = tmp_path / "int4"
    artifact.write_artifact(target, *quantized(state, method="rtn"))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl+C after the tensors, before the manifest

    monkeypatch.setattr(artifact.yaml, "safe_dump", interrupted)
    with pytest.raises(KeyboardInterrupt):
        artifact.write_artifact(target, *quantized(state, method="wmse"))
    monkeypatch.undo()
    assert artifact.read_artifact(target)[1]["method"] == "rtn"
    assert [p.name for p in tmp_path.iterdir()] == ["int4"]


def test_layout_version_mismatch_asks_for_a_requantize(tiny_model_dir, tmp_path):
    target = tmp_path / "int4"
    artifact.write_artifact(target, *quantized(tiny_state(tiny_model_dir, "llama"), method="rtn"))
    manifest = yaml.safe_load((target / "manifest.yaml").read_text())
    (target / "manifest.yaml").write_text(yaml.safe_dump({**manifest, "layout_version": 2}))
    with pytest.raises(FfchatError, match="layout version 2") as error:
        artifact.read_artifact(target)
    assert "re-quantize" in str(error.value)


def test_missing_or_malformed_int4_tensors_are_refused(tiny_model_dir, tmp_path):
    tensors, manifest = quantized(tiny_state(tiny_model_dir, "llama"), method="rtn")
    target = tmp_path / "int4"
    without_zeros = {k: v for k, v in tensors.items() if k != "lm_head.zeros"}
    with pytest.raises(ValueError, match="lm_head lacks zeros"):
        artifact.write_artifact(target, without_zeros, manifest)
    with pytest.raises(ValueError, match="lacks source"):
        artifact.write_artifact(target, tensors, {k: v for k, v in manifest.items() if k != "source"})
    artifact.write_artifact(target, tensors, manifest)
    save_file(without_zeros, target / "model.safetensors")
    with pytest.raises(FfchatError, match="damaged: lm_head lacks zeros"):
        artifact.read_artifact(target)
    save_file({**tensors, "lm_head.scales": tensors["lm_head.scales"].float()}, target / "model.safetensors")
    with pytest.raises(FfchatError, match="lm_head.scales is torch.float32"):
        artifact.read_artifact(target)
    with pytest.raises(FfchatError, match="no INT4 artifact"):
        artifact.read_artifact(tmp_path / "elsewhere")


def test_one_layer_of_a_1b_model_is_under_0_3x_its_bf16_bytes(tmp_path):
    """Llama-3.2-1B layer shapes with rows cut 16x (the ratio depends only on K and G); the file is measured."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"self_attn.q_proj": (2048, 2048), "self_attn.k_proj": (512, 2048), "self_attn.v_proj": (512, 2048),
              "self_attn.o_proj": (2048, 2048), "mlp.gate_proj": (8192, 2048), "mlp.up_proj": (8192, 2048),
              "mlp.down_proj": (2048, 8192)}
    state = {f"model.layers.0.{name}.weight": torch.randn(n // 16, k, generator=gen).to(torch.bfloat16)
             for name, (n, k) in shapes.items()}
    tensors, info = artifact.quantize_state_dict(state, method="rtn", device="cpu")
    artifact.write_artifact(tmp_path / "int4", tensors, {**info, "source": SOURCE})
    ratio = (tmp_path / "int4" / "model.safetensors").stat().st_size / sum(t.numel() * 2 for t in state.values())
    # full 1B layer: 4 bits per weight plus an fp16 scale and zero per 128 weights, over bf16's 2 bytes
    full_int4 = sum(n * k // 2 + 2 * 2 * n * k // 128 for n, k in shapes.values())
    analytic = full_int4 / sum(n * k * 2 for n, k in shapes.values())
    assert analytic == pytest.approx(0.2656, abs=1e-4)
    assert analytic <= ratio < analytic + 0.001 and ratio <= 0.3


def test_describe_source(tmp_path):
    hub = SimpleNamespace(repo_id="org/model", commit="abc", location=str(tmp_path))
    assert artifact.describe_source(hub) == {"repo": "org/model", "commit": "abc"}
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF weights")
    record = SimpleNamespace(repo_id=None, commit=None, location=str(gguf))
    digest = hashlib.sha256(b"GGUF weights").hexdigest()
    assert artifact.describe_source(record) == {"path": str(gguf), "sha256": {"model.gguf": digest}}
    (tmp_path / "config.json").write_text("{}")
    folder = SimpleNamespace(repo_id=None, commit=None, location=str(tmp_path))
    assert artifact.describe_source(folder)["sha256"] == {"model.gguf": digest}
