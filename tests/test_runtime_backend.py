"""Which backend `run` picks, and the one-line refusals when a requested one cannot run here."""

from __future__ import annotations

import pytest
import torch
from test_triton_backend import tiny_config

from ffchat.errors import FfchatError
from ffchat.runtime import choose_backend

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
