"""Batch-1 INT4 GEMV microbenchmark: ffchat's Triton kernels (W4A16, W4A8, dp2a) vs torch tinygemm and fp16 cuBLAS.

Measures, in one run on one GPU: device-to-device copy bandwidth (the roofline), then per
(N, K) shape the achieved GB/s of every kernel = bytes that must move (INT4 words + fp16
scales/zeros + x + y) / median time. Each timing replays a CUDA graph of launches over
rotating weight buffers (together > 4x L2) so the cache cannot serve repeats.
With --sweep it also times a grid of tile configs per shape (compiled in parallel worker
processes first) and prints the best, which is what kernels/int4_gemv.py's tables hold.

    PYTHONPATH=. python benchmarks/gemv_probe.py --sweep all --json $OUT/gemv.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing as mp
import os
import time
import traceback

import torch
import triton

from ffchat.kernels import dp2a_gemv
from ffchat.kernels import int4_gemv as gemv
from ffchat.tune import graph_time

GROUP = 128
SHAPES = [  # (name, N, K)
    ("1B qkv/o 2048x2048", 2048, 2048),
    ("1B k/v 512x2048", 512, 2048),
    ("1B gate|up 8192x2048", 8192, 2048),
    ("1B down 2048x8192", 2048, 8192),
    ("1B lm_head 128256x2048", 128256, 2048),
    ("8B q/o 4096x4096", 4096, 4096),
    ("8B gate+up 28672x4096", 28672, 4096),
    ("8B down 4096x14336", 4096, 14336),
]
SMS = 132
DEVICE = "cuda"


def candidates(n: int, k: int) -> list[gemv.GemvConfig]:
    """A pruned grid: 4-32 words per thread, enough programs to fill the GPU, splits that divide K evenly."""
    out = []
    for bn, bk, warps, split in itertools.product((4, 8, 16, 32), (512, 1024, 2048), (4, 8), (1, 2, 4, 8)):
        chunks, row_blocks = k // bk, triton.cdiv(n, bn)
        words_per_thread = bn * bk // 8 // (32 * warps)
        if k % bk or chunks % split or not 4 <= words_per_thread <= 32:
            continue
        programs = row_blocks * split
        if split > 1 and (row_blocks >= 4 * SMS or programs > 16 * SMS):
            continue
        if programs < SMS // 2 and split < chunks:
            continue
        out.append(gemv.GemvConfig(bn, bk, warps, 1, split))
    return out


def make_set(n: int, k: int):
    """One weight buffer: random words are valid codes (any 32 bits = 8 nibbles)."""
    qweight = torch.randint(-(2**31), 2**31 - 1, (n, k // 8), dtype=torch.int32, device=DEVICE)
    scales = (torch.rand(n, k // GROUP, device=DEVICE) * 0.01 + 0.001).half()
    zeros = (torch.rand(n, k // GROUP, device=DEVICE) * 15).half()
    return qweight, scales, zeros


VARIANTS = ("w4a16", "w4a8", "dp2a")


def run_kernel(variant: str, x, act, wset, cfg, out):
    """``act``: x quantized for W4A8 (the dp2a kernel codes x itself)."""
    if variant == "w4a16":
        return gemv.int4_gemv(x, *wset, GROUP, out=out, config=cfg)
    if variant == "w4a8":
        return gemv.int4_gemv_w4a8(x, *wset, GROUP, out=out, config=cfg, act=act)
    return dp2a_gemv.int4_gemv_dp2a(x, *wset, GROUP, out=out, config=cfg)


def _warm(job):
    """Worker: compile (by running once) each (variant, shape, config) so the parent hits Triton's disk cache."""
    variant, n, k, cfgs = job
    torch.manual_seed(0)
    wset = make_set(n, k)
    x = torch.randn(k, device=DEVICE, dtype=torch.float16)
    act = gemv.quantize_activation(x, GROUP)
    out = torch.empty(n, device=DEVICE, dtype=torch.float16)
    failed = []
    for cfg in cfgs:
        try:
            run_kernel(variant, x, act, wset, cfg, out)
        except Exception as exc:  # a config the compiler rejects is reported, not fatal
            failed.append((cfg, str(exc)[:120]))
    torch.cuda.synchronize()
    return failed


