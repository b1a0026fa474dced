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

from kernel_helpers import random_int4, rel_err  # noqa: E402

from ffchat.kernels import int4_gemv as gemv  # noqa: E402
from ffchat.kernels.interpreter import interpreted  # noqa: E402
from ffchat.quantize.layout import dequantize, pack_int4  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}  # output rounding: fp16 ~5e-4, bf16 ~4e-3


def make_weights(n: int, k: int, group: int, seed: int):
    return random_int4(n, k, group, seed, DEVICE)


def rand(shape, dtype, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def test_interpreter_is_active_without_cuda():
    if DEVICE == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1"
        assert interpreted(gemv._int4_gemv_kernel), "kernel module was imported before the flag"


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
    gemv.GemvConfig(block_n=8, block_k=64, num_warps=4, split_k=3, prefetch=True),  # K=576: 9 chunks, 3 per slice
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


def test_a_float32_out_gets_the_sums_unrounded():
    """The LM head writes its fp32 logits itself: the same result as the activation-dtype output, less its rounding."""
    n, k, group = 24, 192, 32
    qweight, scales, zeros = make_weights(n, k, group, seed=9)
    x, residual = rand(k, torch.bfloat16, 10), rand(n, torch.bfloat16, 11)
    want = dequantize(qweight, scales, zeros, group).float() @ x.float() + residual.float()
    out = torch.full((n,), float("nan"), dtype=torch.float32, device=DEVICE)
    for config in (None, gemv.GemvConfig(block_n=8, block_k=64, num_warps=4, split_k=3)):
        got = gemv.int4_gemv(x, qweight, scales, zeros, group, residual=residual, out=out, config=config)
        assert got is out and got.dtype == torch.float32
        assert rel_err(got, want) < 1e-5  # bf16 output rounding alone is ~4e-3
    with pytest.raises(ValueError, match="float32"):
        gemv.int4_gemv(x, qweight, scales, zeros, group, out=torch.empty(n, dtype=torch.float16, device=DEVICE))


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


@pytest.mark.parametrize("k, group", [(64, 32), (576, 64)])
def test_quantize_activation_with_norm(k, group):
    """The quantizing launch can run the RMSNorm first: the same codes as quantizing ffchat.model.rms_norm(x).

    fp16, because the interpreter truncates where a GPU rounds to bf16 (see truncating_bf16_reference).
    """
    x = rand(k, torch.float16, seed=k + 1) * 3 + 0.5
    norm_weight = (torch.rand(k, generator=torch.Generator().manual_seed(k)) + 0.5).to(DEVICE, torch.float16)
    act = gemv.quantize_activation(x, group, norm_weight=norm_weight, norm_eps=1e-5)
    ref = gemv.quantize_activation_reference(x, group, norm_weight=norm_weight, norm_eps=1e-5)
    plain = gemv.quantize_activation_reference(x, group)
    assert (act.codes.int() - ref.codes.int()).abs().max() <= 1
    assert torch.allclose(act.scales, ref.scales, rtol=1e-5)
    assert not torch.allclose(ref.scales, plain.scales), "the norm must change the scales of this x"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg", [None, gemv.GemvConfig(block_n=4, block_k=64, num_warps=4, split_k=3)],
                         ids=["table", "bn4-s3"])
def test_w4a8_norm_and_gated(cfg, dtype):
    """[gate; up] rows, norm in the quantizing launch, SwiGLU in the epilogue; 20 outputs, so the last block is partial."""
    i_out, k, group = 20, 192, 64
    qweight, scales, zeros = make_weights(2 * i_out, k, group, seed=41)
    x, norm_weight = norm_inputs(k, dtype, 42)
    bias = rand(2 * i_out, dtype, 43)
    out = torch.full((i_out,), float("nan"), dtype=dtype, device=DEVICE)
    gemv.int4_gemv_w4a8(x, qweight, scales, zeros, group, bias=bias, out=out, config=cfg, norm_weight=norm_weight,
                        gated=True)
    ref = gemv.int4_gemv_w4a8_reference(x, qweight, scales, zeros, group, bias=bias, norm_weight=norm_weight, gated=True)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype]
    w4a16 = gemv.int4_gemv_reference(x, qweight, scales, zeros, group, bias=bias, norm_weight=norm_weight, gated=True)
    assert rel_err(out, w4a16) < 5e-2  # the int8 price, not a wrong operand


