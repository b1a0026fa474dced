"""INT4 GEMV kernels vs their torch references on real Llama shapes (compiled Triton on a CUDA GPU).

Run on the GPU machine: ``pytest -m gpu tests/gpu/test_int4_gemv_gpu.py``. The kernel module is
imported inside the tests, so collecting this file never decides Triton's interpret mode.
"""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import GPU_COMPILED, rel_err

pytestmark = GPU_COMPILED

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


# --- Fused W4A16 paths: input RMSNorm (norm_weight) and SwiGLU (gated [gate; up] rows), bf16 ---

FUSED_SPLIT_K = {"block_n": 4, "block_k": 1024, "num_warps": 4, "split_k": 2}


def norm_inputs(k: int, seed: int):
    """A bf16 residual-stream-like x (RMS far from 1) and a norm weight around 1."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(k, device="cuda", generator=gen) * 3 + 0.2).bfloat16()
    norm_weight = (torch.rand(k, device="cuda", generator=gen) + 0.5).bfloat16()
    return x, norm_weight


@pytest.mark.parametrize("with_bias", [False, True], ids=["llama", "qwen-bias"])
def test_norm_qkv_llama_1b(gemv, with_bias):
    """Input RMSNorm + fused q/k/v (N = 2048 + 2 * 512) of Llama-3.2-1B in one launch."""
    from ffchat.model import rms_norm

    n, k = 3072, 2048
    qweight, scales, zeros = weights(n, k, seed=41)
    x, norm_weight = norm_inputs(k, seed=42)
    bias = torch.randn(n, device="cuda").bfloat16() if with_bias else None
    out = torch.full((n,), float("nan"), device="cuda", dtype=torch.bfloat16)
    gemv.int4_gemv(x, qweight, scales, zeros, GROUP, bias=bias, norm_weight=norm_weight, norm_eps=1e-5, out=out)
    assert torch.isfinite(out).all(), "some outputs were never written"
    ref = gemv.int4_gemv_reference(x, qweight, scales, zeros, GROUP, bias=bias, norm_weight=norm_weight, norm_eps=1e-5)
    assert rel_err(out, ref) < 1.5e-2
    unfused = gemv.int4_gemv(rms_norm(x, norm_weight, 1e-5), qweight, scales, zeros, GROUP, bias=bias)
    assert rel_err(out, unfused) < 1.5e-2
    split = gemv.int4_gemv(x, qweight, scales, zeros, GROUP, bias=bias, norm_weight=norm_weight, norm_eps=1e-5,
                           config=gemv.GemvConfig(**FUSED_SPLIT_K))
    assert rel_err(split, ref) < 1.5e-2


@pytest.mark.parametrize("i, k", [(8192, 2048), (14336, 4096)], ids=["llama-1b", "llama-8b"])
def test_norm_gated_mlp(gemv, i, k):
    """post_attention_layernorm + gate/up + SiLU * up in one launch: weight [2I, K] = [gate; up]."""
    qweight, scales, zeros = weights(2 * i, k, seed=i + k)
    x, norm_weight = norm_inputs(k, seed=i)
    out = torch.full((i,), float("nan"), device="cuda", dtype=torch.bfloat16)
    gemv.int4_gemv(x, qweight, scales, zeros, GROUP, norm_weight=norm_weight, norm_eps=1e-5, gated=True, out=out)
    assert torch.isfinite(out).all(), "some outputs were never written"
    ref = gemv.int4_gemv_reference(x, qweight, scales, zeros, GROUP, norm_weight=norm_weight, norm_eps=1e-5, gated=True)
    assert rel_err(out, ref) < 1.5e-2
    again = gemv.int4_gemv(x, qweight, scales, zeros, GROUP, norm_weight=norm_weight, norm_eps=1e-5, gated=True)
    assert torch.equal(out, again)
    split = gemv.int4_gemv(x, qweight, scales, zeros, GROUP, norm_weight=norm_weight, norm_eps=1e-5, gated=True,
                           config=gemv.GemvConfig(**FUSED_SPLIT_K))
    assert rel_err(split, ref) < 1.5e-2


@pytest.mark.parametrize("i, k", [(8192, 2048), (14336, 4096)], ids=["llama-1b", "llama-8b"])
def test_w4a8_norm_gated_mlp(gemv, i, k):
    """The W4A8 mode's gate/up: norm in the quantizing launch, dp4a products, SwiGLU in the epilogue."""
    qweight, scales, zeros = weights(2 * i, k, seed=i + k + 1)
    x, norm_weight = norm_inputs(k, seed=i + 1)
    out = torch.full((i,), float("nan"), device="cuda", dtype=torch.bfloat16)
    gemv.int4_gemv_w4a8(x, qweight, scales, zeros, GROUP, norm_weight=norm_weight, norm_eps=1e-5, gated=True, out=out)
    assert torch.isfinite(out).all(), "some outputs were never written"
    ref = gemv.int4_gemv_w4a8_reference(x, qweight, scales, zeros, GROUP, norm_weight=norm_weight, norm_eps=1e-5,
                                        gated=True)
    assert rel_err(out, ref) < 1.5e-2
    w4a16 = gemv.int4_gemv_reference(x, qweight, scales, zeros, GROUP, norm_weight=norm_weight, norm_eps=1e-5,
                                     gated=True)
    assert rel_err(out, w4a16) < 5e-2


