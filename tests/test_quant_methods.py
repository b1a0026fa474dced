"""RTN and wmse: RTN's error bound, wmse beating RTN (plain and activation-weighted error), chunking."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import ffchat.quantize.methods as methods
from ffchat.config import ModelConfig
from ffchat.errors import FfchatError
from ffchat.quantize.artifact import LINEAR_WEIGHT
from ffchat.quantize.calibrate import input_importance
from ffchat.quantize.layout import choose_group_size, dequantize, pack_int4, unpack_int4
from ffchat.quantize.rtn import quantize_rtn
from ffchat.quantize.wmse import quantize_wmse


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


def weighted_group_errors(w: torch.Tensor, result, group_size: int, importance: torch.Tensor) -> torch.Tensor:
    """sum_k a_k (W - W_q)**2 per (row, group): what wmse minimises."""
    error = (reconstruction(w, result, group_size) - w.float()).square() * importance
    return error.view(w.shape[0], -1, group_size).sum(-1)


def tiny_linears(tiny_model_dir, family: str) -> dict[str, torch.Tensor]:
    state = load_file(tiny_model_dir(family) / "model.safetensors")
    return {k: v for k, v in state.items() if LINEAR_WEIGHT.match(k)}


def test_wmse_beats_rtn_on_every_linear_of_a_tiny_model(tiny_model_dir):
    """Without activation statistics wmse minimises the plain squared error: lower than RTN's everywhere."""
    for family in ("llama", "llama-tied"):
        linears = tiny_linears(tiny_model_dir, family)
        assert len(linears) >= 14
        for name, w in linears.items():
            group_size = choose_group_size(w.shape[1])
            rtn, wmse = frobenius_error(w, quantize_rtn, group_size), frobenius_error(w, quantize_wmse, group_size)
            assert wmse < 0.97 * rtn, (family, name, group_size, wmse / rtn)


def test_wmse_with_calibration_beats_rtn_in_output_error(tiny_model_dir):
    """With the tiny model's own activation statistics, every linear's weighted error beats RTN's."""
    state = load_file(tiny_model_dir("llama") / "model.safetensors")
    config = ModelConfig.from_file(tiny_model_dir("llama") / "config.json")
    linears = {k[: -len(".weight")]: v for k, v in state.items() if LINEAR_WEIGHT.match(k)}
    importance = input_importance(config, state, list(linears), sequences=2, length=64)
    for name, w in linears.items():
        g = choose_group_size(w.shape[1])
        a = importance[name]
        rtn = weighted_group_errors(w, quantize_rtn(w, g), g, a).sum()
        wmse = weighted_group_errors(w, quantize_wmse(w, g, a), g, a).sum()
        assert wmse < 0.95 * rtn, (name, (wmse / rtn).item())


@pytest.mark.parametrize("group_size", [128, 64, 32])
def test_wmse_beats_rtn_on_gaussian_weights_with_outliers(group_size):
    w = gaussian_with_outliers(64, 512, seed=group_size)
    assert frobenius_error(w, quantize_wmse, group_size) < 0.97 * frobenius_error(w, quantize_rtn, group_size)


def test_wmse_is_never_worse_than_rtn_in_any_group():
    w = gaussian_with_outliers(32, 256, seed=5)
    importance = torch.rand(256, generator=torch.Generator().manual_seed(5)) ** 4 * 100
    rtn = weighted_group_errors(w, quantize_rtn(w, 64), 64, importance)
    wmse = weighted_group_errors(w, quantize_wmse(w, 64, importance), 64, importance)
    assert bool((wmse <= rtn * (1 + 1e-5)).all())


def test_an_important_input_is_reproduced_more_closely():
    """Weighting one input channel 1000x makes wmse trade the other channels' error for it."""
    w = gaussian_with_outliers(256, 128, seed=9)
    importance = torch.ones(128)
    importance[5] = 1000.0
    plain = (reconstruction(w, quantize_wmse(w, 32), 32) - w)[:, 5].abs().mean()
    weighted = (reconstruction(w, quantize_wmse(w, 32, importance), 32) - w)[:, 5].abs().mean()
    assert weighted < 0.1 * plain


def test_wmse_stores_fp16_exact_values_and_is_deterministic():
    w = gaussian_with_outliers(16, 256, seed=6)
    w[0, :64] = 0.0  # an all-zero group
    w[1, :64] = 0.3  # a constant group
    importance = torch.rand(256, generator=torch.Generator().manual_seed(6))
    importance[:64] = 0.0  # inputs the calibration never saw
    first, second = quantize_wmse(w, 64, importance), quantize_wmse(w, 64, importance)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    q, scales, zeros = first
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    assert bool(torch.isfinite(scales).all() and torch.isfinite(zeros).all() and (scales > 0).all())
    error = (reconstruction(w, first, 64) - w).abs()
    assert error[0, :64].max().item() == 0.0 and error[1, :64].max().item() < 1e-3 * 0.3


def test_quantize_linear_packs_and_is_independent_of_the_chunking(monkeypatch):
    w = gaussian_with_outliers(37, 192, seed=7).to(torch.bfloat16)
    importance = torch.rand(192, generator=torch.Generator().manual_seed(7))
    whole = methods.quantize_linear(w, 64, method="wmse", importance=importance)
    monkeypatch.setitem(methods.CHUNK_ELEMENTS, "cpu", 5 * 192)  # 5-row chunks, the last one short
    chunked = methods.quantize_linear(w, 64, method="wmse", importance=importance)
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked))
    qweight, scales, zeros = whole
    assert qweight.dtype == torch.int32 and qweight.shape == (37, 24)
    assert scales.shape == zeros.shape == (37, 3)
    q, s, z = quantize_wmse(w, 64, importance)
    assert torch.equal(unpack_int4(qweight), q) and torch.equal(scales, s) and torch.equal(zeros, z)
    # rtn takes no statistics: they are not passed to it
    assert all(torch.equal(a, b) for a, b in zip(methods.quantize_linear(w, 64, method="rtn", importance=importance),
                                                  methods.quantize_linear(w, 64, method="rtn")))


def test_methods_registry():
    assert methods.DEFAULT_METHOD == "wmse" and set(methods.METHODS) == {"rtn", "wmse"}
    assert methods.CALIBRATED == {"wmse"}
    with pytest.raises(FfchatError, match="unknown quantization method 'gptq'"):
        methods.get_method("gptq")


@pytest.mark.gpu
def test_gpu_quantization_matches_cpu():
    """Quantizing on the GPU (the default there) must give the CPU's quality: RTN exactly, wmse within 0.1%."""
    w = gaussian_with_outliers(300, 1024, seed=8).to(torch.bfloat16)
    importance = torch.rand(1024, generator=torch.Generator().manual_seed(8))
    for method in ("rtn", "wmse"):
        cpu = methods.quantize_linear(w, 128, method=method, device="cpu", importance=importance)
        gpu = methods.quantize_linear(w, 128, method=method, device="cuda", importance=importance)
        assert all(t.device.type == "cpu" for t in gpu)
        errors = [(dequantize(*parts, 128) - w.float()).norm().item() for parts in (cpu, gpu)]
        if method == "rtn":
            assert all(torch.equal(a, b) for a, b in zip(cpu, gpu))
        assert errors[1] == pytest.approx(errors[0], rel=1e-3)