# --- Fusions (W4A16): input RMSNorm (norm_weight) and SwiGLU (gated: [gate; up] rows) ---


def norm_inputs(k: int, dtype, seed: int):
    """x far from unit RMS (so a missing norm shows) and a norm weight around 1."""
    x = rand(k, dtype, seed) * 3 + 0.5
    norm_weight = (torch.rand(k, generator=torch.Generator().manual_seed(seed + 1)) + 0.5).to(DEVICE, dtype)
    return x, norm_weight


@pytest.mark.parametrize("n, k, group", [(6, 64, 16), (6, 96, 32), (5, 160, 32)])
def test_norm_matches_reference(n, k, group):
    qweight, scales, zeros = make_weights(n, k, group, seed=100 + k + group)
    x, norm_weight = norm_inputs(k, torch.float16, seed=k)
    out = torch.full((n,), float("nan"), dtype=torch.float16, device=DEVICE)
    y = gemv.int4_gemv(x, qweight, scales, zeros, group, norm_weight=norm_weight, out=out)
    assert y.data_ptr() == out.data_ptr() and torch.isfinite(y).all()
    ref = gemv.int4_gemv_reference(x, qweight, scales, zeros, group, norm_weight=norm_weight)
    assert rel_err(y, ref) < TOL[torch.float16]
    # The same as normalizing first (ffchat.model.rms_norm), and clearly not the un-normalized product.
    normed = gemv.rms_norm(x, norm_weight, 1e-6)
    assert rel_err(y, gemv.int4_gemv_reference(normed, qweight, scales, zeros, group)) < TOL[torch.float16]
    assert rel_err(y, gemv.int4_gemv_reference(x, qweight, scales, zeros, group)) > 0.1


def test_norm_eps_is_used():
    """A tiny x makes eps dominate mean(x^2): a kernel ignoring norm_eps would be far off."""
    n, k, group = 6, 64, 32
    qweight, scales, zeros = make_weights(n, k, group, seed=5)
    x, norm_weight = norm_inputs(k, torch.float16, seed=6)
    x = x * 0.01
    y = gemv.int4_gemv(x, qweight, scales, zeros, group, norm_weight=norm_weight, norm_eps=1e-2)
    ref = gemv.int4_gemv_reference(x, qweight, scales, zeros, group, norm_weight=norm_weight, norm_eps=1e-2)
    assert rel_err(y, ref) < TOL[torch.float16]
    default_eps = gemv.int4_gemv_reference(x, qweight, scales, zeros, group, norm_weight=norm_weight)
    assert rel_err(ref, default_eps) > 0.5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("i, k, group", [(5, 64, 16), (5, 160, 32)])
def test_gated_matches_reference(i, k, group, with_bias, dtype):
    qweight, scales, zeros = make_weights(2 * i, k, group, seed=200 + k + group)
    x = rand(k, dtype, seed=k + 1) * 4
    bias = rand(2 * i, dtype, seed=3) if with_bias else None
    out = torch.full((i,), float("nan"), dtype=dtype, device=DEVICE)
    y = gemv.int4_gemv(x, qweight, scales, zeros, group, bias=bias, gated=True, out=out)
    assert y.shape == (i,) and y.dtype == dtype and torch.isfinite(y).all()
    ref = gemv.int4_gemv_reference(x, qweight, scales, zeros, group, bias=bias, gated=True)
    assert rel_err(y, ref) < TOL[dtype]
    # silu(gate) * up from the ungated kernel's two halves, as a second opinion.
    both = gemv.int4_gemv_reference(x, qweight, scales, zeros, group, bias=bias).float()
    assert rel_err(y, torch.nn.functional.silu(both[:i]) * both[i:]) < 2 * TOL[dtype]


