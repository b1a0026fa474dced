"""The INT4 GEMV kernel against its torch reference (Triton interpreter on CPU, compiled where CUDA exists).

Triton decides interpret-or-compile when a kernel module is imported, so the flag is set
before ``ffchat.kernels.int4_gemv`` is imported (tests/conftest.py should do the same, so
that no other module can import the kernel first).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ffchat.kernels import int4_gemv as gemv  # noqa: E402
from ffchat.quantize.layout import pack_int4  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}  # output rounding: fp16 ~5e-4, bf16 ~4e-3


def make_weights(n: int, k: int, group: int, seed: int):
    """Fresh random codes, scales and fractional zeros in the version-1 layout."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=gen)
    scales = (torch.rand(n, k // group, generator=gen) * 0.02 + 0.002).half()
    zeros = (torch.rand(n, k // group, generator=gen) * 15).half()
    return pack_int4(q).to(DEVICE), scales.to(DEVICE), zeros.to(DEVICE)


def rand(shape, dtype, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def test_interpreter_is_active_without_cuda():
    if DEVICE == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1"
        assert "Interpreted" in type(gemv._int4_gemv_kernel).__name__, "kernel module was imported before the flag"


@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("k", [64, 192, 576])
@pytest.mark.parametrize("n", [8, 24, 40])
def test_matches_reference(n, k, group):
    qweight, scales, zeros = make_weights(n, k, group, seed=n * 1000 + k + group)
    x = rand(k, torch.float16, seed=k)
    out = torch.full((n,), float("nan"), dtype=torch.float16, device=DEVICE)
    y = gemv.int4_gemv(x, qweight, scales, zeros, group, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert torch.isfinite(y).all(), "some outputs were never written"
    ref = gemv.int4_gemv_reference(x, qweight, scales, zeros, group)
    assert rel_err(y, ref) < TOL[torch.float16]


# Configs that force masked rows, masked K tails, chunks wholly past K, and split-K.
FORCED = [
    gemv.GemvConfig(block_n=16, block_k=128, num_warps=4, split_k=3),  # 40 rows: partial row block
    gemv.GemvConfig(block_n=8, block_k=64, num_warps=2, split_k=4),
    gemv.GemvConfig(block_n=32, block_k=256, num_warps=4, split_k=2),  # K=576: 3 chunks over 2 slices
    gemv.GemvConfig(block_n=4, block_k=1024, num_warps=4),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg", FORCED, ids=lambda c: f"bn{c.block_n}-bk{c.block_k}-s{c.split_k}")
def test_configs_with_bias_and_residual(cfg, dtype):
    n, k, group = 40, 576, 64
    qweight, scales, zeros = make_weights(n, k, group, seed=cfg.block_k + cfg.split_k)
    x, bias, residual = rand(k, dtype, 1), rand(n, dtype, 2), rand(n, dtype, 3) * 4
    out = torch.full((n,), float("nan"), dtype=dtype, device=DEVICE)
    gemv.int4_gemv(x, qweight, scales, zeros, group, bias=bias, residual=residual, out=out, config=cfg)
    ref = gemv.int4_gemv_reference(x, qweight, scales, zeros, group, bias=bias, residual=residual)
    assert torch.isfinite(out).all()
    assert out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


def test_bias_and_residual_each_alone():
    n, k, group = 24, 192, 32
    qweight, scales, zeros = make_weights(n, k, group, seed=7)
    x, bias, residual = rand(k, torch.float16, 4), rand(n, torch.float16, 5), rand(n, torch.float16, 6)
    for extra in ({"bias": bias}, {"residual": residual}):
        y = gemv.int4_gemv(x, qweight, scales, zeros, group, **extra)
        ref = gemv.int4_gemv_reference(x, qweight, scales, zeros, group, **extra)
        assert rel_err(y, ref) < TOL[torch.float16]


def test_split_k_is_deterministic_and_reusable():
    """The arrival counters must be left at zero: a second launch gives bit-identical output."""
    n, k, group = 24, 576, 64
    cfg = gemv.GemvConfig(block_n=8, block_k=64, num_warps=4, split_k=5)
    qweight, scales, zeros = make_weights(n, k, group, seed=11)
    x = rand(k, torch.float16, 8)
    first = gemv.int4_gemv(x, qweight, scales, zeros, group, config=cfg)
    second = gemv.int4_gemv(x, qweight, scales, zeros, group, config=cfg)
    assert torch.equal(first, second)
    assert rel_err(first, gemv.int4_gemv_reference(x, qweight, scales, zeros, group)) < TOL[torch.float16]


def test_extreme_codes_and_zero_points():
    """All-0 and all-15 codes with zero points at both ends: the nibble decode must be exact."""
    n, k, group = 8, 64, 32
    q = torch.cat([torch.zeros(n // 2, k, dtype=torch.long), torch.full((n // 2, k), 15)])
    qweight = pack_int4(q).to(DEVICE)
    scales = torch.full((n, k // group), 0.01, dtype=torch.float16, device=DEVICE)
    zeros = torch.tensor([0.0, 15.0], dtype=torch.float16, device=DEVICE).repeat(n, 1)
    x = rand(k, torch.float16, 9)
    y = gemv.int4_gemv(x, qweight, scales, zeros, group)
    assert rel_err(y, gemv.int4_gemv_reference(x, qweight, scales, zeros, group)) < TOL[torch.float16]


def test_pick_config_never_exceeds_the_problem():
    cfg = gemv.pick_config(24, 192, 64)
    assert cfg.block_k == 256 and cfg.block_n <= 32 and cfg.split_k == 1
    assert gemv.pick_config(8, 64, 64).block_k == 64
    big = gemv.pick_config(128256, 2048, 128)
    assert big.block_k <= 2048 and big.block_k % 128 == 0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"group": 48}, "group size"),
        ({"x_len": 65}, "K=64"),
        ({"scales_shape": (8, 3)}, "scales"),
        ({"x_dtype": torch.float32}, "fp16/bf16"),
    ],
)
def test_rejects_bad_inputs(change, message):
    n, k = 8, 64
    group = change.get("group", 32)
    qweight, scales, zeros = make_weights(n, k, 32, seed=3)
    if "scales_shape" in change:
        scales = torch.ones(change["scales_shape"], dtype=torch.float16, device=DEVICE)
    x = rand(change.get("x_len", k), change.get("x_dtype", torch.float16), 1)
    with pytest.raises(ValueError, match=message):
        gemv.int4_gemv(x, qweight, scales, zeros, group)


# --- W4A8 (opt-in): int8 activations per group, dp4a products ---


@pytest.mark.parametrize("k, group", [(64, 32), (576, 64), (192, 64)])
def test_quantize_activation_matches_reference(k, group):
    x = rand(k, torch.bfloat16, seed=k) * 3
    act = gemv.quantize_activation(x, group)
    ref = gemv.quantize_activation_reference(x, group)
    assert act.codes.dtype == torch.int8 and act.dtype == torch.bfloat16
    assert (act.codes.int() - ref.codes.int()).abs().max() <= 1  # a tie may round differently on a GPU
    assert torch.allclose(act.scales, ref.scales, rtol=1e-6)
    assert torch.allclose(act.sums, act.codes.float().view(-1, group).sum(dim=1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg", [None] + FORCED[:3], ids=lambda c: "table" if c is None else f"bn{c.block_n}-s{c.split_k}")
def test_w4a8_matches_its_reference(cfg, dtype):
    n, k, group = 40, 576, 64
    qweight, scales, zeros = make_weights(n, k, group, seed=21)
    x, bias, residual = rand(k, dtype, 11), rand(n, dtype, 12), rand(n, dtype, 13)
    out = torch.full((n,), float("nan"), dtype=dtype, device=DEVICE)
    gemv.int4_gemv_w4a8(x, qweight, scales, zeros, group, bias=bias, residual=residual, out=out, config=cfg)
    ref = gemv.int4_gemv_w4a8_reference(x, qweight, scales, zeros, group, bias=bias, residual=residual)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype]


def test_w4a8_reuses_a_quantized_activation_and_stays_near_w4a16():
    n, k, group = 24, 192, 32
    qweight, scales, zeros = make_weights(n, k, group, seed=31)
    x = rand(k, torch.float16, 14)
    act = gemv.quantize_activation(x, group)
    y = gemv.int4_gemv_w4a8(x, qweight, scales, zeros, group, act=act)
    assert rel_err(y, gemv.int4_gemv_w4a8_reference(x, qweight, scales, zeros, group)) < TOL[torch.float16]
    assert rel_err(y, gemv.int4_gemv_reference(x, qweight, scales, zeros, group)) < 2e-2  # the int8 price
