"""`ffchat tune` on a GPU: every winner checked and timed, the cache file found by both backends and by ``auto``.

Run on the GPU machine: ``pytest -m gpu tests/gpu/test_tune_gpu.py`` (the tiny shape: seconds).
"""

from __future__ import annotations

import math

import torch
from kernel_helpers import GPU_COMPILED, rel_err

from ffchat.megakernel_backend import MegakernelBackend, config_from_fields
from ffchat.model import Transformer
from ffchat.profiles import GpuIdentity
from ffchat.reference_backend import ReferenceBackend
from ffchat.shapes import random_weights, shape_config
from ffchat.triton_backend import TritonBackend
from ffchat.runtime import choose_backend
from ffchat.tune import TUNE_CONTEXTS, tune
from ffchat.tuning_cache import decode_problems, load_tuning

pytestmark = GPU_COMPILED


def test_tuned_tiles_are_cached_and_used(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))  # a fresh tuning dir beside it
    config = shape_config("tiny")
    path, results, mega, seconds = tune(config, 128, torch.device("cuda"))
    assert path.parent == tmp_path / "ffchat-tuning" and path.is_file()
    assert [r.problem for r in results] == decode_problems(config, 128)
    # the profile's tile is a candidate, so the fastest contender alone is at least as fast; the step may choose
    # another contender
    assert all(0 < min(r.us, *(c.us for c in r.runners_up)) <= r.profile_us for r in results)
    assert mega.rejected == 0 and 0 < mega.us < math.inf and mega.triton_us > 0 and mega.contexts == list(TUNE_CONTEXTS)
    assert load_tuning(GpuIdentity.of(torch.device("cuda")), config, 128).megakernel == mega
    weights = random_weights(config, label="tiny", int4=True)
    triton = TritonBackend(weights, 64)
    assert triton.details == {"tuned": True, "kernels": {r.problem.role: r.kernel for r in results},
                              "early_release_roles": sorted(r.problem.role for r in results if r.release_early)}
    assert "o" in triton.early_release_roles, "the O projection releases early in every tuning (not a contender)"
    assert set(triton.tuning) == {r.problem.role for r in results}
    megakernel = MegakernelBackend(weights, 64)
    assert megakernel.details["megakernel_tuned"] and megakernel.kernel_config == config_from_fields(mega.config)
    assert choose_backend("auto", torch.device("cuda"), config, int4=True, group_size=128) == \
        ("megakernel" if mega.us < mega.triton_us else "triton")
    model = Transformer(config, 64, dtype=torch.float32, device="cuda")
    model.load_state_dict(weights.reference_state_dict())
    reference = ReferenceBackend(model)
    assert rel_err(triton.prefill(list(range(20))), reference.prefill(list(range(20)))) < 3e-2
    for token in (5, 7, 11):
        assert rel_err(triton.decode(token), reference.decode(token)) < 3e-2