# Forced configs on the fused paths: partial row blocks, masked K tails, chunks past K, split-K.
FUSED_FORCED = [
    gemv.GemvConfig(block_n=2, block_k=32, num_warps=2, split_k=3),  # K=160: 5 chunks over 3 slices
    gemv.GemvConfig(block_n=4, block_k=64, num_warps=4, split_k=2),  # K=160: 3 chunks, last one half past K
    gemv.GemvConfig(block_n=1, block_k=256, num_warps=4),  # one chunk wider than K
    gemv.GemvConfig(block_n=2, block_k=32, num_warps=2, prefetch=True, max_registers=128),  # K=160: 5 chunks, prefetched
]


def truncating_bf16_reference(x, qweight, scales, zeros, group, bias, norm_weight):
    """norm + gated reference with every fp32 -> bf16 rounding done as the Triton interpreter does it.

    The interpreter truncates fp32 -> bf16 casts (a GPU rounds to nearest); the kernel's two
    roundings of the normalized x then shrink it by ~2^-9 each, a systematic error the plain
    reference cannot absorb at bf16's tolerance.
    """
    def trunc(t):
        return (t.float().view(torch.int32) & -65536).view(torch.float32)

    x32 = x.float()
    normed = trunc(trunc(x32 * torch.rsqrt(x32.pow(2).mean() + 1e-6)) * norm_weight.float())
    y = dequantize(qweight, scales, zeros, group) @ normed + bias.float()
    gate, up = y.chunk(2)
    return trunc(torch.nn.functional.silu(gate) * up)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg", [None] + FUSED_FORCED, ids=lambda c: "table" if c is None else f"bn{c.block_n}-bk{c.block_k}-s{c.split_k}")
def test_norm_and_gated_together(cfg, dtype):
    """The decode layer's main use: RMSNorm + gate/up + SiLU in one launch."""
    i, k, group = 5, 160, 32
    qweight, scales, zeros = make_weights(2 * i, k, group, seed=300 + (cfg.block_k if cfg else 0))
    x, norm_weight = norm_inputs(k, dtype, seed=17)
    bias = rand(2 * i, dtype, seed=18)
    out = torch.full((i,), float("nan"), dtype=dtype, device=DEVICE)
    gemv.int4_gemv(x, qweight, scales, zeros, group, bias=bias, norm_weight=norm_weight, gated=True, out=out,
                   config=cfg)
    assert torch.isfinite(out).all()
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        ref = truncating_bf16_reference(x, qweight, scales, zeros, group, bias, norm_weight)
    else:
        ref = gemv.int4_gemv_reference(x, qweight, scales, zeros, group, bias=bias, norm_weight=norm_weight, gated=True)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("cfg", FUSED_FORCED[:2], ids=lambda c: f"bn{c.block_n}-bk{c.block_k}-s{c.split_k}")
def test_norm_with_split_k_bias_and_residual(cfg):
    n, k, group = 7, 160, 16
    qweight, scales, zeros = make_weights(n, k, group, seed=400 + cfg.split_k)
    x, norm_weight = norm_inputs(k, torch.float16, seed=19)
    bias, residual = rand(n, torch.float16, 20), rand(n, torch.float16, 21)
    first = gemv.int4_gemv(x, qweight, scales, zeros, group, bias=bias, residual=residual, norm_weight=norm_weight,
                           config=cfg)
    ref = gemv.int4_gemv_reference(x, qweight, scales, zeros, group, bias=bias, residual=residual,
                                   norm_weight=norm_weight)
    assert rel_err(first, ref) < TOL[torch.float16]
    again = gemv.int4_gemv(x, qweight, scales, zeros, group, bias=bias, residual=residual, norm_weight=norm_weight,
                           config=cfg)
    assert torch.equal(first, again), "split-K counters must be left at zero"


