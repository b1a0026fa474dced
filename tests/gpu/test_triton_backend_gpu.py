"""The Triton backend on a GPU against the reference engine, on real model shapes with random INT4 weights.

Run on the GPU machine: ``pytest -m gpu tests/gpu/test_triton_backend_gpu.py``.
Both backends run the same INT4 codes; the reference dequantizes them to bf16.
The judge is the fp32 reference: the Triton backend must be about as close to
it as the bf16 reference is, and greedy decoding must agree token for token up
to a near-tie (where bf16 rounding alone may pick either token).
"""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import GPU_COMPILED, rel_err

from ffchat.model import Transformer
from ffchat.reference_backend import ReferenceBackend
from ffchat.shapes import random_weights, shape_config
from ffchat.triton_backend import TritonBackend

pytestmark = GPU_COMPILED

# A near-tie: the reference's top two logits closer than this (bf16 rounding of a logit ~ 2**-8 relative).
NEAR_TIE = 0.05


def build(shape: str, context: int, dtype: torch.dtype):
    weights = random_weights(shape_config(shape), label=shape, int4=True, seed=0)
    model = Transformer(weights.config, context, dtype=dtype, device="cuda")
    model.load_state_dict(weights.reference_state_dict())
    return weights, ReferenceBackend(model)


@pytest.mark.parametrize("shape", ["llama-3.2-1b", "qwen2.5-0.5b"])
def test_greedy_128_tokens_match_the_reference_and_the_graph_is_captured_once(shape):
    weights, reference = build(shape, 512, torch.float32)
    triton = TritonBackend(weights, 512)
    prompt = torch.randint(0, weights.config.vocab_size, (100,), generator=torch.Generator().manual_seed(0)).tolist()
    want, got = reference.prefill(prompt), triton.prefill(prompt)
    assert rel_err(got, want) < 3e-2
    tokens = []
    for step in range(128):
        token = int(want.argmax())
        if int(got.argmax()) != token:
            top2 = want.topk(2).values
            assert top2[0] - top2[1] < NEAR_TIE, f"step {step}: diverged with a gap of {top2[0] - top2[1]:.3f}"
            break
        tokens.append(token)
        want, got = reference.decode(token), triton.decode(token)
        assert rel_err(got, want) < 3e-2, f"step {step}"
    assert triton.captures == 1
    print(f"{shape}: {len(tokens)} greedy tokens identical")


def test_llama_8b_decode_matches_the_reference():
    weights, reference = build("llama-3.1-8b", 256, torch.bfloat16)
    triton = TritonBackend(weights, 256)
    prompt = list(range(1000, 1064))
    assert rel_err(triton.prefill(prompt), reference.prefill(prompt)) < 3e-2
    for token in (5, 17, 4242):
        assert rel_err(triton.decode(token), reference.decode(token)) < 3e-2


def test_w4a8_mode_decodes_like_its_emulation():
    """triton-w4a8 against the reference model rounding the inputs of gate/up and the LM head the same way."""
    weights = random_weights(shape_config("llama-3.2-1b"), label="llama-3.2-1b", int4=True, seed=0)
    model = Transformer(weights.config, 256, dtype=torch.float32, device="cuda", int8_activation_group=weights.group_size)
    model.load_state_dict(weights.reference_state_dict())
    reference, triton = ReferenceBackend(model), TritonBackend(weights, 256, int8_activations=True)
    prompt = list(range(2000, 2040))
    assert rel_err(triton.prefill(prompt), reference.prefill(prompt)) < 3e-2
    for token in (5, 17, 4242, 99):
        assert rel_err(triton.decode(token), reference.decode(token)) < 3e-2
    assert triton.captures == 1


def test_an_8k_context_is_correct():
    weights, reference = build("llama-3.2-1b", 8192, torch.bfloat16)
    triton = TritonBackend(weights, 8192)
    prompt = torch.randint(0, weights.config.vocab_size, (8000,), generator=torch.Generator().manual_seed(1)).tolist()
    assert rel_err(triton.prefill(prompt), reference.prefill(prompt)) < 3e-2
    for token in (11, 12, 13):
        assert rel_err(triton.decode(token), reference.decode(token)) < 3e-2
    assert triton.position == 8003


def test_warm_up_captures_the_step_before_the_first_answer_and_changes_nothing():
    weights = random_weights(shape_config("qwen2.5-0.5b"), label="qwen2.5-0.5b", int4=True, seed=0)
    cold, warm = TritonBackend(weights, 256), TritonBackend(weights, 256)
    warm.warm_up()
    assert warm.captures == 1 and warm.position == 0
    prompt = list(range(300, 340))
    assert torch.equal(warm.prefill(prompt), cold.prefill(prompt))
    for token in (5, 17, 4242):
        assert rel_err(warm.decode(token), cold.decode(token)) < 1e-3
    assert warm.captures == 1 and cold.captures == 1
