"""Where the Triton backend's captured decode step goes: each kernel's share of the step's critical path (GPU).

Under PDL a kernel starts while the one before it finishes, so kernel durations overlap and do not
add up to the step. What does add up is the spacing of their ends: from the previous kernel's end
to this one's, the time this kernel kept the step waiting. This builds random INT4 weights of a
benchmark shape, the Triton backend with the tuned tiles (tuning first where this GPU has none),
a cache of ``--cache`` tokens (the bench's for contexts up to 4096 by default, which sizes the
attention shares as the bench does), fills it to ``--context`` tokens, records ``--steps`` graph
replays with ``torch.profiler`` and prints, per kernel of a layer, the mean spacing in us.

    PYTHONPATH=. python benchmarks/step_profile.py --shape qwen2.5-0.5b --context 512
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from rich.console import Console

from ffchat.provenance import git_state
from ffchat.shapes import random_weights, shape_config
from ffchat.triton_backend import TritonBackend
from ffchat.tune import tune_if_untuned

# The Triton backend's launches (``TritonBackend._decode_step``): the embedding row, six a layer, the LM head.
LAYER_KERNELS = ("norm+qkv", "attention partial", "attention reduce", "o+residual", "norm+gate/up", "down+residual")
SKIPPED_STEPS = 2  # the first replays under the profiler run slower


def critical_path(kernels: list[tuple[float, float]], layers: int, steps: int) -> dict[str, float]:
    """Mean us a layer (a step for the LM head and the step) that each kernel kept the step waiting.

    ``kernels``: (start, duration) in us of every kernel of ``steps`` consecutive steps, in launch order.
    """
    per_step = 2 + len(LAYER_KERNELS) * layers
    if len(kernels) != per_step * steps:
        raise ValueError(f"expected {per_step} kernels a step over {steps} steps, got {len(kernels)}: "
                         "not the Triton backend's default step")
    spacing: dict[str, list[float]] = {name: [] for name in (*LAYER_KERNELS, "LM head", "step")}
    for step in range(SKIPPED_STEPS, steps):
        ends = [start + duration for start, duration in kernels[step * per_step:(step + 1) * per_step]]
        for index in range(1, per_step - 1):
            spacing[LAYER_KERNELS[(index - 1) % len(LAYER_KERNELS)]].append(ends[index] - ends[index - 1])
        spacing["LM head"].append(ends[-1] - ends[-2])
        spacing["step"].append(ends[-1] - kernels[step * per_step][0])
    return {name: statistics.mean(values) for name, values in spacing.items()}


def tuned_triton_backend(shape: str, cache: int) -> TritonBackend:
    """The Triton backend over seeded random INT4 weights of a benchmark shape with a ``cache``-token KV cache,
    on this GPU's tuned tiles (tuning first where it has none)."""
    config = shape_config(shape)
    device = torch.device("cuda")
    tune_if_untuned(shape, config, 128, device, Console(stderr=True), megakernel=False)
    return TritonBackend(random_weights(config, label=shape, int4=True, device=device), cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--cache", type=int, default=4097, help="KV cache tokens (the bench's for contexts to 4096)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", help="write the table here")
    args = parser.parse_args()

    backend = tuned_triton_backend(args.shape, args.cache)
    config = backend.config
    tokens = torch.randint(0, config.vocab_size, (args.context + args.steps + 5,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    backend.prefill(tokens[:args.context])
    for token in tokens[args.context:args.context + 5]:  # capture the graph, warm up
        backend.decode(token)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        for token in tokens[-args.steps:]:
            backend.decode(token)
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        profile.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    kernels = sorted((e["ts"], e["dur"]) for e in events if e.get("ph") == "X" and e.get("cat") == "kernel")
    table = critical_path(kernels, config.num_layers, args.steps)
    print(f"{args.shape}, {args.context} cached tokens, {torch.cuda.get_device_name()}: us a layer on the step's path")
    for name, us in table.items():
        print(f"  {name:20s} {us:8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": args.shape, "context": args.context, "cache": args.cache,
                                               "device": torch.cuda.get_device_name(), **git_state(), "us": table},
                                              indent=2))


if __name__ == "__main__":
    main()
