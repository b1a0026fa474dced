"""The generation loop on the GPU backends: queuing each token's step before the host reads it changes nothing.

Run on the GPU machine: ``pytest -m gpu tests/gpu/test_generate_gpu.py``. Random weights of a real
shape; the bench's silent tokenizer stands in for a vocabulary (no text, no end of answer).
"""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import GPU_COMPILED

from ffchat.bench import SilentTokenizer
from ffchat.generate import Generator
from ffchat.megakernel_backend import MegakernelBackend
from ffchat.sampling import SamplingParams
from ffchat.shapes import random_weights, shape_config
from ffchat.triton_backend import TritonBackend

pytestmark = GPU_COMPILED

BACKENDS = {"triton": TritonBackend, "megakernel": MegakernelBackend}


def answer_tokens(generator: Generator, prompt: list[int], params: SamplingParams) -> list[int]:
    """The answer's tokens but the last, which is never decoded: what the cache holds after the prompt."""
    for _ in generator.stream(prompt, params):
        pass
    assert generator.backend.position == len(generator.cached), "the step queued last was not forgotten"
    return generator.cached[len(prompt):]


@pytest.mark.parametrize("name", BACKENDS)
def test_queued_greedy_steps_give_the_tokens_of_one_step_at_a_time(name):
    weights = random_weights(shape_config("llama-3.2-1b"), label="1b", int4=True, seed=0)
    backend = BACKENDS[name](weights, 512)
    prompt = torch.randint(0, weights.config.vocab_size, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    logits, expected = backend.prefill(prompt), []
    for _ in range(64):  # the plain loop: the host reads every token before the next step is queued
        expected.append(int(logits.argmax()))
        logits = backend.decode(expected[-1])
    backend.rewind(0)
    generator = Generator(backend, SilentTokenizer())
    assert answer_tokens(generator, prompt, SamplingParams(temperature=0, repeat_penalty=1.0, max_tokens=65)) \
        == expected


def test_seeded_sampling_on_the_device_repeats_and_penalizes_its_own_picks():
    weights = random_weights(shape_config("llama-3.2-1b"), label="1b", int4=True, seed=0)
    generator = Generator(TritonBackend(weights, 512), SilentTokenizer())
    prompt = list(range(100, 140))

    def tokens(**params) -> list[int]:
        generator.backend.rewind(0)
        generator.cached.clear()
        return answer_tokens(generator, prompt, SamplingParams(max_tokens=97, **params))

    first = tokens(seed=5)
    assert first == tokens(seed=5) and first != tokens(seed=6)
    # a penalty so strong that no token repeats inside its window: the device saw every pick
    distinct = tokens(temperature=0, repeat_penalty=1e6, repeat_last_n=-1)
    assert len(set(distinct)) == len(distinct) == 96


@pytest.mark.parametrize("name", BACKENDS)
def test_chained_steps_sample_what_one_step_a_call_samples(name):
    """The chain's captured picks draw the same uniform numbers as single picks: a seed gives one answer."""
    weights = random_weights(shape_config("llama-3.2-1b"), label="1b", int4=True, seed=0)
    backend = BACKENDS[name](weights, 512)
    prompt = list(range(300, 340))
    params = SamplingParams(seed=11, max_tokens=45)  # Ollama's defaults: top-k, top-p, repetition penalty
    chained = answer_tokens(Generator(backend, SilentTokenizer()), prompt, params)
    backend.rewind(0)
    assert chained == answer_tokens(Generator(backend, SilentTokenizer(), chain_length=None), prompt, params)
    assert len(chained) == 44 and backend.chains, "the chains ran captured"