def test_norm_gated_under_cuda_graph_replay(gemv):
    """The fused MLP input op as a decode graph uses it: split-K counters and new x on every replay."""
    i, k = 8192, 2048
    qweight, scales, zeros = weights(2 * i, k, seed=7)
    x, norm_weight = norm_inputs(k, seed=8)
    out = torch.empty(i, device="cuda", dtype=torch.bfloat16)
    cfg = gemv.GemvConfig(**FUSED_SPLIT_K)

    def step():
        gemv.int4_gemv(x, qweight, scales, zeros, GROUP, norm_weight=norm_weight, gated=True, out=out, config=cfg)

    step()  # warm-up: compile, counters
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in range(3):
        x.copy_(norm_inputs(k, seed=100 + seed)[0])
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = gemv.int4_gemv_reference(x, qweight, scales, zeros, GROUP, norm_weight=norm_weight, gated=True)
        assert rel_err(out, ref) < 1.5e-2


# --- dp2a (int16 activations on the integer dot-product units) ---


@pytest.mark.parametrize("n, k", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
def test_dp2a_matches_w4a16(n, k):
    """The real `dp2a.lo/hi` instructions: the W4A16 result to within the output's rounding."""
    from ffchat.kernels import dp2a_gemv, int4_gemv

    qweight, scales, zeros = weights(n, k, seed=n + 3 * k)
    x = torch.randn(k, device="cuda", dtype=torch.float16)
    residual = torch.randn(n, device="cuda").half()
    out = torch.full((n,), float("nan"), device="cuda", dtype=torch.float16)
    dp2a_gemv.int4_gemv_dp2a(x, qweight, scales, zeros, GROUP, residual=residual, out=out)
    assert torch.isfinite(out).all(), "some outputs were never written"
    ref = dp2a_gemv.int4_gemv_dp2a_reference(x, qweight, scales, zeros, GROUP, residual=residual)
    assert rel_err(out, ref) < 2e-3
    assert rel_err(out, int4_gemv.int4_gemv_reference(x, qweight, scales, zeros, GROUP, residual=residual)) < 2e-3


@pytest.mark.parametrize("i, k", [(8192, 2048), (14336, 4096)], ids=["llama-1b", "llama-8b"])
def test_dp2a_norm_gated_mlp(i, k):
    from ffchat.kernels import dp2a_gemv, int4_gemv

    qweight, scales, zeros = weights(2 * i, k, seed=i + k + 2)
    x, norm_weight = norm_inputs(k, seed=i + 2)
    out = torch.full((i,), float("nan"), device="cuda", dtype=torch.bfloat16)
    dp2a_gemv.int4_gemv_dp2a(x, qweight, scales, zeros, GROUP, norm_weight=norm_weight, norm_eps=1e-5, gated=True,
                             out=out)
    assert torch.isfinite(out).all(), "some outputs were never written"
    w4a16 = int4_gemv.int4_gemv_reference(x, qweight, scales, zeros, GROUP, norm_weight=norm_weight, norm_eps=1e-5,
                                          gated=True)
    assert rel_err(out, w4a16) < 1.5e-2


@pytest.mark.parametrize("n, k, block_n, warps, per_sm, gated", [
    (128256, 2048, 16, 4, 2, False), (151936, 896, 8, 4, 4, False), (128256, 4096, 8, 4, 2, False),
    (8192, 2048, 8, 4, 2, True), (14336, 4096, 4, 4, 2, True), (14336, 4096, 2, 4, 4, True),
    (4096, 14336, 2, 4, 2, False),
], ids=["llama-1b-head", "qwen-0.5b-head", "llama-8b-head", "llama-1b-gate-up", "llama-8b-gate-up",
        "llama-8b-gate-up-half-tile", "llama-8b-down-shape"])
def test_dp2a_row_loops_write_what_a_program_a_block_writes(n, k, block_n, warps, per_sm, gated):
    """LM heads, gate/up and the 8B down's shape (K short of its tile) with a few programs per SM looping over
    the row blocks: every block written, what the one-block programs write up to the order of fp32 sums
    (compiled, the two paths reduce in different layouts; on the H100 of stop 27 some outputs differed in the
    last bf16 bit), and the reference's result."""
    from ffchat.kernels import dp2a_gemv, int4_gemv

    qweight, scales, zeros = weights(2 * n if gated else n, k, seed=n + k)
    x, norm_weight = norm_inputs(k, seed=k + 5)
    block_k = 1 << (k - 1).bit_length()
    per_block = dp2a_gemv.int4_gemv_dp2a(x, qweight, scales, zeros, GROUP, norm_weight=norm_weight, gated=gated,
                                         config=int4_gemv.GemvConfig(block_n, block_k, warps))
    out = torch.full((n,), float("nan"), device="cuda", dtype=torch.bfloat16)
    dp2a_gemv.int4_gemv_dp2a(x, qweight, scales, zeros, GROUP, norm_weight=norm_weight, gated=gated, out=out,
                             config=int4_gemv.GemvConfig(block_n, block_k, warps, programs_per_sm=per_sm))
    assert torch.isfinite(out).all(), "some row blocks were never written"
    assert rel_err(out, per_block) < 1e-3
    ref = int4_gemv.int4_gemv_reference(x, qweight, scales, zeros, GROUP, norm_weight=norm_weight, gated=gated)
    assert rel_err(out, ref) < 1.5e-2


LANE_SHAPES = [(2048, 2048), (2048, 8192), (4096, 4096), (4096, 14336)]  # the 1B's and the 8B's o and down


@pytest.mark.parametrize("n, k", LANE_SHAPES, ids=[f"{n}x{k}" for n, k in LANE_SHAPES])
def test_word_a_lane_gemv_matches_the_w4a16_kernel(gemv, n, k):
    """Every tile `ffchat tune` offers it, compiled: its shuffles exchange the lanes the layout puts words on."""
    from ffchat.kernels.lane_gemv import int4_gemv_lanes
    from ffchat.tune import LANE_TILES

    qweight, scales, zeros = weights(n, k, seed=3 * n + k)
    x = torch.randn(k, device="cuda", dtype=torch.bfloat16)
    bias, residual = torch.randn(n, device="cuda").bfloat16(), torch.randn(n, device="cuda").bfloat16()
    want = gemv.int4_gemv(x, qweight, scales, zeros, GROUP, bias=bias, residual=residual,
                          out=torch.empty(n, device="cuda", dtype=torch.float32))
    for block_k, warps, prefetch in LANE_TILES:
        config = gemv.GemvConfig(16, block_k, warps, prefetch=prefetch)
        out = torch.full((n,), float("nan"), device="cuda", dtype=torch.float32)
        int4_gemv_lanes(x, qweight, scales, zeros, GROUP, config=config, bias=bias, residual=residual, out=out)
        assert rel_err(out, want) < 1e-5, config
        rounded = int4_gemv_lanes(x, qweight, scales, zeros, GROUP, config=config, bias=bias, residual=residual)
        assert rel_err(rounded, gemv.int4_gemv_reference(x, qweight, scales, zeros, GROUP, bias=bias,
                                                          residual=residual)) < 1.5e-2, config


NORMED_LANE_SHAPES = [(3072, 2048, False), (16384, 2048, True), (6144, 4096, False), (28672, 4096, True),
                      (128256, 4096, False)]


@pytest.mark.parametrize("n, k, gated", NORMED_LANE_SHAPES,
                         ids=[f"{n}x{k}{'-gated' if g else ''}" for n, k, g in NORMED_LANE_SHAPES])
def test_word_a_lane_gemv_with_a_fused_norm_matches_the_w4a16_kernel(gemv, n, k, gated):
    """The 1B's and 8B's q/k/v and gate/up (fused RMSNorm, and SwiGLU on gate/up) and the 8B's LM head (fp32 logits,
    as the backend stores them), every offered tile, compiled."""
    from ffchat.kernels.lane_gemv import int4_gemv_lanes
    from ffchat.tune import LANE_TILES

    qweight, scales, zeros = weights(n, k, seed=5 * n + k)
    x = torch.randn(k, device="cuda", dtype=torch.bfloat16)
    norm = {"norm_weight": torch.rand(k, device="cuda").bfloat16() + 0.5, "norm_eps": 1e-5, "gated": gated}
    outputs = n // 2 if gated else n
    want = gemv.int4_gemv(x, qweight, scales, zeros, GROUP, out=torch.empty(outputs, device="cuda"), **norm)
    for block_k, warps, prefetch in LANE_TILES:
        config = gemv.GemvConfig(8 if gated else 16, block_k, warps, prefetch=prefetch)
        out = torch.full((outputs,), float("nan"), device="cuda", dtype=torch.float32)
        int4_gemv_lanes(x, qweight, scales, zeros, GROUP, config=config, out=out, **norm)
        assert rel_err(out, want) < 1e-5, config
        rounded = int4_gemv_lanes(x, qweight, scales, zeros, GROUP, config=config, **norm)
        assert rel_err(rounded, gemv.int4_gemv_reference(x, qweight, scales, zeros, GROUP, **norm)) < 1.5e-2, config
