"""INT4 GEMV kernels vs their torch references on real Llama shapes (compiled Triton on a CUDA GPU).

Run on the GPU machine: ``pytest -m gpu tests/gpu/test_int4_gemv_gpu.py``. The kernel module is
imported inside the tests, so collecting this file never decides Triton's interpret mode.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="TRITON_INTERPRET=1: kernels would not compile"),
]

GROUP = 128
SHAPES = [  # (N, K): Llama-3.2-1B q/o, k/v, gate|up, down, LM head; Llama-3.1-8B q/o, gate+up fused, down
    (2048, 2048), (512, 2048), (8192, 2048), (2048, 8192), (128256, 2048),
    (4096, 4096), (28672, 4096), (4096, 14336),
]


@pytest.fixture(scope="module")
def gemv():
    from ffchat.kernels import int4_gemv

    return int4_gemv


def weights(n: int, k: int, seed: int):
    """Random int32 words are valid packed codes; scales and fractional zeros as a quantizer makes them."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    qweight = torch.randint(-(2**31), 2**31 - 1, (n, k // 8), dtype=torch.int32, device="cuda", generator=gen)
    scales = (torch.rand(n, k // GROUP, device="cuda", generator=gen) * 0.01 + 0.001).half()
    zeros = (torch.rand(n, k // GROUP, device="cuda", generator=gen) * 15).half()
    return qweight, scales, zeros


def rel_err(y, ref) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("n, k", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
def test_w4a16_matches_reference(gemv, n, k):
    qweight, scales, zeros = weights(n, k, seed=n + k)
    x = torch.randn(k, device="cuda", dtype=torch.float16)
    bias, residual = torch.randn(n, device="cuda").half(), torch.randn(n, device="cuda").half()
    out = torch.full((n,), float("nan"), device="cuda", dtype=torch.float16)
    gemv.int4_gemv(x, qweight, scales, zeros, GROUP, bias=bias, residual=residual, out=out)
    ref = gemv.int4_gemv_reference(x, qweight, scales, zeros, GROUP, bias=bias, residual=residual)
    assert torch.isfinite(out).all(), "some outputs were never written"
    assert rel_err(out, ref) < 2e-3
    again = gemv.int4_gemv(x, qweight, scales, zeros, GROUP, bias=bias, residual=residual)
    assert torch.equal(out, again), "split-K must be deterministic"


@pytest.mark.parametrize("n, k", SHAPES[:2] + SHAPES[5:6], ids=lambda v: str(v))
def test_w4a16_bf16(gemv, n, k):
    qweight, scales, zeros = weights(n, k, seed=3 * n + k)
    x = torch.randn(k, device="cuda", dtype=torch.bfloat16)
    y = gemv.int4_gemv(x, qweight, scales, zeros, GROUP)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, gemv.int4_gemv_reference(x, qweight, scales, zeros, GROUP)) < 1.5e-2


@pytest.mark.parametrize("n, k", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
def test_w4a8_matches_reference(gemv, n, k):
    qweight, scales, zeros = weights(n, k, seed=n + 2 * k)
    x = torch.randn(k, device="cuda", dtype=torch.float16)
    residual = torch.randn(n, device="cuda").half()
    out = torch.full((n,), float("nan"), device="cuda", dtype=torch.float16)
    gemv.int4_gemv_w4a8(x, qweight, scales, zeros, GROUP, residual=residual, out=out)
    assert torch.isfinite(out).all()
    assert rel_err(out, gemv.int4_gemv_w4a8_reference(x, qweight, scales, zeros, GROUP, residual=residual)) < 2e-3
    plain = gemv.int4_gemv_reference(x, qweight, scales, zeros, GROUP, residual=residual)
    assert rel_err(out, plain) < 2e-2  # the price of int8 activations


def test_split_k_under_cuda_graph_replay(gemv):
    """Counters reset by the last slice: replays with new inputs keep giving the right answer."""
    n, k = 2048, 8192
    cfg = gemv.GemvConfig(block_n=16, block_k=1024, num_warps=4, split_k=4)
    qweight, scales, zeros = weights(n, k, seed=5)
    x = torch.randn(k, device="cuda", dtype=torch.float16)
    out = torch.empty(n, device="cuda", dtype=torch.float16)
    gemv.int4_gemv(x, qweight, scales, zeros, GROUP, out=out, config=cfg)  # warm-up: compile, counters
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gemv.int4_gemv(x, qweight, scales, zeros, GROUP, out=out, config=cfg)
    for _ in range(3):
        x.copy_(torch.randn(k, device="cuda", dtype=torch.float16))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, gemv.int4_gemv_reference(x, qweight, scales, zeros, GROUP)) < 2e-3
