"""A decode layer's GEMVs in a chain, as the Triton backend launches them: W4A16 against dp2a and W4A8.

Per layer: norm+QKV, O+residual (fed the q rows, standing in for attention), norm+gate/up+SiLU,
down+residual, every launch reading the one before it, PDL on, the whole chain of L layers (distinct
weights, together several times the L2) one CUDA graph. W4A8 runs its quantizing launch (norm fused
where the layer has one) before each GEMV, as a backend would; dp2a codes x inside the GEMV. Prints
microseconds per layer and the weights' GB/s, beside the copy bandwidth of the same run.

    PYTHONPATH=. python benchmarks/gemv_chain.py --json $OUT/chain.json
"""

from __future__ import annotations

import argparse
import json

import torch

from ffchat.kernels import dp2a_gemv
from ffchat.kernels import int4_gemv as gemv
from ffchat.tune import graph_time
from gemv_probe import GROUP, copy_bandwidth, make_set  # beside this file

SHAPES = {"llama-3.2-1b": (2048, 8192, 3072, 16), "llama-3.1-8b": (4096, 14336, 6144, 8)}  # H, I, qkv rows, layers
DEVICE = "cuda"


def build(hidden: int, inter: int, qkv_rows: int, layers: int) -> list[dict]:
    """Distinct random weights per layer (``gemv_probe.make_set``: every int32 is 8 valid nibbles)."""
    return [{"qkv": make_set(qkv_rows, hidden), "o": make_set(hidden, hidden), "gate_up": make_set(2 * inter, hidden),
             "down": make_set(hidden, inter), "norm": torch.rand(hidden, device=DEVICE).bfloat16() + 0.5}
            for _ in range(layers)]


def chain(variant: str, layers: list[dict], x0: torch.Tensor, hidden: int):
    """One decode step's GEMVs; returns the final residual."""
    if variant == "w4a8":
        def run(x, w, norm_weight=None, **kw):
            return gemv.int4_gemv_w4a8(x, *w, GROUP, act=gemv.quantize_activation(x, GROUP, norm_weight=norm_weight),
                                       **kw)
    else:
        kernel = gemv.int4_gemv if variant == "w4a16" else dp2a_gemv.int4_gemv_dp2a

        def run(x, w, **kw):
            return kernel(x, *w, GROUP, **kw)
    x = x0
    for layer in layers:
        qkv = run(x, layer["qkv"], norm_weight=layer["norm"])
        x1 = run(qkv[:hidden], layer["o"], residual=x)
        h = run(x1, layer["gate_up"], norm_weight=layer["norm"], gated=True)
        x = run(h, layer["down"], residual=x1)
    return x


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    args = parser.parse_args()
    copy = copy_bandwidth()
    results = {"device": torch.cuda.get_device_name(), "copy_GBps": copy, "shapes": {}}
    print(f"{results['device']}: copy {copy:.0f} GB/s", flush=True)
    for name, (hidden, inter, qkv_rows, count) in SHAPES.items():
        torch.manual_seed(0)
        layers = build(hidden, inter, qkv_rows, count)
        weight_bytes = sum(t.numel() * t.element_size() for layer in layers for key in ("qkv", "o", "gate_up", "down")
                           for t in layer[key][:3])
        x0 = torch.randn(hidden, device=DEVICE).bfloat16()
        row = {}
        want = chain("w4a16", layers[:1], x0, hidden).float()
        for variant in ("w4a16", "dp2a", "w4a8"):
            got = chain(variant, layers[:1], x0, hidden).float()
            err = ((got - want).norm() / want.norm()).item()
            seconds = graph_time(lambda _: chain(variant, layers, x0, hidden), 1)
            row[variant] = {"us_per_layer": seconds / count * 1e6, "GBps": weight_bytes / seconds / 1e9,
                            "rel_err_one_layer": err}
            print(f"{name} {variant:6s} {seconds / count * 1e6:7.2f} us/layer {weight_bytes / seconds / 1e9:6.0f} GB/s "
                  f"({100 * weight_bytes / seconds / 1e9 / copy:4.1f}% of copy), one layer vs w4a16: {err:.1e}",
                  flush=True)
        results["shapes"][name] = row
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
