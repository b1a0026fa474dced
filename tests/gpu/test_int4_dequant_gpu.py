"""INT4 dequantize kernel vs ``ffchat.quantize.layout.dequantize`` on real shapes (compiled Triton on a CUDA GPU).

Run on the GPU machine: ``pytest -m gpu tests/gpu/test_int4_dequant_gpu.py`` (add ``-s`` to see the
bandwidth line). The results must be bit-identical: same fp32 operations, one RNE cast.
"""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import GPU_COMPILED

pytestmark = GPU_COMPILED

GROUP = 128
SHAPES = [  # (N, K): Llama-3.2-1B down, LM head, gate|up; Llama-3.1-8B gate+up fused, down; SmolLM2-like odd K
    (2048, 8192), (128256, 2048), (8192, 2048), (28672, 4096), (4096, 14336), (1536, 576),
]


@pytest.fixture(scope="module")
def dq():
    from ffchat.kernels import int4_dequant

    return int4_dequant


def weights(n: int, k: int, seed: int, group: int = GROUP):
    """Random int32 words are valid packed codes; scales and fractional zeros as a quantizer makes them."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    qweight = torch.randint(-(2**31), 2**31 - 1, (n, k // 8), dtype=torch.int32, device="cuda", generator=gen)
    scales = (torch.rand(n, k // group, device="cuda", generator=gen) * 0.01 + 0.001).half()
    zeros = (torch.rand(n, k // group, device="cuda", generator=gen) * 15).half()
    return qweight, scales, zeros


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("n, k", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
def test_matches_layout_dequantize_exactly(dq, n, k, dtype):
    from ffchat.quantize.layout import dequantize

    group = GROUP if k % GROUP == 0 else 64
    qweight, scales, zeros = weights(n, k, seed=n + k, group=group)
    scratch = torch.full((n * k + 4096,), float("nan"), dtype=dtype, device="cuda")
    out = scratch[: n * k].view(n, k)
    dq.dequantize_int4(qweight, scales, zeros, group, out=out)
    assert torch.equal(out, dequantize(qweight, scales, zeros, group, dtype=dtype))
    assert torch.isnan(scratch[n * k:]).all(), "wrote past the view"


@pytest.mark.parametrize("n, k", SHAPES[:2], ids=[f"{n}x{k}" for n, k in SHAPES[:2]])
def test_bandwidth_report(dq, n, k):
    """Prints GB/s (INT4 words + fp16 scales/zeros read, bf16 written) beside a device copy of the same bytes."""
    qweight, scales, zeros = weights(n, k, seed=1)
    out = torch.empty(n, k, dtype=torch.bfloat16, device="cuda")
    moved = qweight.numel() * 4 + scales.numel() * 4 + out.numel() * 2
    src = torch.empty(moved // 8, dtype=torch.float32, device="cuda")  # a copy reads and writes `moved` bytes
    dst = torch.empty_like(src)

    def timed(fn, reps=20):
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps / 1e3

    t_dq = timed(lambda: dq.dequantize_int4(qweight, scales, zeros, GROUP, out=out))
    t_copy = timed(lambda: dst.copy_(src))
    print(f"\ndequantize {n}x{k}: {t_dq * 1e6:.1f} us, {moved / t_dq / 1e9:.0f} GB/s; "
          f"copy {moved / t_copy / 1e9:.0f} GB/s")
    from ffchat.quantize.layout import dequantize

    assert torch.equal(out, dequantize(qweight, scales, zeros, GROUP, dtype=torch.bfloat16))
