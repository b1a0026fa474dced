"""Where the whole-model kernel's decode step goes: a stamped step, summed per op (GPU).

Builds random INT4 weights of a benchmark shape, the megakernel backend (the tuned config if
this GPU has one, else the default), fills the cache to ``--context`` tokens, traces a few
steps (``MegakernelBackend.trace_step``) and prints, for the fastest, each op's share of the
step's critical path summed over the layers (the release of its wait and its own work), then
the stages of one layer. ``--json`` writes every stage's stamps.

    PYTHONPATH=. python benchmarks/megakernel_trace.py --shape llama-3.2-1b --context 512
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from ffchat.kernels.trace import op_summary
from ffchat.megakernel_backend import MegakernelBackend
from ffchat.shapes import random_weights, shape_config

TRACED_STEPS = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--layer", type=int, default=1, help="the layer whose stages are listed")
    parser.add_argument("--json", help="write every stage's stamps here")
    args = parser.parse_args()

    weights = random_weights(shape_config(args.shape), label=args.shape, int4=True, device="cuda")
    backend = MegakernelBackend(weights, args.context + 1)
    tokens = torch.randint(0, weights.config.vocab_size, (args.context + 1,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    backend.prefill(tokens[:args.context])
    rows = min((backend.trace_step(tokens[-1]) for _ in range(TRACED_STEPS)), key=lambda r: r[-1].last_done)
    config = backend.kernel_config
    print(f"{torch.cuda.get_device_name()}, {args.shape}, context {args.context}: {config.programs} programs, "
          f"{config.num_warps} warps, {config.attention_splits} attention shares per KV head; "
          f"step {rows[-1].last_done / 1e3:.1f} us (first start to last done, fastest of {TRACED_STEPS})")
    print(f"{'op':>10} {'stages':>6} {'critical us':>12} {'release us':>11} {'work us':>9}")
    for op in op_summary(rows):
        print(f"{op.op:>10} {op.stages:>6} {op.critical / 1e3:12.1f} {op.release / 1e3:11.1f} {op.work / 1e3:9.1f}")
    print(f"layer {args.layer}, us from the step's start: stage, items, first start, entries ready (first..last), done")
    for row in rows:
        if row.stage.layer == args.layer and row.stage.name.startswith("layer"):
            print(f"  {row.stage.name:>18} {row.stage.items:5d} {row.started / 1e3:8.2f} "
                  f"{row.first_ready / 1e3:8.2f}..{row.last_ready / 1e3:<8.2f} "
                  f"{row.first_done / 1e3:8.2f}..{row.last_done / 1e3:.2f}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"device": torch.cuda.get_device_name(), "shape": args.shape, "context": args.context,
                       "config": dataclasses.asdict(config),
                       "stages": [dataclasses.asdict(row) for row in rows]}, out, indent=1)


if __name__ == "__main__":
    main()
