"""RTN and HQQ: RTN's error bound, HQQ beating RTN on real-shaped and adversarial weights, chunking."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import ffchat.quantize.methods as methods
from ffchat.errors import FfchatError
from ffchat.quantize.artifact import LINEAR_WEIGHT
from ffchat.quantize.hqq import quantize_hqq
from ffchat.quantize.layout import choose_group_size, dequantize, pack_int4, unpack_int4
from ffchat.quantize.rtn import quantize_rtn


def reconstruction(w: torch.Tensor, result, group_size: int) -> torch.Tensor:
    q, scales, zeros = result
    return dequantize(pack_int4(q), scales, zeros, group_size)


def frobenius_error(w: torch.Tensor, method, group_size: int) -> float:
    return (reconstruction(w, method(w, group_size), group_size) - w.float()).norm().item()


def gaussian_with_outliers(n: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.02
    outliers = torch.rand(n, k, generator=gen) < 0.003
    return torch.where(outliers, w * 12, w)


def test_rtn_error_is_at_most_half_a_step():
    w = gaussian_with_outliers(16, 256, seed=1)
    w[0, :32] = 0.0  # an all-zero group
    w[1, :32] = 0.3  # a constant group
    w[2, :32] = torch.linspace(1.0, 1.01, 32)  # narrow range far from zero
    q, scales, zeros = quantize_rtn(w, 32)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    assert scales.dtype == zeros.dtype == torch.float16 and scales.shape == (16, 8)
    error = (reconstruction(w, (q, scales, zeros), 32) - w).abs()
    half_step = scales.float().repeat_interleave(32, dim=1) / 2
    assert bool((error <= half_step * 1.0001 + 1e-7).all())
    assert error[0, :32].max().item() == 0.0
    assert error[1, :32].max().item() < 1e-3 * 0.3


def test_hqq_beats_rtn_on_every_linear_of_a_tiny_model(tiny_model_dir):
    for family in ("llama", "llama-tied"):
        state = load_file(tiny_model_dir(family) / "model.safetensors")
        linears = {k: v for k, v in state.items() if LINEAR_WEIGHT.match(k)}
        assert len(linears) >= 14
        for name, w in linears.items():
            group_size = choose_group_size(w.shape[1])
            rtn, hqq = frobenius_error(w, quantize_rtn, group_size), frobenius_error(w, quantize_hqq, group_size)
            assert hqq < 0.995 * rtn, (family, name, group_size, hqq / rtn)


@pytest.mark.parametrize("group_size", [128, 64, 32])
def test_hqq_beats_rtn_on_gaussian_weights_with_outliers(group_size):
    w = gaussian_with_outliers(64, 512, seed=group_size)
    assert frobenius_error(w, quantize_hqq, group_size) < 0.99 * frobenius_error(w, quantize_rtn, group_size)


def test_hqq_is_never_worse_than_rtn_in_any_group():
    w = gaussian_with_outliers(32, 256, seed=5)
    per_group = []
    for method in (quantize_rtn, quantize_hqq):
        error = reconstruction(w, method(w, 64), 64) - w
        per_group.append(error.view(32, 4, 64).square().sum(-1))
    assert bool((per_group[1] <= per_group[0] * (1 + 1e-5)).all())


def test_hqq_keeps_minmax_scales_and_is_deterministic():
    w = gaussian_with_outliers(16, 256, seed=6)
    first, second = quantize_hqq(w, 128), quantize_hqq(w, 128)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert torch.equal(first[1], quantize_rtn(w, 128)[1])


def test_quantize_linear_packs_and_is_independent_of_the_chunking(monkeypatch):
    w = gaussian_with_outliers(37, 192, seed=7).to(torch.bfloat16)
    whole = methods.quantize_linear(w, 64, method="hqq")
    monkeypatch.setitem(methods.CHUNK_ELEMENTS, "cpu", 5 * 192)  # 5-row chunks, the last one short
    chunked = methods.quantize_linear(w, 64, method="hqq")
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked))
    qweight, scales, zeros = whole
    assert qweight.dtype == torch.int32 and qweight.shape == (37, 24)
    assert scales.shape == zeros.shape == (37, 3)
    q, s, z = quantize_hqq(w, 64)
    assert torch.equal(unpack_int4(qweight), q) and torch.equal(scales, s) and torch.equal(zeros, z)


def test_methods_registry():
    assert methods.DEFAULT_METHOD == "hqq" and set(methods.METHODS) == {"rtn", "hqq"}
    with pytest.raises(FfchatError, match="unknown quantization method 'gptq'"):
        methods.get_method("gptq")


@pytest.mark.gpu
def test_gpu_quantization_matches_cpu():
    """Quantizing on the GPU (the default there) must give the CPU's quality: RTN exactly, HQQ within 0.1%."""
    w = gaussian_with_outliers(300, 1024, seed=8).to(torch.bfloat16)
    for method in ("rtn", "hqq"):
        cpu = methods.quantize_linear(w, 128, method=method, device="cpu")
        gpu = methods.quantize_linear(w, 128, method=method, device="cuda")
        assert all(t.device.type == "cpu" for t in gpu)
        errors = [(dequantize(*parts, 128) - w.float()).norm().item() for parts in (cpu, gpu)]
        if method == "rtn":
            assert all(torch.equal(a, b) for a, b in zip(cpu, gpu))
        assert errors[1] == pytest.approx(errors[0], rel=1e-3)
