"""`ffchat run`'s generation loop with chained decode steps against one step a call (GPU), in one process.

A chain (``TritonBackend.decode_chain``) decodes several tokens in one graph replay, each step feeding
the token it picks to the next on the device; one step a call is the loop without it (the step's
graph, then the pick's, a copy in and out each token). This builds random INT4 weights of a benchmark
shape and the Triton backend with the tuned tiles (tuning first where this GPU has none), then times
the loop (``ffchat.bench.time_generation``: the bench's prompt, ``--tokens`` tokens, greedy and
sampled) one step a call and with each ``--lengths`` chain, over ``--rounds`` rounds in turn, and
prints the median tok/s of each beside decode alone (the bench's step) at the prompt's context.

    PYTHONPATH=. python benchmarks/chain_ab.py --shape llama-3.2-1b --json $OUT/chain.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from ffchat.bench import GENERATE_PROMPT, GENERATE_SAMPLING, SilentTokenizer, time_decode, time_generation
from ffchat.provenance import git_state
from step_profile import tuned_triton_backend  # beside this file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--tokens", type=int, default=200, help="tokens an answer")
    parser.add_argument("--lengths", default="1,2,4,8", help="chain lengths, beside one step a call")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the table here")
    args = parser.parse_args()

    backend = tuned_triton_backend(args.shape, GENERATE_PROMPT + args.tokens + 8)
    prompt = torch.randint(0, backend.config.vocab_size, (GENERATE_PROMPT,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    variants = {"one step a call": None, **{f"chains of {n}": int(n) for n in args.lengths.split(",")}}
    rates: dict[str, dict[str, list[float]]] = {name: {s: [] for s in GENERATE_SAMPLING} for name in variants}
    for _ in range(args.rounds):
        for sampling, params in GENERATE_SAMPLING.items():
            for name, length in variants.items():
                row = time_generation(backend, SilentTokenizer(), prompt, params, args.tokens, chain_length=length)
                rates[name][sampling].append(row["tok_per_s"])
    decode_ms = statistics.median(time_decode(backend, GENERATE_PROMPT, prompt, 100, 10))
    table = {name: {s: statistics.median(r) for s, r in by_sampling.items()} for name, by_sampling in rates.items()}
    print(f"{args.shape}, {torch.cuda.get_device_name()}: tok/s of the loop (median of {args.rounds}), "
          f"decode alone {1e3 / decode_ms:.0f} tok/s")
    for name, by_sampling in table.items():
        print(f"  {name:16s} " + "  ".join(f"{s} {v:7.0f}" for s, v in by_sampling.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "shape": args.shape, "tokens": args.tokens, "prompt_tokens": GENERATE_PROMPT, "rounds": args.rounds,
            "device": torch.cuda.get_device_name(), **git_state(), "decode_alone_tok_per_s": 1e3 / decode_ms,
            "tok_per_s": table, "all_tok_per_s": rates}, indent=2))


if __name__ == "__main__":
    main()
