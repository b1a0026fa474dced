"""The dp2a INT4 GEMV (int16 activations) against its torch reference and against W4A16.

Runs in the Triton interpreter on the CPU (``dp2a`` emulated with integer ops) and compiled where
CUDA exists. The flag is set before the kernel modules are imported (see test_kernel_int4_gemv.py).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernel_helpers import random_int4, rel_err  # noqa: E402

from ffchat.kernels import dp2a_gemv  # noqa: E402
from ffchat.kernels import int4_gemv as gemv  # noqa: E402
from ffchat.kernels.interpreter import interpreted  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
# The kernel's sums are exact integers scaled in fp32, so what is left is the output's rounding (fp16 ~5e-4;
# bf16 ~4e-3, truncated by the interpreter) and, against W4A16, the int16 codes' rounding (~2e-5).
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def rand(shape, dtype, seed, scale=1.0):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(DEVICE, dtype)


def test_interpreter_is_active_without_cuda():
    if DEVICE == "cpu":
        assert interpreted(dp2a_gemv._int4_gemv_dp2a_kernel), "kernel module was imported before the flag"


def test_codes_round_to_nearest_even_and_keep_the_group_max_below_2_15():
    """The reference's codes: x / 2^e rounded half to even, the largest of a group in [2^14, 2^15)."""
    group = 32
    x = torch.zeros(2 * group)
    x[0], x[1], x[2], x[3] = 2.0**14, 2.5, 3.5, -2.5  # scale 1: codes 16384, 2, 4, -2
    x[group] = 3.0  # second group: scale 2^-13
    codes, scales = dp2a_gemv.int16_codes(x, group)
    assert scales.tolist() == [1.0, 2.0**-13]
    assert codes[0, :4].tolist() == [16384.0, 2.0, 4.0, -2.0]
    assert codes[1, 0].item() == 3.0 * 2**13