def test_gated_split_k_is_deterministic():
    i, k, group = 6, 96, 16
    cfg = gemv.GemvConfig(block_n=4, block_k=32, num_warps=4, split_k=3)
    qweight, scales, zeros = make_weights(2 * i, k, group, seed=23)
    x = rand(k, torch.float16, 24)
    first = gemv.int4_gemv(x, qweight, scales, zeros, group, gated=True, config=cfg)
    second = gemv.int4_gemv(x, qweight, scales, zeros, group, gated=True, config=cfg)
    assert torch.equal(first, second)
    assert rel_err(first, gemv.int4_gemv_reference(x, qweight, scales, zeros, group, gated=True)) < TOL[torch.float16]


def test_fused_inputs_are_checked():
    qweight, scales, zeros = make_weights(10, 64, 32, seed=25)
    x = rand(64, torch.float16, 26)
    residual = rand(5, torch.float16, 27)
    with pytest.raises(ValueError, match="residual"):
        gemv.int4_gemv(x, qweight, scales, zeros, 32, gated=True, residual=residual)
    with pytest.raises(ValueError, match="residual"):
        gemv.int4_gemv_reference(x, qweight, scales, zeros, 32, gated=True, residual=residual)
    odd = make_weights(5, 64, 32, seed=28)
    with pytest.raises(ValueError, match="even N"):
        gemv.int4_gemv(x, *odd, 32, gated=True)
    with pytest.raises(ValueError, match="bias"):  # gated bias covers both halves: [2I]
        gemv.int4_gemv(x, qweight, scales, zeros, 32, gated=True, bias=rand(5, torch.float16, 29))
    with pytest.raises(ValueError, match="out"):
        gemv.int4_gemv(x, qweight, scales, zeros, 32, gated=True, out=torch.empty(10, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="norm_weight"):
        gemv.int4_gemv(x, qweight, scales, zeros, 32, norm_weight=rand(32, torch.float16, 30))


def test_pick_config_for_gated_counts_outputs():
    """Gated launches are looked up by outputs I = N / 2 in their own table and never exceed I."""
    for rows, k in ((16384, 2048), (28672, 4096)):
        gated = gemv.pick_config(rows, k, 128, gated=True)
        table = next(c for n, kk, c in gemv.config_table("gemv_w4a16_gated", torch.device("cpu"))
                     if rows // 2 <= n and k <= kk)
        assert (gated.block_n, gated.num_warps, gated.prefetch) == (table.block_n, table.num_warps, table.prefetch)
    assert gemv.pick_config(10, 64, 32, gated=True).block_n <= 8  # I = 5
    assert gemv.pick_config(2, 64, 32, gated=True).block_n == 1


def test_w4a8_refuses_the_w4a16_prefetch_option():
    qweight, scales, zeros = random_int4(8, 64, 32, 3, DEVICE)
    x = torch.randn(64, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="prefetch"):
        gemv.int4_gemv_w4a8(x, qweight, scales, zeros, 32, config=gemv.GemvConfig(8, 64, 4, prefetch=True))


def test_fp32_sums_survive_cancellation():
    """Positive x with an outlier and mid-range zero points: sum((q - z) x) is small beside sum(|q x|).

    The kernel recovers sum(q x) as 16 * (T - X') from sums of x' + q x / 16, so its fp32 error
    scales with sum(|x'|); here it must stay well below fp16's own rounding (~2e-4 of the output).
    """
    n, k, group = 16, 4096, 128
    gen = torch.Generator().manual_seed(21)
    qweight = pack_int4(torch.randint(0, 16, (n, k), generator=gen)).to(DEVICE)
    scales = torch.full((n, k // group), 0.01, dtype=torch.float16, device=DEVICE)
    zeros = torch.full((n, k // group), 7.5, dtype=torch.float16, device=DEVICE)
    x = 1 + 0.1 * torch.rand(k, generator=gen)
    x[123] = 60.0
    x = x.to(DEVICE, torch.float16)
    y = gemv.int4_gemv(x, qweight, scales, zeros, group)
    exact = (dequantize(qweight, scales, zeros, group).double() @ x.double()).half()
    assert rel_err(y, exact) < 1e-4  # measured 2e-5 in the interpreter