def precompile(jobs, workers: int):
    start = time.time()
    with mp.get_context("spawn").Pool(workers) as pool:
        for failed in pool.imap_unordered(_warm, jobs):
            for cfg, msg in failed:
                print("compile failed", cfg, msg, flush=True)
    print(f"precompiled {sum(len(j[3]) for j in jobs)} launches in {time.time() - start:.0f}s", flush=True)


def copy_bandwidth() -> float:
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=DEVICE)
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    return 2 * n / (ms * 1e-3) / 1e9


def rel_err(y, ref) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def bench_shape(n: int, k: int, sweep: tuple[str, ...], l2_bytes: int) -> dict:
    int4_bytes = n * k // 2 + 2 * n * (k // GROUP) * 2
    copies = max(2, min(128, math.ceil(4 * l2_bytes / int4_bytes)))
    sets = [make_set(n, k) for _ in range(copies)]
    x = torch.randn(k, device=DEVICE, dtype=torch.float16)
    act = gemv.quantize_activation(x, GROUP)
    out = torch.empty(n, device=DEVICE, dtype=torch.float16)
    ref = gemv.int4_gemv_reference(x, *sets[0], GROUP).float()
    refs = {"w4a16": ref, "w4a8": gemv.int4_gemv_w4a8_reference(x, *sets[0], GROUP).float(),
            "dp2a": dp2a_gemv.int4_gemv_dp2a_reference(x, *sets[0], GROUP).float()}
    res = {"N": n, "K": k, "int4_MB": int4_bytes / 1e6, "copies": copies}

    def measure(variant, cfg):
        y = run_kernel(variant, x, act, sets[0], cfg, out)
        err = rel_err(y, refs[variant])
        if not err < 2e-3:
            return None, err
        return graph_time(lambda i: run_kernel(variant, x, act, sets[i], cfg, out), copies), err

    groups = k // GROUP
    io_bytes = {"w4a16": int4_bytes + 2 * k + 2 * n, "w4a8": int4_bytes + k + 8 * groups + 2 * n,
                "dp2a": int4_bytes + 2 * k + 2 * n}
    for variant in VARIANTS:
        table = gemv.config_table(f"gemv_{'w4a16' if variant == 'w4a16' else 'w4a8'}", x.device)
        default = gemv.pick_config(n, k, GROUP, table)
        t, err = measure(variant, default)
        res[variant] = {"config": default.__dict__, "us": t and t * 1e6, "GBps": t and io_bytes[variant] / t / 1e9,
                        "rel_err": err}
        if variant in sweep:
            timed = []
            for cfg in candidates(n, k):
                t, err = measure(variant, cfg)
                if t is None:
                    print(f"  {variant} {cfg} wrong: rel err {err:.1e}", flush=True)
                else:
                    timed.append((t, cfg))
            timed.sort(key=lambda tc: tc[0])
            t, cfg = timed[0]
            res[f"{variant}_best"] = {"config": cfg.__dict__, "us": t * 1e6, "GBps": io_bytes[variant] / t / 1e9,
                                      "top5": [(round(t * 1e6, 2), c.__dict__) for t, c in sorted(timed, key=lambda tc: tc[0])[:5]]}
    res["w4a8_err_vs_fp16x"] = rel_err(run_kernel("w4a8", x, act, sets[0], None, out), ref)
    res["dp2a_err_vs_fp16x"] = rel_err(run_kernel("dp2a", x, act, sets[0], None, out), ref)
    res["quantize_x_us"] = graph_time(lambda i: gemv.quantize_activation(x, GROUP), 16) * 1e6
    res["tinygemm"] = bench_tinygemm(n, k, x, copies)
    res["cublas_fp16"] = bench_cublas(n, k, x, l2_bytes)
    return res


