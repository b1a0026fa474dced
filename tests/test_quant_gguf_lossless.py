"""GGUF Q4_0/Q4_1 tensors go into INT4 layout v1 without re-fitting, where their groups of 32 line up.

Blocks are made with the gguf package's own quantizer and checked against its
own dequantizer, so the block layout and the q/k row order are tested against
the format, not against ffchat.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

gguf = pytest.importorskip("gguf")

import gguf_fixtures  # noqa: E402
from cli_helpers import ffchat  # noqa: E402
from gguf_fixtures import hparams, llama_cpp_permute, write_gguf  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from ffchat.gguf_import import load_gguf_state_dict, read_q4_blocks  # noqa: E402
from ffchat.quantize.artifact import dequantize_state_dict, read_artifact  # noqa: E402
from ffchat.quantize.exact import affine_blocks_to_layout  # noqa: E402
from ffchat.quantize.layout import dequantize  # noqa: E402
from ffchat.store import Store  # noqa: E402

Q4 = gguf.GGMLQuantizationType


def awkward_weight(rows: int, cols: int, seed: int) -> np.ndarray:
    """Gaussian weights plus the blocks that need care: all zero, constant positive and negative, far from zero."""
    w = np.random.default_rng(seed).normal(0, 0.05, (rows, cols)).astype(np.float32)
    w[0, :32] = 0.0
    w[1, :32] = 0.3
    w[2, :32] = -0.7
    w[3, :32] = np.linspace(1.0, 1.01, 32)
    return w


def quantized(w: np.ndarray, kind) -> tuple[np.ndarray, object]:
    return gguf.quants.quantize(w, kind), kind


def reconstruct(blocks) -> torch.Tensor:
    """w = d * q + m from read_q4_blocks' parts."""
    return blocks.d.repeat_interleave(32, dim=1) * blocks.q.float() + blocks.m.repeat_interleave(32, dim=1)


def layout_error_bound(blocks) -> torch.Tensor:
    """Per element, half an fp16 ulp of the stored zero times |d|: all that rounding the zero can cost.

    The zero is -m/d, or 15 + m/d where a negative d flips the codes.
    """
    d, m = blocks.d.double(), blocks.m.double()
    zero = torch.where(d == 0, torch.zeros_like(m), -m / torch.where(d == 0, 1.0, d))
    zero = torch.where(d < 0, 15 - zero, zero).abs()
    ulp = torch.pow(2.0, torch.floor(torch.log2(zero.clamp_min(2.0**-14))) - 10)
    return (ulp / 2 * d.abs()).repeat_interleave(32, dim=1).float() + 1e-6  # + fp32 rounding


@pytest.fixture
def q4_file(tmp_path):
    """A one-layer llama GGUF: q Q4_0 and k Q4_1 (rows permuted as llama.cpp does), down Q4_1, v F32, embeddings Q4_0."""
    weights = {
        "attn_q": awkward_weight(64, 64, 1), "attn_k": awkward_weight(32, 64, 2),
        "ffn_down": awkward_weight(64, 160, 3), "attn_v": awkward_weight(32, 64, 4),
    }
    tensors = {
        "blk.0.attn_q.weight": quantized(llama_cpp_permute(weights["attn_q"], 4), Q4.Q4_0),
        "blk.0.attn_k.weight": quantized(llama_cpp_permute(weights["attn_k"], 2), Q4.Q4_1),
        "blk.0.ffn_down.weight": quantized(weights["ffn_down"], Q4.Q4_1),
        "blk.0.attn_v.weight": weights["attn_v"],
        "token_embd.weight": quantized(awkward_weight(96, 64, 5), Q4.Q4_0),
    }
    return write_gguf(tmp_path / "q4.gguf", "llama", hparams("llama", heads=4, kv_heads=2), tensors)


