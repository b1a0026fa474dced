"""`ffchat pull`, `quantize` and `run` on a GPU, as a user types them: the first run tunes, auto picks a backend.

Run on the GPU machine: ``pytest -m gpu tests/gpu/test_run_gpu.py``. A tiny random llama (the real
model cannot travel to the GPU machine); tests/gpu/test_triton_backend_gpu.py checks the numbers.
"""

from __future__ import annotations

import json

from cli_helpers import ffchat
from kernel_helpers import GPU_COMPILED

pytestmark = GPU_COMPILED


def test_quantized_model_runs_on_a_gpu_backend_by_default_tuned_on_its_first_run(tiny_model_dir, tmp_path):
    """The first run tunes (its notice on stderr), later ones do not; auto runs the backend the tuning timed
    faster, as `ffchat show` states."""
    cache = {"TRITON_CACHE_DIR": str(tmp_path / "triton" / "cache")}  # a tuning dir of its own beside it
    assert ffchat("pull", str(tiny_model_dir("llama")), "--name", "tiny").returncode == 0
    quantized = ffchat("quantize", "tiny")
    assert quantized.returncode == 0, quantized.stderr
    backends = []
    for index, line in enumerate(("The capital of", "Hello there")):
        result = ffchat("run", "tiny", "--json", "--raw", "--temperature", "0", "-n", "24", "-p", line, **cache)
        assert result.returncode == 0, result.stderr
        assert ("first run of tiny" in result.stderr) == (index == 0), result.stderr
        answer = json.loads(result.stdout)
        backends.append(answer["backend"])
        assert answer["finish_reason"] in ("stop", "length") and answer["completion_tokens"] >= 1
    shown = ffchat("show", "tiny", **cache).stdout
    assert backends == ["megakernel" if "auto runs the megakernel" in shown else "triton"] * 2, shown
    untuned = ffchat("run", "tiny", "--json", "--no-tune", "-n", "4", "-p", "Hi")  # another tuning dir: untuned
    assert untuned.returncode == 0 and "first run" not in untuned.stderr, untuned.stderr
    fallback = ffchat("run", "tiny", "--json", "--fp16", "-n", "4", "-p", "Hi", **cache)
    assert fallback.returncode == 0, fallback.stderr
    assert json.loads(fallback.stdout)["backend"] == "reference"  # the triton backend runs INT4 weights only