def test_the_kernel_codes_x_as_the_reference_does_ties_included():
    """Row r reads input r alone (q = 1, s = 1, z = 0), so each output is one code times its scale, exactly."""
    from ffchat.quantize.layout import pack_int4

    n, k, group = 8, 64, 32
    q = torch.zeros(n, k, dtype=torch.int64)
    q[torch.arange(n), torch.arange(n)] = 1
    qweight = pack_int4(q).to(DEVICE)
    scales = torch.ones(n, k // group, dtype=torch.float16, device=DEVICE)
    zeros = torch.zeros(n, k // group, dtype=torch.float16, device=DEVICE)
    x = torch.zeros(k)
    x[:8] = torch.tensor([2.0**14, 2.5, 3.5, -2.5, 0.5, 1.5, -1.5, 7.0])  # group scale 1: ties round to even
    y = dp2a_gemv.int4_gemv_dp2a(x.to(DEVICE, torch.float16), qweight, scales, zeros, group)
    assert y.float().cpu().tolist() == [16384.0, 2.0, 4.0, -2.0, 0.0, 2.0, -2.0, 7.0]


def test_codes_keep_bf16_values_exact_within_2_7_of_the_group_max():
    """Dividing by a power of two is exact, so only elements far below the group's largest are rounded."""
    group = 64
    x = rand(4 * group, torch.bfloat16, seed=5, scale=2.0)
    codes, scales = dp2a_gemv.int16_codes(x, group)
    back = (codes * scales[:, None]).view(-1)
    group_max = x.float().abs().view(-1, group).amax(dim=1).repeat_interleave(group)
    large = x.float().abs() >= group_max / 2**7
    assert torch.equal(back[large], x.float()[large])
    assert ((back - x.float()).abs() <= group_max / 2**16).all()


# Configs that force masked rows, a K tail, chunks wholly past K, several chunks, and split-K.
FORCED = [
    gemv.GemvConfig(block_n=16, block_k=128, num_warps=4, split_k=3),
    gemv.GemvConfig(block_n=8, block_k=64, num_warps=2, split_k=4),
    gemv.GemvConfig(block_n=4, block_k=1024, num_warps=4),
    gemv.GemvConfig(block_n=32, block_k=256, num_warps=4),  # K=576: 3 chunks, the last partial
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg", [None] + FORCED, ids=lambda c: "table" if c is None else f"bn{c.block_n}-bk{c.block_k}-s{c.split_k}")
def test_matches_its_reference_with_bias_and_residual(cfg, dtype):
    n, k, group = 40, 576, 64
    qweight, scales, zeros = random_int4(n, k, group, seed=21, device=DEVICE)
    x, bias, residual = rand(k, dtype, 11), rand(n, dtype, 12), rand(n, dtype, 13)
    out = torch.full((n,), float("nan"), dtype=dtype, device=DEVICE)
    y = dp2a_gemv.int4_gemv_dp2a(x, qweight, scales, zeros, group, bias=bias, residual=residual, out=out, config=cfg)
    assert y.data_ptr() == out.data_ptr() and torch.isfinite(out).all(), "some outputs were never written"
    ref = dp2a_gemv.int4_gemv_dp2a_reference(x, qweight, scales, zeros, group, bias=bias, residual=residual)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("k, group", [(192, 32), (1024, 128)])
def test_computes_what_w4a16_computes(k, group):
    """Against the W4A16 reference on the unrounded x: the int16 codes cost ~1e-5, far below int8's ~6e-3."""
    n = 24
    qweight, scales, zeros = random_int4(n, k, group, seed=k, device=DEVICE)
    x = rand(k, torch.float16, seed=k + 1, scale=2.0)
    x[7] = 40.0
    ref16 = dp2a_gemv.int4_gemv_dp2a_reference(x, qweight, scales, zeros, group).double()
    w4a16 = gemv.int4_gemv_reference(x, qweight, scales, zeros, group).double()
    # x itself through the codes: within 2^-16 of each group's largest element
    codes, code_scales = dp2a_gemv.int16_codes(x, group)
    assert rel_err((codes * code_scales[:, None]).view(-1), x) < 1e-4
    assert rel_err(ref16, w4a16) < 2e-3  # the fp16 output rounding of either
    y = dp2a_gemv.int4_gemv_dp2a(x, qweight, scales, zeros, group)
    assert rel_err(y, w4a16) < TOL[torch.float16]
    int8 = gemv.int4_gemv_w4a8_reference(x, qweight, scales, zeros, group)
    assert rel_err(y, w4a16) < rel_err(int8, w4a16) / 3, "int16 codes must beat int8 codes by far"


def test_extreme_codes_and_zero_points():
    """Codes 0 and 15, x at the code range's ends: the int32 sums must not wrap."""
    n, k, group = 8, 256, 128
    q = torch.full((n, k), 15, dtype=torch.int64)
    q[1::2] = 0
    from ffchat.quantize.layout import pack_int4

    qweight = pack_int4(q).to(DEVICE)
    scales = torch.full((n, k // group), 0.01, dtype=torch.float16, device=DEVICE)
    zeros = torch.full((n, k // group), 7.5, dtype=torch.float16, device=DEVICE)
    x = torch.where(torch.arange(k) % 2 == 0, 1000.0, -999.0).to(DEVICE, torch.float16)
    y = dp2a_gemv.int4_gemv_dp2a(x, qweight, scales, zeros, group)
    ref = gemv.int4_gemv_reference(x, qweight, scales, zeros, group)
    assert rel_err(y, ref) < 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg", [None, gemv.GemvConfig(block_n=4, block_k=64, num_warps=4, split_k=3)],
                         ids=["table", "bn4-s3"])
def test_norm_and_gated(cfg, dtype):
    """[gate; up] rows, the RMSNorm before the codes, SwiGLU in the epilogue; 20 outputs: a partial block."""
    i_out, k, group = 20, 192, 64
    qweight, scales, zeros = random_int4(2 * i_out, k, group, seed=41, device=DEVICE)
    x = rand(k, dtype, 42, scale=3.0) + 0.5
    norm_weight = (torch.rand(k, generator=torch.Generator().manual_seed(43)) + 0.5).to(DEVICE, dtype)
    bias = rand(2 * i_out, dtype, 44)
    out = torch.full((i_out,), float("nan"), dtype=dtype, device=DEVICE)
    dp2a_gemv.int4_gemv_dp2a(x, qweight, scales, zeros, group, bias=bias, out=out, config=cfg,
                             norm_weight=norm_weight, gated=True)
    ref = dp2a_gemv.int4_gemv_dp2a_reference(x, qweight, scales, zeros, group, bias=bias, norm_weight=norm_weight,
                                             gated=True)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype]
    plain = dp2a_gemv.int4_gemv_dp2a_reference(x, qweight, scales, zeros, group, bias=bias, gated=True)
    assert rel_err(out, plain) > 10 * TOL[dtype], "the norm must matter for this x"


ROW_LOOP_CASES = {
    # (outputs, K, group, gated, norm, block_n): ragged last block, K short of the tile (576 of 1024), gated tiles
    # (down to 2 outputs, 4 rows, as ``ffchat tune`` tries for an 8B gate/up)
    "plain": (52, 576, 64, False, False, 8),
    "norm-gated": (44, 192, 64, True, True, 8),
    "norm-gated-4-rows": (21, 192, 64, True, True, 2),
}


@pytest.mark.parametrize("case", ROW_LOOP_CASES)
def test_programs_looping_over_row_blocks_write_what_a_program_a_block_writes(case):
    """``programs_per_sm``: 3 programs (one SM here) take every third of the row blocks, x coded once each."""
    n, k, group, gated, norm, block_n = ROW_LOOP_CASES[case]
    qweight, scales, zeros = random_int4(2 * n if gated else n, k, group, seed=61, device=DEVICE)
    x = rand(k, torch.bfloat16, 62, scale=2.0)
    extra = {"bias": rand(2 * n if gated else n, torch.bfloat16, 63), "gated": gated}
    if norm:
        extra["norm_weight"] = (torch.rand(k, generator=torch.Generator().manual_seed(64)) + 0.5).to(DEVICE,
                                                                                                       torch.bfloat16)
    else:
        extra["residual"] = rand(n, torch.bfloat16, 65)
    block_k = 1 << (k - 1).bit_length()
    per_block = dp2a_gemv.int4_gemv_dp2a(x, qweight, scales, zeros, group,
                                         config=gemv.GemvConfig(block_n, block_k, 4), **extra)
    out = torch.full((n,), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    looped = dp2a_gemv.int4_gemv_dp2a(x, qweight, scales, zeros, group, out=out,
                                      config=gemv.GemvConfig(block_n, block_k, 4, programs_per_sm=3), **extra)
    assert torch.isfinite(out).all(), "some row blocks were never written"
    assert torch.equal(looped, per_block)
    ref = dp2a_gemv.int4_gemv_dp2a_reference(x, qweight, scales, zeros, group, **extra)
    assert rel_err(looped, ref) < TOL[torch.bfloat16]


def test_row_loops_need_all_of_k_in_one_tile_and_the_dp2a_kernel():
    qweight, scales, zeros = random_int4(8, 256, 32, seed=3, device=DEVICE)
    x = rand(256, torch.float16, 4)
    with pytest.raises(ValueError, match="all of K=256 in one tile"):
        dp2a_gemv.int4_gemv_dp2a(x, qweight, scales, zeros, 32, config=gemv.GemvConfig(8, 128, 4, programs_per_sm=2))
    with pytest.raises(ValueError, match="programs_per_sm is a dp2a option"):
        gemv.int4_gemv(x, qweight, scales, zeros, 32, config=gemv.GemvConfig(8, 256, 4, programs_per_sm=2))


def test_rejects_bad_inputs():
    qweight, scales, zeros = random_int4(8, 64, 32, seed=1, device=DEVICE)
    with pytest.raises(ValueError, match="x has 48 elements"):
        dp2a_gemv.int4_gemv_dp2a(rand(48, torch.float16, 1), qweight, scales, zeros, 32)
    with pytest.raises(ValueError, match="prefetch"):
        dp2a_gemv.int4_gemv_dp2a(rand(64, torch.float16, 2), qweight, scales, zeros, 32,
                                 config=gemv.GemvConfig(8, 64, 4, prefetch=True))
