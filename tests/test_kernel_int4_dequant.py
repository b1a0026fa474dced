"""The INT4 dequantize kernel against ``ffchat.quantize.layout.dequantize`` (Triton interpreter on CPU).

Exact: the kernel does the reference's fp32 operations, ``(q - z) * s``, and one
round-to-nearest-even cast, so every output dtype (fp32, fp16, bf16) must match bit for bit.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernel_helpers import random_int4  # noqa: E402

from ffchat.kernels import int4_dequant as dq  # noqa: E402
from ffchat.kernels.interpreter import interpreted  # noqa: E402
from ffchat.quantize.layout import dequantize, pack_int4  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def make_weights(n: int, k: int, group: int, seed: int):
    return random_int4(n, k, group, seed, DEVICE)


def test_interpreter_is_active_without_cuda():
    if DEVICE == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1"
        assert interpreted(dq._int4_dequant_kernel), "kernel module was imported before the flag"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("k, group", [(64, 8), (96, 16), (192, 32), (576, 64), (256, 128)])
@pytest.mark.parametrize("n", [7, 24])
def test_matches_layout_dequantize_exactly(n, k, group, dtype):
    qweight, scales, zeros = make_weights(n, k, group, seed=n * 1000 + k + group)
    w = dq.dequantize_int4(qweight, scales, zeros, group, dtype=dtype)
    assert w.shape == (n, k) and w.dtype == dtype
    assert torch.equal(w, dequantize(qweight, scales, zeros, group, dtype=dtype))


# Tiles that force several programs on both grid axes, masked rows, a masked K tail, and the unmasked path.
CONFIGS = [
    (dq.DequantConfig(block_n=4, block_k=128, num_warps=2), 7, 576, 64),  # partial row block, K tail
    (dq.DequantConfig(block_n=2, block_k=64, num_warps=1), 33, 192, 16),
    (dq.DequantConfig(block_n=8, block_k=128, num_warps=4), 16, 256, 32),  # even: no masks
    (dq.DequantConfig(block_n=16, block_k=32, num_warps=4), 5, 96, 32),  # block wider than N
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("cfg, n, k, group", CONFIGS, ids=lambda v: f"{v.block_n}x{v.block_k}" if
                         isinstance(v, dq.DequantConfig) else str(v))
def test_forced_tiles(cfg, n, k, group, dtype):
    qweight, scales, zeros = make_weights(n, k, group, seed=cfg.block_k + n)
    w = dq.dequantize_int4(qweight, scales, zeros, group, dtype=dtype, config=cfg)
    assert torch.equal(w, dequantize(qweight, scales, zeros, group, dtype=dtype))


def test_writes_into_a_view_of_a_larger_scratch():
    """Prefill reuses one scratch for every weight: only the first N*K elements are written."""
    n, k, group = 7, 192, 32
    qweight, scales, zeros = make_weights(n, k, group, seed=3)
    scratch = torch.full((n * k + 300,), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    out = scratch[: n * k].view(n, k)
    w = dq.dequantize_int4(qweight, scales, zeros, group, out=out, dtype=torch.float16)  # out's dtype wins
    assert w.data_ptr() == scratch.data_ptr() and w.dtype == torch.bfloat16
    assert torch.equal(w, dequantize(qweight, scales, zeros, group, dtype=torch.bfloat16))
    assert torch.isnan(scratch[n * k:]).all(), "wrote past the view"
    ref = dq.dequantize_int4_reference(qweight, scales, zeros, group, out=torch.empty_like(out))
    assert torch.equal(w, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_extreme_codes_zeros_and_rounding_ties(dtype):
    """Codes 0, 15 and every code at every nibble; zero points at both ends and beyond; odd scales."""
    n, k, group = 8, 64, 16
    q = torch.cat([torch.zeros(2, k, dtype=torch.long), torch.full((2, k), 15), torch.arange(k).repeat(4, 1) % 16])
    qweight = pack_int4(q).to(DEVICE)
    zeros = torch.tensor([0.0, 15.0, -200.0, 7.53125], dtype=torch.float16).repeat(n, 1)
    # 1 + 2^-8 makes (q - z) * s land on bf16 rounding ties; 2^-14 is fp16's smallest normal.
    scales = torch.tensor([1 + 2**-8, -0.01, 2**-14, 3.0], dtype=torch.float16).repeat(n, 1)
    zeros, scales = zeros.to(DEVICE), scales.to(DEVICE)
    exact = dequantize(qweight, scales, zeros, group)
    if dtype == torch.bfloat16:  # the case is only worth having if it holds ties
        assert ((exact.view(torch.int32) & 0xFFFF) == 0x8000).sum() >= 8
    w = dq.dequantize_int4(qweight, scales, zeros, group, dtype=dtype)
    assert torch.equal(w, dequantize(qweight, scales, zeros, group, dtype=dtype))


def test_all_bit_patterns_of_random_words():
    """Any int32 is a valid word (negative ones included): the masks after shifts must hold."""
    n, k, group = 9, 128, 32
    gen = torch.Generator().manual_seed(12)
    qweight = torch.randint(-(2**31), 2**31 - 1, (n, k // 8), dtype=torch.int32, generator=gen).to(DEVICE)
    scales = (torch.rand(n, k // group, generator=gen) + 0.5).half().to(DEVICE)
    zeros = (torch.rand(n, k // group, generator=gen) * 15).half().to(DEVICE)
    w = dq.dequantize_int4(qweight, scales, zeros, group, dtype=torch.float32)
    assert torch.equal(w, dequantize(qweight, scales, zeros, group))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"group": 48}, "group size"),
        ({"scales_shape": (8, 3)}, "scales"),
        ({"out_shape": (8, 32)}, "out"),
        ({"out_dtype": torch.int32}, "fp16/bf16/fp32"),
        ({"qweight_dtype": torch.int64}, "int32"),
    ],
)
def test_rejects_bad_inputs(change, message):
    n, k = 8, 64
    qweight, scales, zeros = make_weights(n, k, 32, seed=3)
    qweight = qweight.to(change.get("qweight_dtype", torch.int32))
    if "scales_shape" in change:
        scales = torch.ones(change["scales_shape"], dtype=torch.float16, device=DEVICE)
    out = None
    if "out_shape" in change or "out_dtype" in change:
        out = torch.empty(change.get("out_shape", (n, k)), dtype=change.get("out_dtype", torch.float16), device=DEVICE)
    with pytest.raises(ValueError, match=message):
        dq.dequantize_int4(qweight, scales, zeros, change.get("group", 32), out=out)
