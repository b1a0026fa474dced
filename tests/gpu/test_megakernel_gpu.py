"""The whole-model kernel on a GPU: against the Triton backend (itself checked against the reference) on real
shapes with random INT4 weights, at 8k context, and with a deliberately broken schedule.

Run on the GPU machine: ``pytest -m gpu tests/gpu/test_megakernel_gpu.py``.
"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch
from kernel_helpers import GPU_COMPILED, rel_err

from ffchat.errors import FfchatError
from ffchat.kernels.megakernel import megakernel_reference
from ffchat.kernels.schedule import build_schedule
from ffchat.megakernel_backend import MegakernelBackend, default_config
from ffchat.shapes import random_weights, shape_config
from ffchat.triton_backend import TritonBackend

pytestmark = GPU_COMPILED

NEAR_TIE = 0.05  # as in test_triton_backend_gpu: top-two logits this close may swap under rounding


def weights_of(shape: str):
    return random_weights(shape_config(shape), label=shape, int4=True, seed=0)


@pytest.mark.parametrize("shape", ["llama-3.2-1b", "qwen2.5-0.5b"])
def test_greedy_256_tokens_match_the_triton_backend(shape):
    weights = weights_of(shape)
    triton, mega = TritonBackend(weights, 512), MegakernelBackend(weights, 512)
    prompt = torch.randint(0, weights.config.vocab_size, (100,), generator=torch.Generator().manual_seed(0)).tolist()
    want, got = triton.prefill(prompt), mega.prefill(prompt)
    identical = 0
    for step in range(256):
        token = int(want.argmax())
        if int(got.argmax()) != token:
            top2 = want.topk(2).values
            assert top2[0] - top2[1] < NEAR_TIE, f"step {step}: diverged with a gap of {top2[0] - top2[1]:.3f}"
            break
        identical += 1
        want, got = triton.decode(token), mega.decode(token)
        assert rel_err(got, want) < 3e-2, f"step {step}"
    mega.check()
    assert mega.captures == 1
    print(f"{shape}: {identical} greedy tokens identical to the triton backend")


def test_one_step_matches_its_reference_on_the_8b_shape():
    mega = MegakernelBackend(weights_of("llama-3.1-8b"), 256)
    mega.prefill(list(range(1000, 1064)))
    k, v = mega.k_cache.clone(), mega.v_cache.clone()
    want = megakernel_reference(mega.model, k, v, mega.rope_cos, mega.rope_sin, 4242, 65)
    got = mega.decode(4242)
    mega.check()
    assert rel_err(got, want.float()) < 3e-2
    assert rel_err(mega.k_cache[:, :, 64], k[:, :, 64]) < 3e-2


def test_an_8k_context_is_correct():
    weights = weights_of("llama-3.2-1b")
    triton, mega = TritonBackend(weights, 8192), MegakernelBackend(weights, 8192)
    prompt = torch.randint(0, weights.config.vocab_size, (8000,), generator=torch.Generator().manual_seed(1)).tolist()
    triton.prefill(prompt)
    mega.prefill(prompt)
    for token in (11, 12, 13):
        assert rel_err(mega.decode(token), triton.decode(token)) < 3e-2
    mega.check()
    assert mega.position == 8003


def test_a_traced_step_has_real_times_and_the_same_logits():
    """On the GPU the stamps are %globaltimer nanoseconds: every stage after the one it waits for, a step of
    plausible length, and the stamped kernel computes what the graph does."""
    mega = MegakernelBackend(weights_of("qwen2.5-0.5b"), 256)
    mega.prefill(list(range(100, 200)))
    rows = mega.trace_step(7)
    traced = mega.logits.clone()
    for before, row in zip(rows, rows[1:]):
        assert before.last_done <= row.first_ready + 1000, f"{row.stage.name} got through 1 us before its input"
    assert 10_000 < rows[-1].last_done < 10_000_000, "a 0.5B step takes between 10 us and 10 ms"
    assert rel_err(mega.decode(7), traced) < 1e-3


def test_a_broken_schedule_raises_the_flag_and_returns():
    """A wait for one item more than exists: the kernel gives up after its cap, flags it, and the host says so."""
    weights = weights_of("llama-3.2-1b")
    probe = MegakernelBackend(weights, 256)
    schedule = build_schedule(probe.state.stages, probe.kernel_config.programs)
    waits = (schedule[:, :, 4] > 0).nonzero()
    program, slot = waits[len(waits) // 2].tolist()
    schedule[program, slot, 4] += 1
    config = replace(default_config(probe.model, probe.device), spin_cap=1 << 14)
    del probe
    started = time.perf_counter()
    with pytest.raises(FfchatError, match="stopped waiting"):  # the start-up check runs a step and reads the flag
        MegakernelBackend(weights, 256, config=config, schedule=schedule)
    assert time.perf_counter() - started < 60, "the capped waits end the launch"


def test_a_grid_that_cannot_be_resident_is_refused():
    weights = weights_of("qwen2.5-0.5b")
    probe = MegakernelBackend(weights, 256)
    config = replace(probe.kernel_config, programs=64 * probe.kernel_config.programs, spin_cap=1 << 10)
    del probe
    with pytest.raises(FfchatError, match="cannot all be resident"):
        MegakernelBackend(weights, 256, config=config)
