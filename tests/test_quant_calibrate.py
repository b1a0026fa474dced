"""Activation statistics for wmse: what every INT4 linear's input looks like on random tokens."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from ffchat.config import ModelConfig
from ffchat.errors import FfchatError
from ffchat.model import Transformer, rms_norm
from ffchat.quantize.artifact import int4_targets
from ffchat.quantize.calibrate import calibration_tokens, input_importance


def tiny(tiny_model_dir, family: str):
    directory = tiny_model_dir(family)
    return ModelConfig.from_file(directory / "config.json"), load_file(directory / "model.safetensors")


@pytest.mark.parametrize("family", ["llama", "llama-tied", "qwen2"])
def test_every_int4_target_gets_a_positive_statistic_per_input(tiny_model_dir, family):
    config, state = tiny(tiny_model_dir, family)
    names = list(int4_targets(state))
    importance = input_importance(config, state, names, sequences=2, length=32)
    assert set(importance) == set(names)
    for name in names:
        weight = state.get(f"{name}.weight", state["model.embed_tokens.weight"])
        stat = importance[name]
        assert stat.shape == (weight.shape[1],) and stat.dtype == torch.float32, name
        assert bool(torch.isfinite(stat).all() and (stat > 0).all()), name


def test_first_layer_statistics_match_the_normed_embeddings(tiny_model_dir):
    """q/k/v of layer 0 read rms_norm(embedding): computed here without the engine, the means must agree."""
    config, state = tiny(tiny_model_dir, "llama")
    names = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    importance = input_importance(config, state, names, sequences=3, length=16, seed=4)
    tokens = torch.cat(calibration_tokens(config, 3, 16, 4))
    x = rms_norm(state["model.embed_tokens.weight"][tokens].float(), state["model.layers.0.input_layernorm.weight"].float(),
                 config.rms_norm_eps)
    expected = x.square().mean(dim=0)
    for name in names:
        torch.testing.assert_close(importance[name], expected, rtol=1e-5, atol=1e-7)


def test_calibration_tokens_are_seeded_and_open_with_bos(tiny_model_dir):
    config, _ = tiny(tiny_model_dir, "llama")
    first, again = calibration_tokens(config, 2, 8, 0), calibration_tokens(config, 2, 8, 0)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])
    assert all(int(t.max()) < config.vocab_size for t in first)
    if config.bos_token_id is not None:
        assert all(int(t[0]) == config.bos_token_id for t in first)


def test_an_input_the_engine_does_not_pass_through_f_linear_is_an_error(tiny_model_dir, monkeypatch):
    """If the engine stopped calling F.linear for a weight, its statistics would be missing: refuse, never guess."""
    config, state = tiny(tiny_model_dir, "llama")

    def mlp_by_matmul(layer, x):
        gate = torch.nn.functional.silu(x @ layer.w_gate.T)
        return (gate * (x @ layer.w_up.T)) @ layer.w_down.T

    monkeypatch.setattr(Transformer, "_mlp", staticmethod(mlp_by_matmul))
    with pytest.raises(FfchatError, match="never saw the input of model.layers.0.mlp"):
        input_importance(config, state, list(int4_targets(state)), sequences=1, length=8)
