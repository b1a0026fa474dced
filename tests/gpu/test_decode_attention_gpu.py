"""Decode attention (RoPE, KV append, attention) vs its torch reference on real GQA shapes, incl. CUDA graph replay.

Run on the GPU machine: ``pytest -m gpu tests/gpu/test_decode_attention_gpu.py``. The kernel module is
imported inside the tests, so collecting this file never decides Triton's interpret mode.
"""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import GPU_COMPILED, rel_err

from ffchat.model import rope_tables
from ffchat.shapes import shape_config

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


class Case:
    """The token's bf16 qkv row, the model's RoPE tables, and layer 1 of a [2, Hkv, S, D] bf16 cache."""

    def __init__(self, model: str, seed: int):
        hq, hkv, d = SHAPES[model]
        gen = torch.Generator(device="cuda").manual_seed(seed)
        self.num_heads = hq
        self.qkv = (torch.randn((hq + 2 * hkv) * d, device="cuda", generator=gen) * 2).bfloat16()
        self.k = torch.randn(2, hkv, S, d, device="cuda", generator=gen).bfloat16()[1]
        self.v = torch.randn(2, hkv, S, d, device="cuda", generator=gen).bfloat16()[1]
        self.cos, self.sin = (t.cuda() for t in rope_tables(shape_config(model), S))

    def run(self, da, length, k=None, v=None, **kw):
        k, v = (self.k if k is None else k).clone(), (self.v if v is None else v).clone()
        length = lengths_tensor(length) if isinstance(length, int) else length
        return da.decode_attention(self.qkv, k, v, length, self.cos, self.sin, num_heads=self.num_heads, **kw), k

    def reference(self, da, length, **kw):
        """fp32 from the same bf16 inputs: attention, and the k cache with the new key appended."""
        k, v = self.k.float(), self.v.float()
        y = da.decode_attention_reference(self.qkv.float(), k, v, length, self.cos, self.sin,
                                          num_heads=self.num_heads, **kw)
        return y, k


def lengths_tensor(n: int) -> torch.Tensor:
    return torch.tensor([n], dtype=torch.int32, device="cuda")


@pytest.mark.parametrize("model", list(SHAPES))
def test_matches_reference(da, model):
    case = Case(model, seed=len(model))
    hq, _, d = SHAPES[model]
    for length in LENGTHS:
        out = torch.full((hq, d), float("nan"), dtype=torch.bfloat16, device="cuda")
        _, k = case.run(da, length, out=out)
        y_ref, k_ref = case.reference(da, length)
        assert torch.isfinite(out).all(), f"length {length}: some outputs were never written"
        assert rel_err(out, y_ref) < TOL, length
        assert rel_err(k[:, length - 1], k_ref[:, length - 1]) < TOL, length


def test_sliding_window_and_garbage_past_length(da):
    """Mistral-style window 4096; NaN at and past length-1 and before the window must not leak in."""
    case = Case("llama-3.1-8b", seed=7)
    for length in (100, 5000, 8192):
        ref, _ = case.reference(da, length, sliding_window=4096)
        k2, v2 = case.k.clone(), case.v.clone()
        for t in (k2, v2):
            t[:, length - 1:] = float("nan")
            t[:, : max(0, length - 4096)] = float("nan")
        y, _ = case.run(da, length, k2, v2, sliding_window=4096)
        assert torch.isfinite(y).all()
        assert rel_err(y, ref) < TOL, length


@pytest.mark.parametrize("model", ["llama-3.1-8b", "qwen2.5-0.5b"])
def test_cuda_graph_replay_follows_length(da, model):
    """One captured graph, length changed in place before each replay: the right answer at every length."""
    case = Case(model, seed=11)
    hq, _, d = SHAPES[model]
    ws = da.make_workspace(hq, d, S, device="cuda")
    out = torch.empty(hq, d, dtype=torch.bfloat16, device="cuda")
    k, v = case.k.clone(), case.v.clone()
    length = lengths_tensor(S)

    def step():
        da.decode_attention(case.qkv, k, v, length, case.cos, case.sin, num_heads=hq, out=out, workspace=ws)

    step()  # warm-up: compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for n in LENGTHS + [77, 3000, 1]:
        length.fill_(n)  # in place, as before a graph replay; fresh caches, as the reference starts from them
        k.copy_(case.k)
        v.copy_(case.v)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.isfinite(out).all(), n
        ref, _ = case.reference(da, n)
        assert rel_err(out, ref) < TOL, n
