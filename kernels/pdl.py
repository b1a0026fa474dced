"""Programmatic dependent launch (PDL): a decode kernel's programs start while the kernel before it finishes.

A decode step is a chain of short kernels; in a CUDA graph each one still waits for its
predecessor to drain before its programs are scheduled, then spends a ramp-up computing
indices and waiting for its first loads. Launched with ``launch_pdl`` (Hopper and later), a
kernel becomes resident once every program of the kernel before it has called
``release_dependents``, does the work that needs no activation (indices, its first weight
tile), and blocks in ``wait_for_inputs`` until that kernel has completed with its writes
visible.

The rule every kernel launched this way keeps: nothing but weights (and the step's token and length,
which the host copies in before the step's first kernel) is read, and nothing is written, before
``wait_for_inputs``. The waits chain, so a kernel past its wait also knows
every earlier kernel is done. Without PDL (other GPUs, the interpreter) both calls compile
to nothing and the launch is an ordinary one.

Most GEMVs release right after their wait, not before it. Releasing first is just as correct
(kernels two and three ahead become resident and request their weights early), but measured
on an H100 in every kernel it was 1-4% faster on Llama-3.2-1B and 8% slower on Qwen2.5-0.5B,
whose short kernels' early programs hold registers the running kernel's later programs need
(BENCHMARKS.md, stop 22). Measured one kernel at a time (stop 23), releasing first pays behind
attention only: the two attention launches and the O projection after them do it, so while the
shares run the reduce, the O projection and gate/up are resident and their first weights in
flight (Llama-3.2-1B -5% and Qwen2.5-0.5B -4% at 4096 cached tokens); the QKV GEMV doing it
made the 0.5B 5% slower, gate/up gained under 1%, down lost at 4096. Measured again on the
tuned kernels of stop 31, the QKV GEMV releasing first made one 1B tuning's step 1.7% shorter
at 4096 (attention's shares become resident and request their keys under it; another tuning's
by nothing) and the 0.5B's 2.8% longer at 512, so `ffchat tune` settles that one per shape by
the whole step (``ffchat.tune.RELEASE_CONTENDERS``): in stop 32 every 1B tuning took it, the 0.5B
and 8B did not.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ffchat.kernels.interpreter import interpreted

# FFCHAT_PDL=0 launches every kernel the ordinary way: the A/B switch for `ffchat bench`.
_DISABLED = os.environ.get("FFCHAT_PDL", "1") == "0"


@functools.cache
def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` are launched with PDL: CUDA capability 9.0 or later, compiled."""
    if _DISABLED or interpreted(wait_for_inputs) or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def launch_options(device: torch.device) -> dict:
    """Keyword arguments for a kernel launch: its ``PDL`` constant and, when on, ``launch_pdl``."""
    enabled = pdl_enabled(device)
    return {"PDL": enabled, "launch_pdl": True} if enabled else {"PDL": False}


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """Block until the previous kernel has completed and its writes are visible (a no-op without PDL)."""
    if PDL:
        gdc_wait()


@triton.jit
def release_dependents(PDL: tl.constexpr):
    """Let the next kernel's programs become resident (they still wait for this kernel to complete)."""
    if PDL:
        gdc_launch_dependents()