def test_raw_blocks_reproduce_the_gguf_dequantizer_and_row_order(q4_file):
    blocks = read_q4_blocks(q4_file)
    state = load_gguf_state_dict(q4_file)
    assert set(blocks) == {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                           "model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight"}
    assert blocks["model.layers.0.self_attn.q_proj.weight"].kind == "Q4_0"
    assert blocks["model.layers.0.self_attn.k_proj.weight"].kind == "Q4_1"
    for name, parts in blocks.items():
        assert parts.q.dtype == torch.uint8 and int(parts.q.max()) <= 15
        assert parts.q.shape == state[name].shape and parts.d.shape == (state[name].shape[0], state[name].shape[1] // 32)
        torch.testing.assert_close(reconstruct(parts), state[name], rtol=0, atol=0, msg=name)
    # the q rows came back in Hugging Face order: row 3 is the block that is constant 1.0..1.01
    q_proj = reconstruct(blocks["model.layers.0.self_attn.q_proj.weight"])
    assert q_proj[3, :32].min() > 0.99 and q_proj[1, :32].unique().numel() == 1


def test_blocks_map_into_the_layout_up_to_the_zeros_fp16_rounding(q4_file):
    for name, parts in read_q4_blocks(q4_file).items():
        qweight, scales, zeros = affine_blocks_to_layout(parts.q, parts.d, parts.m)
        assert qweight.dtype == torch.int32 and scales.dtype == zeros.dtype == torch.float16
        assert bool((scales >= 0).all()), name  # Q4_0's negative scales are flipped, not stored
        error = (dequantize(qweight, scales, zeros, 32) - reconstruct(parts)).abs()
        assert bool((error <= layout_error_bound(parts)).all()), name
        if parts.kind == "Q4_0":  # zero 8 (or 7 when flipped) is exact in fp16
            assert error.max().item() == 0.0, name


def test_synthetic_affine_blocks_cover_negative_and_zero_scales():
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (8, 128), generator=gen, dtype=torch.uint8)
    d = (torch.randn(8, 4, generator=gen) * 0.01).half().float()
    m = (torch.randn(8, 4, generator=gen) * 0.1).half().float()
    d[0, 0], d[1, 1], m[1, 1], d[2, 2] = 0.0, 0.0, 0.0, -d[2, 2].abs()
    qweight, scales, zeros = affine_blocks_to_layout(q, d, m)
    expected = d.repeat_interleave(32, 1) * q.float() + m.repeat_interleave(32, 1)
    error = (dequantize(qweight, scales, zeros, 32) - expected).abs()
    assert bool((error <= layout_error_bound(SimpleNamespace(d=d, m=m))).all())
    assert error[0, :32].max().item() == 0.0 and error[1, 32:64].max().item() == 0.0  # the two d = 0 blocks: m and 0 exactly
    assert bool((scales >= 0).all())


def tiny_q4_gguf(tiny_model_dir, path, monkeypatch):
    """The tiny llama as llama.cpp would write it with --outtype q4_1 (q4_0 for the MLP): linears Q4, the rest F32."""
    write = gguf_fixtures.write_gguf

    def quantizing_write(target, arch, metadata, tensors):
        kinds = {"attn_": Q4.Q4_1, "ffn_": Q4.Q4_0}
        for name, value in list(tensors.items()):
            kind = next((k for prefix, k in kinds.items() if f".{prefix}" in name and "norm" not in name), None)
            if kind is not None:
                tensors[name] = quantized(value, kind)
        return write(target, arch, metadata, tensors)

    monkeypatch.setattr(gguf_fixtures, "write_gguf", quantizing_write)
    return gguf_fixtures.hf_model_to_gguf(tiny_model_dir("llama"), path)


def test_quantize_keeps_a_q4_gguf_exactly_at_group_32(tiny_model_dir, tmp_path, monkeypatch):
    path = tiny_q4_gguf(tiny_model_dir, tmp_path / "tiny-q4.gguf", monkeypatch)
    assert ffchat("pull", str(path), "--name", "tiny-q4").returncode == 0
    result = ffchat("quantize", "tiny-q4", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "group size 32: the GGUF's Q4_0/Q4_1 blocks (groups of 32), kept exactly" in result.stderr
    assert "15 INT4 tensors, 14 kept exactly from the GGUF, LM head int4" in result.stderr

    record = Store().get("tiny-q4")
    tensors, manifest = read_artifact(record.record_dir / "int4")
    assert manifest["group_size"] == 32 and manifest["method"] == "wmse"
    assert "lm_head" not in manifest["exact"] and len(manifest["exact"]) == 14
    original = load_gguf_state_dict(path)
    restored = dequantize_state_dict(tensors, manifest)
    for name, parts in read_q4_blocks(path).items():
        error = (restored[name] - original[name]).abs()
        assert bool((error <= layout_error_bound(parts)).all()), name
    head_error = (restored["lm_head.weight"] - original["lm_head.weight"]).abs().max().item()
    assert 0 < head_error < 0.1  # F32 in the file: re-fitted

    result = ffchat("quantize", "tiny-q4", "--device", "cpu", "--group-size", "64")
    assert result.returncode == 0, result.stderr
    manifest = yaml.safe_load((record.record_dir / "int4" / "manifest.yaml").read_text())
    assert manifest["group_size"] == 64 and "group_size_reason" not in manifest
    # down_proj's 160 inputs fall back to groups of 32, where its blocks still line up
    assert manifest["exact"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    stored = load_file(record.record_dir / "int4" / "model.safetensors")
    assert stored["model.layers.0.self_attn.q_proj.scales"].shape == (64, 1)
