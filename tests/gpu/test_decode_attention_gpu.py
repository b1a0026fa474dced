"""Decode attention vs its torch reference on real GQA shapes (compiled Triton on a CUDA GPU), incl. CUDA graph replay.

Run on the GPU machine: ``pytest -m gpu tests/gpu/test_decode_attention_gpu.py``. The kernel module is
imported inside the tests, so collecting this file never decides Triton's interpret mode.
"""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import GPU_COMPILED, rel_err

pytestmark = GPU_COMPILED

S = 8192
LENGTHS = [1, 511, 4096, 8192]
SHAPES = {  # (Hq, Hkv, D)
    "llama-3.2-1b": (32, 8, 64),
    "llama-3.1-8b": (32, 8, 128),
    "qwen2.5-0.5b": (14, 2, 64),
}
TOL = 1e-2  # bf16: P rounded to bf16 before the PV product, output rounding ~4e-3


@pytest.fixture(scope="module")
def da():
    from ffchat.kernels import decode_attention

    return decode_attention


def inputs(hq: int, hkv: int, d: int, seed: int, layers: int = 2):
    """q and layer 1 of a [layers, Hkv, S, D] bf16 cache, as the Triton backend slices it."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = (torch.randn(hq, d, device="cuda", generator=gen) * 2).bfloat16()
    k = torch.randn(layers, hkv, S, d, device="cuda", generator=gen).bfloat16()
    v = torch.randn(layers, hkv, S, d, device="cuda", generator=gen).bfloat16()
    return q, k[1], v[1]


def lengths_tensor(n: int) -> torch.Tensor:
    return torch.tensor([n], dtype=torch.int32, device="cuda")


@pytest.mark.parametrize("model", list(SHAPES))
def test_matches_reference(da, model):
    hq, hkv, d = SHAPES[model]
    q, k, v = inputs(hq, hkv, d, seed=hq + d)
    for length in LENGTHS:
        out = torch.full((hq, d), float("nan"), dtype=torch.bfloat16, device="cuda")
        da.decode_attention(q, k, v, lengths_tensor(length), out=out)
        assert torch.isfinite(out).all(), f"length {length}: some outputs were never written"
        assert rel_err(out, da.decode_attention_reference(q, k, v, length)) < TOL, length


def test_sliding_window_and_garbage_past_length(da):
    """Mistral-style window 4096; NaN past length and before the window must not leak in."""
    hq, hkv, d = SHAPES["llama-3.1-8b"]
    q, k, v = inputs(hq, hkv, d, seed=7)
    for length in (100, 5000, 8192):
        ref = da.decode_attention_reference(q, k, v, length, sliding_window=4096)
        k2, v2 = k.clone(), v.clone()
        for t in (k2, v2):
            t[:, length:] = float("nan")
            t[:, : max(0, length - 4096)] = float("nan")
        y = da.decode_attention(q, k2, v2, lengths_tensor(length), sliding_window=4096)
        assert torch.isfinite(y).all()
        assert rel_err(y, ref) < TOL, length


@pytest.mark.parametrize("model", ["llama-3.1-8b", "qwen2.5-0.5b"])
def test_cuda_graph_replay_follows_length(da, model):
    """One captured graph, length changed in place before each replay: the right answer at every length."""
    hq, hkv, d = SHAPES[model]
    q, k, v = inputs(hq, hkv, d, seed=11)
    ws = da.make_workspace(hq, d, S, device="cuda")
    out = torch.empty(hq, d, dtype=torch.bfloat16, device="cuda")
    length = lengths_tensor(S)
    da.decode_attention(q, k, v, length, out=out, workspace=ws)  # warm-up: compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        da.decode_attention(q, k, v, length, out=out, workspace=ws)
    for n in LENGTHS + [77, 3000, 1]:
        length.fill_(n)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.isfinite(out).all(), n
        assert rel_err(out, da.decode_attention_reference(q, k, v, n)) < TOL, n