def bench_tinygemm(n: int, k: int, x: torch.Tensor, copies: int) -> dict | None:
    """torch's tinygemm INT4 kernel, same bytes (uint8 nibbles + bf16 scale/zero pairs)."""
    try:
        packed = [torch.ops.aten._convert_weight_to_int4pack(
            torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=DEVICE), 8) for _ in range(copies)]
        sz = [torch.rand(k // GROUP, n, 2, device=DEVICE, dtype=torch.bfloat16) for _ in range(copies)]
        xb = x.bfloat16().view(1, k)
        t = graph_time(lambda i: torch.ops.aten._weight_int4pack_mm(xb, packed[i], GROUP, sz[i]), copies)
    except Exception as exc:  # not every torch build ships it
        print("tinygemm unavailable:", str(exc)[:160], flush=True)
        return None
    return {"us": t * 1e6, "GBps": (n * k // 2 + 4 * n * (k // GROUP) + 2 * k + 2 * n) / t / 1e9}


def bench_cublas(n: int, k: int, x: torch.Tensor, l2_bytes: int) -> dict:
    copies = max(2, min(128, math.ceil(4 * l2_bytes / (2 * n * k))))
    weights = [torch.randn(n, k, device=DEVICE, dtype=torch.float16) for _ in range(copies)]
    xv = x.view(1, k)
    t = graph_time(lambda i: torch.nn.functional.linear(xv, weights[i]), copies)
    return {"us": t * 1e6, "GBps": (2 * n * k + 2 * k + 2 * n) / t / 1e9}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", choices=["none", *VARIANTS, "both", "all"], default="none",
                        help="time a grid of configs per shape for these kernels")
    parser.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    parser.add_argument("--json", help="write all numbers here")
    parser.add_argument("--shapes", help="comma-separated indices into SHAPES")
    args = parser.parse_args()
    shapes = [SHAPES[int(i)] for i in args.shapes.split(",")] if args.shapes else SHAPES
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20} MB, "
          f"torch {torch.__version__}, triton {triton.__version__}", flush=True)
    sweep = {"none": (), "both": ("w4a16", "w4a8"), "all": VARIANTS}.get(args.sweep, (args.sweep,))
    if sweep:
        device = torch.device(DEVICE)
        tables = {v: gemv.config_table(f"gemv_{'w4a16' if v == 'w4a16' else 'w4a8'}", device) for v in sweep}
        jobs = []
        for (v, table), (_, n, k) in itertools.product(tables.items(), shapes):
            cfgs = candidates(n, k) + [gemv.pick_config(n, k, GROUP, table)]
            jobs += [(v, n, k, cfgs[i:i + 6]) for i in range(0, len(cfgs), 6)]  # small jobs balance the pool
        precompile(jobs, args.workers)
    copy = copy_bandwidth()
    print(f"copy bandwidth {copy:.0f} GB/s (1 GiB device-to-device, read+write)", flush=True)
    results = {"device": props.name, "copy_GBps": copy, "shapes": {}}
    for name, n, k in shapes:
        try:
            res = bench_shape(n, k, sweep, props.L2_cache_size)
        except Exception:  # one broken shape must not cost the others' numbers
            traceback.print_exc()
            continue
        results["shapes"][name] = res
        print(name, json.dumps(res, default=str), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    print_table(results)


def print_table(results: dict):
    copy = results["copy_GBps"]

    def cell(r):
        return "      -       " if not r or not r.get("us") else f"{r['us']:6.1f}us {r['GBps']:5.0f}"

    print(f"\n{results['device']}: copy {copy:.0f} GB/s. Cells: time per GEMV, GB/s; % = of copy bandwidth")
    print(f"{'shape':24s} {'MB':>6s} | {'w4a16 table':15s} {'%':>3s} | {'w4a16 best':15s} | {'w4a8 table':15s} {'%':>3s}"
          f" | {'w4a8 best':15s} | {'dp2a table':15s} {'%':>3s} | {'dp2a best':15s} | {'tinygemm':15s} | "
          f"{'cuBLAS fp16':15s} | w4a16/tiny")
    for name, r in results["shapes"].items():
        tiny = r.get("tinygemm")
        ratio = f"{tiny['us'] / r['w4a16']['us']:.2f}x" if tiny and r["w4a16"]["us"] else "-"
        pct = lambda v: f"{100 * r[v]['GBps'] / copy:3.0f}" if r[v]["us"] else "  -"  # noqa: E731
        print(f"{name:24s} {r['int4_MB']:6.1f} | {cell(r['w4a16'])} {pct('w4a16')} | {cell(r.get('w4a16_best'))} | "
              f"{cell(r['w4a8'])} {pct('w4a8')} | {cell(r.get('w4a8_best'))} | {cell(r['dp2a'])} {pct('dp2a')} | "
              f"{cell(r.get('dp2a_best'))} | {cell(tiny)} | "
              f"{cell(r['cublas_fp16'])} | {ratio}")
    for name, r in results["shapes"].items():
        best = {v: r.get(f"{v}_best", {}).get("config") for v in VARIANTS}
        if any(best.values()):
            print(f"best configs {name}: {best}")


if __name__ == "__main__":
    main()
