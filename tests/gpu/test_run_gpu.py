"""`ffchat pull`, `quantize` and `run` on a GPU, as a user types them: auto picks the Triton backend.

Run on the GPU machine: ``pytest -m gpu tests/gpu/test_run_gpu.py``. A tiny random llama (the real
model cannot travel to the GPU machine); tests/gpu/test_triton_backend_gpu.py checks the numbers.
"""

from __future__ import annotations

import json

from cli_helpers import ffchat
from kernel_helpers import GPU_COMPILED

pytestmark = GPU_COMPILED


def test_quantized_model_runs_on_the_triton_backend_by_default(tiny_model_dir):
    assert ffchat("pull", str(tiny_model_dir("llama")), "--name", "tiny").returncode == 0
    quantized = ffchat("quantize", "tiny")
    assert quantized.returncode == 0, quantized.stderr
    for line in ("The capital of", "Hello there"):
        result = ffchat("run", "tiny", "--json", "--raw", "--temperature", "0", "-n", "24", "-p", line)
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        assert answer["backend"] == "triton"
        assert answer["finish_reason"] in ("stop", "length") and answer["completion_tokens"] >= 1
    fallback = ffchat("run", "tiny", "--json", "--fp16", "-n", "4", "-p", "Hi")
    assert fallback.returncode == 0, fallback.stderr
    assert json.loads(fallback.stdout)["backend"] == "reference"  # the triton backend runs INT4 weights only
