"""`ffchat bench` on a GPU: the compiled baseline computes what the reference does, and the JSON is complete.

Run on the GPU machine: ``pytest -m gpu tests/gpu/test_bench_gpu.py``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from cli_helpers import ffchat
from kernel_helpers import GPU_COMPILED, rel_err

pytestmark = GPU_COMPILED


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles its own model: forget the last one's graphs (and its shapes)."""
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("shape, int4", [("tiny", True), ("tiny-qwen", True), ("tiny", False)],
                         ids=["tiny-int4", "tiny-qwen-int4", "tiny-bf16"])
def test_compiled_baseline_matches_the_reference(shape, int4):
    """Same tokens through both: the baseline's logits are within bf16 error of our reference engine's.

    The exact answer is the fp32 model on the (dequantized) weights; the baseline
    must be about as close to it as the bf16 reference is.
    """
    from ffchat.bench import BACKENDS, BASELINE
    from ffchat.model import Transformer
    from ffchat.shapes import random_weights, shape_config

    weights = random_weights(shape_config(shape), label=shape, int4=int4, seed=2)
    reference = BACKENDS["reference"].build(weights, 64)
    baseline = BACKENDS[BASELINE].build(weights, 64)  # compiles, records the CUDA graph
    assert baseline.details["cuda_graphs"], "inductor skipped CUDA graphs: not gpt-fast's recipe"
    exact = Transformer(weights.config, 64, dtype=torch.float32, device="cuda")
    exact.load_state_dict({**{name: t.float() for name, t in weights.dense.items()},
                           **{f"{n}.weight": q.dequantize(torch.float32) for n, q in weights.int4.items()}})
    tokens = torch.randint(0, weights.config.vocab_size, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    truth = exact.forward(torch.tensor(tokens[:20], device="cuda"), 0, last_only=True)[0]
    pairs = [(reference.prefill(tokens[:20]), baseline.prefill(tokens[:20]), truth)]
    for i, token in enumerate(tokens[20:], start=20):
        pairs.append((reference.decode(token), baseline.decode(token),
                      exact.forward(torch.tensor([token], device="cuda"), i, last_only=True)[0]))
    for ours, theirs, truth in pairs:
        assert torch.isfinite(theirs).all()
        assert rel_err(theirs, truth) < 2 * rel_err(ours, truth) + 5e-3
        assert rel_err(theirs, ours) < 4e-2
    # a replay after a rewind reads the cache the eager prefill and earlier replays wrote
    baseline.rewind(22)
    assert rel_err(baseline.decode(tokens[22]), pairs[3][1]) < 1e-6


def test_bench_json_has_every_field(tmp_path):
    path = tmp_path / "bench.json"
    result = ffchat("bench", "--shape", "tiny", "--contexts", "16,64", "--prompt", "32", "--steps", "20",
                    "--json", str(path), timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(path.read_text())
    device = torch.cuda.get_device_name()
    assert device in result.stdout and report["device"]["name"] == device
    assert "kernel tables" in report["gpu_profile"]
    for key in ("command", "date", "ffchat_version", "commit", "torch", "cuda", "triton", "model", "contexts",
                "prompt_tokens", "steps", "baseline", "roofline", "backends"):
        assert key in report, key
    assert report["command"].startswith("ffchat bench --shape tiny")
    assert report["copy_bandwidth"]["gb_per_s"] > 100
    assert report["model"]["format"] == "int4" and report["model"]["config"]["hidden_size"] == 256
    assert [r["context"] for r in report["roofline"]] == [16, 64]
    assert [b["name"] for b in report["backends"]] == ["triton", "torch-compile", "reference"]  # the default
    for backend in report["backends"]:
        assert "error" not in backend
        for row in backend["decode"]:
            for key in ("ms_per_token", "tok_per_s", "bytes_per_token", "roofline_ms", "pct_roofline", "vs_baseline"):
                assert math.isfinite(row[key]) and row[key] > 0, (backend["name"], key)
        for key in ("ms", "tok_per_s", "ttft_ms", "vs_baseline"):
            assert backend["prefill"][key] > 0
        assert [row["sampling"] for row in backend["generate"]] == ["greedy", "sampled"]
        for row in backend["generate"]:  # random weights and a silent tokenizer: no answer ends early
            assert (row["tokens"], row["finish_reason"]) == (20, "length") and row["tok_per_s"] > 0
    assert report["backends"][1]["details"]["cuda_graphs"] is True
