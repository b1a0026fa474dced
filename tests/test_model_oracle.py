"""The reference decoder against Hugging Face transformers, on a tiny random model of every family.

Tolerances are absolute on logits whose spread is ~0.15 (largest ~1), so
1e-4 is about 1e-3 of a typical logit, while fp32 differences from transformers
measure below 1e-6. Even a subtle mistake moves logits by 1e-3 or more: the
sensitivity test drops the sliding window or Llama 3 RoPE scaling and checks
the oracle would notice.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from ffchat.config import ModelConfig, RopeConfig
from ffchat.errors import FfchatError
from ffchat.model import Transformer, load_model
from ffchat.reference_backend import ReferenceBackend
from ffchat.weights import load_state_dict

TOLERANCE = 1e-4
PROMPT_LEN = 40  # longer than Mistral's 16-token window
MAX_SEQ_LEN = 96


def random_tokens(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 384, (length,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    """The transformers model of a family (eager attention, fp32), loaded once per module."""
    from transformers import AutoModelForCausalLM

    @functools.cache
    def get(family: str):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(family), attn_implementation="eager",
                                                     dtype=torch.float32)
        return model.eval()

    return get


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens[None]).logits[0].float()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_logits_match_transformers(family, tiny_model_dir, hf_model):
    tokens = random_tokens(PROMPT_LEN)
    ours = load_model(tiny_model_dir(family), max_seq_len=MAX_SEQ_LEN).forward(tokens, 0)
    assert ours.dtype == torch.float32 and ours.shape == (PROMPT_LEN, 384)
    assert max_diff(ours, hf_logits(hf_model(family), tokens)) <= TOLERANCE


def test_cached_decode_matches_full_recompute(family, tiny_model_dir):
    model = load_model(tiny_model_dir(family), max_seq_len=MAX_SEQ_LEN)
    tokens = random_tokens(PROMPT_LEN)
    full = model.forward(tokens, 0)
    cached = [model.forward(tokens[:20], 0)]
    cached += [model.forward(tokens[pos:pos + 1], pos) for pos in range(20, PROMPT_LEN)]
    assert max_diff(torch.cat(cached), full) <= TOLERANCE


def test_two_chunk_prefill_matches_one(family, tiny_model_dir):
    model = load_model(tiny_model_dir(family), max_seq_len=MAX_SEQ_LEN)
    tokens = random_tokens(PROMPT_LEN)
    whole = model.forward(tokens, 0)
    chunks = torch.cat([model.forward(tokens[:23], 0), model.forward(tokens[23:], 23)])
    assert max_diff(chunks, whole) <= TOLERANCE
    assert max_diff(model.forward(tokens, 0, last_only=True), whole[-1:]) <= TOLERANCE


def test_greedy_continuation_matches_generate(family, tiny_model_dir, hf_model):
    prompt, steps = random_tokens(12, seed=2), 32
    backend = ReferenceBackend(load_model(tiny_model_dir(family), max_seq_len=MAX_SEQ_LEN))
    logits, ours = backend.prefill(prompt.tolist()), []
    for _ in range(steps):
        ours.append(int(logits.argmax()))
        logits = backend.decode(ours[-1])
    generated = hf_model(family).generate(
        prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long), do_sample=False,
        max_new_tokens=steps, eos_token_id=None, pad_token_id=0,
    )[0, len(prompt):].tolist()
    assert len(generated) == steps  # transformers must not have stopped early
    assert ours == generated
    assert backend.position == len(prompt) + steps


def test_bf16_is_close_to_fp32(family, tiny_model_dir):
    tokens = random_tokens(PROMPT_LEN)
    fp32 = load_model(tiny_model_dir(family), max_seq_len=MAX_SEQ_LEN).forward(tokens, 0)
    model = load_model(tiny_model_dir(family), max_seq_len=MAX_SEQ_LEN, dtype=torch.bfloat16)
    bf16 = model.forward(tokens, 0)
    assert model.layers[0].wq.dtype == torch.bfloat16 and model.k_cache.dtype == torch.bfloat16
    assert bf16.dtype == torch.float32
    assert 0 < max_diff(bf16, fp32) <= 0.05


def test_position_past_max_seq_len_raises(family, tiny_model_dir):
    model = load_model(tiny_model_dir(family), max_seq_len=8)
    tokens = random_tokens(9)
    model.forward(tokens[:8], 0)  # exactly fills the cache
    with pytest.raises(FfchatError, match="outside the context"):
        model.forward(tokens[:1], 8)
    with pytest.raises(FfchatError, match="outside the context"):
        model.forward(tokens, 0)


# A family's quirk switched off: the oracle must then fail by well over TOLERANCE.
WITHOUT_QUIRK = {
    "mistral": lambda config: dataclasses.replace(config, sliding_window=None),
    "llama": lambda config: dataclasses.replace(config, rope=RopeConfig(theta=config.rope.theta)),
}


@pytest.mark.parametrize("quirky_family", sorted(WITHOUT_QUIRK))
def test_oracle_tolerance_catches_a_missing_quirk(quirky_family, tiny_model_dir, hf_model):
    """The prompt is long enough for the sliding window and Llama 3 RoPE scaling to matter."""
    directory = tiny_model_dir(quirky_family)
    model = Transformer(WITHOUT_QUIRK[quirky_family](ModelConfig.from_file(directory / "config.json")), MAX_SEQ_LEN)
    model.load_state_dict(load_state_dict(directory))
    tokens = random_tokens(PROMPT_LEN)
    assert max_diff(model.forward(tokens, 0), hf_logits(hf_model(quirky_family), tokens)) > 10 * TOLERANCE


def test_backend_refuses_a_prompt_that_does_not_fit(tiny_model_dir):
    backend = ReferenceBackend(load_model(tiny_model_dir("llama"), max_seq_len=16))
    assert backend.context_length == 16 and backend.name == "reference"
    backend.prefill(random_tokens(10).tolist())
    with pytest.raises(FfchatError, match="does not fit"):
        backend.prefill(random_tokens(7).tolist())
    assert backend.position == 10  # nothing was truncated or cached
    logits = backend.prefill(random_tokens(6).tolist())
    logits /= 0.7  # samplers may scale logits in place, outside inference mode
    with pytest.raises(FfchatError, match="full"):
        backend.decode(1)


def test_backend_rewind_replays_identically(tiny_model_dir):
    backend = ReferenceBackend(load_model(tiny_model_dir("mistral"), max_seq_len=MAX_SEQ_LEN))
    tokens = random_tokens(PROMPT_LEN).tolist()
    backend.prefill(tokens[:30])
    first = backend.decode(tokens[30])
    backend.prefill(random_tokens(20, seed=5).tolist())  # a different continuation, then undo it
    backend.rewind(30)
    assert torch.equal(backend.decode(tokens[30]), first)
    backend.rewind(0)
    assert backend.position == 0
    assert max_diff(backend.prefill(tokens[:31]), first) <= TOLERANCE
