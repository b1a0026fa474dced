"""What the kernel tests share: fresh random INT4 weights, the relative error, the GPU tier's marks.

Imports no kernel module: a CPU test must set TRITON_INTERPRET before the first one is imported.
"""

from __future__ import annotations

import os

import pytest
import torch

from ffchat.quantize.layout import pack_int4

# Compiled Triton on a CUDA GPU: the GPU tier (`pytest -m gpu` on the GPU machine).
GPU_COMPILED = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="TRITON_INTERPRET=1: kernels would not compile"),
]


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """||y - ref|| / ||ref|| in float64."""
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def random_int4(n: int, k: int, group: int, seed: int, device: str):
    """Fresh random codes, scales and fractional zeros in the version-1 layout (codes >= 8 set bit 31)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=gen)
    scales = (torch.rand(n, k // group, generator=gen) * 0.02 + 0.002).half()
    zeros = (torch.rand(n, k // group, generator=gen) * 15).half()
    return pack_int4(q).to(device), scales.to(device), zeros.to(device)
