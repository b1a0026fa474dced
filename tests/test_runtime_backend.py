"""Which backend `run` picks, when its first run tunes, and the one-line refusals when a requested backend cannot
run here."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console
from test_triton_backend import tiny_config

from ffchat.errors import FfchatError
from ffchat.kernels.int4_gemv import GemvConfig
from ffchat.profiles import GpuIdentity
from ffchat.runtime import choose_backend
from ffchat.tune import ProblemResult, tune_if_untuned
from ffchat.tuning_cache import MegakernelTuning, decode_problems, save_tuning, tuning_path

CPU = torch.device("cpu")


@pytest.mark.parametrize("backend", ["triton", "triton-w4a8", "megakernel"])
def test_gpu_backends_are_refused_on_the_cpu(backend, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter would let them run
    with pytest.raises(FfchatError, match=f"the {backend} backend needs a CUDA GPU"):
        choose_backend(backend, CPU, tiny_config("llama"), int4=True)
    with pytest.raises(FfchatError, match=f"the {backend} backend runs INT4 weights"):
        choose_backend(backend, CPU, tiny_config("llama"), int4=False)


def test_auto_is_the_reference_on_the_cpu_and_unknown_names_are_refused():
    assert choose_backend("auto", CPU, tiny_config("llama"), int4=True) == "reference"
    with pytest.raises(FfchatError, match="unknown backend 'mega'"):
        choose_backend("mega", CPU, tiny_config("llama"), int4=True)


GPU = GpuIdentity("NVIDIA H200", (9, 0), 132, "580.159.04", "13.0", "3.6.0")
CUDA = torch.device("cuda")  # never touched: the GPU's identity is patched in


@pytest.fixture
def tuned_here(tmp_path, monkeypatch):
    """A private tuning cache on a pretend H200; saves a tuning of the tiny llama with the given step times."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(GpuIdentity, "of", classmethod(lambda cls, device: GPU))

    def save(megakernel_us: float | None, triton_us: float = 500.0) -> None:
        config = tiny_config("llama")
        results = [ProblemResult(p, GemvConfig(16, 32, 4), 1.0, 1.0, 0) for p in decode_problems(config, 32)]
        mega = None if megakernel_us is None else MegakernelTuning({"programs": 1}, megakernel_us, triton_us, [512],
                                                                   0, 1)
        save_tuning(tuning_path(GPU, config, 32), GPU, results, 1.0, mega)
    return save


@pytest.mark.parametrize("megakernel_us, want", [(None, "triton"), (600.0, "triton"), (400.0, "megakernel")])
def test_auto_runs_the_megakernel_only_where_tuning_timed_it_faster(tuned_here, megakernel_us, want):
    assert choose_backend("auto", CUDA, tiny_config("llama"), int4=True, group_size=32) == "triton"  # untuned
    tuned_here(megakernel_us)
    assert choose_backend("auto", CUDA, tiny_config("llama"), int4=True, group_size=32) == want
    assert choose_backend("auto", CUDA, tiny_config("llama"), int4=True, group_size=64) == "triton"  # other shape
    assert choose_backend("triton", CUDA, tiny_config("llama"), int4=True, group_size=32) == "triton"


def test_the_first_run_tunes_once_and_only_what_it_may_run(tuned_here, monkeypatch):
    tuned = []

    def fake_tune(name, config, group_size, device, err, *, megakernel):  # the search itself needs a GPU
        tuned.append(megakernel)
        tuned_here(450.0 if megakernel else None)
        return None, [], None, 2.0

    monkeypatch.setattr("ffchat.tune.tune_with_progress", fake_tune)
    console = Console(file=io.StringIO())
    config = tiny_config("llama")
    assert tune_if_untuned("tiny", config, 32, CUDA, console, megakernel=False)
    assert not tune_if_untuned("tiny", config, 32, CUDA, console, megakernel=False)
    assert tune_if_untuned("tiny", config, 32, CUDA, console, megakernel=True)  # the megakernel was not tuned
    assert not tune_if_untuned("tiny", config, 32, CUDA, console, megakernel=True)
    assert tuned == [False, True]
    text = console.file.getvalue()
    assert text.count("first run of tiny on this NVIDIA H200: tuning its kernels once") == 2


def test_a_failed_tuning_is_a_notice_and_the_run_goes_on(tuned_here, monkeypatch):
    def failing(*args, **kwargs):
        raise FfchatError("no candidate tile for the qkv GEMV passed the reference check on this GPU")

    monkeypatch.setattr("ffchat.tune.tune_with_progress", failing)
    console = Console(file=io.StringIO(), width=200)
    assert not tune_if_untuned("tiny", tiny_config("llama"), 32, CUDA, console, megakernel=True)
    assert "tuning failed (no candidate tile for the qkv GEMV" in console.file.getvalue()
