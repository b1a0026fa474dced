"""`ffchat tune`: time the decode GEMV tiles of one model shape on this GPU, and cache the winners.

The GPU profile's tables (``ffchat.profiles``) were measured on one GPU and are only a
start elsewhere. Tuning times every candidate tile on the model's own decode GEMVs (q/k/v
with its norm, o with the residual, norm + gate/up + SiLU, down with the residual, the LM
head), on fresh random INT4 weights rotated through more memory than L2 holds, after
checking each candidate against ``int4_gemv_reference``; the fastest correct one wins.
The profile's own choice is always a candidate. Timed alone, a GEMV only approximates its
cost inside the captured step (PDL overlaps neighbours): on an H200 the 1B winners, each
0-2% faster alone, made the step 4% faster; another set, with one GEMV 7% faster alone,
changed it by nothing (BENCHMARKS.md, 2026-12-02).
The winners go to ``ffchat.tuning_cache``; the Triton backend reads them at start-up and
`ffchat show` says whether a model is tuned here.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ffchat.config import ModelConfig
from ffchat.errors import FfchatError
from ffchat.kernels.int4_gemv import GemvConfig, int4_gemv, int4_gemv_reference, pick_config
from ffchat.profiles import GpuIdentity
from ffchat.tuning_cache import GemvProblem, decode_problems, save_tuning, tuning_path

MAX_REL_ERR = 1e-3  # a correct candidate measures ~3e-5 against the fp32 reference
ROTATED_BYTES = 4  # rotate weights through this many times the L2 size, so L2 cannot serve a repeat


def candidates(problem: GemvProblem, device: torch.device) -> list[GemvConfig]:
    """The profile's choice first, then a grid of tiles around the measured optimum of the H200 sweep.

    block_n counts outputs for a gated problem. Each candidate is shrunk to the problem like
    the profile's own, and duplicates are dropped.
    """
    profile = pick_config(problem.n, problem.k, problem.group_size, gated=problem.gated, device=device)
    grid = [profile]
    for block_n in ((8, 16) if problem.gated else (8, 16, 32)):
        for block_k in (1024, 2048):
            for warps, registers in ((4, 128), (8, None)):
                grid.append(GemvConfig(block_n=block_n, block_k=block_k, num_warps=warps, max_registers=registers,
                                       prefetch=profile.prefetch))
    shrunk = [pick_config(problem.n, problem.k, problem.group_size, ((math.inf, math.inf, cfg),),
                          gated=problem.gated) for cfg in grid]
    return list(dict.fromkeys(shrunk))


def _random_problem(problem: GemvProblem, copies: int, device: torch.device, seed: int):
    """``copies`` fresh weight sets of the problem, its input, and the epilogue tensors, made on the device.

    Every int32 is a valid word of 8 nibbles, so packed weights are drawn directly (an 8B LM head
    in codes would take gigabytes of host memory).
    """
    gen = torch.Generator(device=device).manual_seed(seed)

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen, device=device)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device)

    groups = problem.k // problem.group_size
    sets = [(torch.randint(-2**31, 2**31, (problem.n, problem.k // 8), generator=gen, device=device,
                           dtype=torch.int32),
             (uniform(problem.n, groups) * 0.02 + 0.002).half(), (uniform(problem.n, groups) * 15).half())
            for _ in range(copies)]
    x = normal(problem.k).bfloat16()
    extra = {}
    if problem.norm:
        extra["norm_weight"] = (1 + normal(problem.k) * 0.1).bfloat16()
    if problem.residual:
        extra["residual"] = normal(problem.n).bfloat16()
    if problem.gated:
        extra["gated"] = True
    return sets, x, extra


def graph_time(fn: Callable[[int], object], copies: int, repeats: int = 20) -> float:
    """Seconds per call: median over ``repeats`` replays of a graph calling fn(0..copies-1)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (and compile) outside the capture
        for i in range(copies):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn(i)
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3 / copies)
    return sorted(times)[len(times) // 2]


@dataclass
class ProblemResult:
    problem: GemvProblem
    config: GemvConfig
    us: float
    profile_us: float
    rejected: int  # candidates that failed the reference check or did not compile


def tune_problem(problem: GemvProblem, device: torch.device, on_candidate: Callable[[], None] = lambda: None
                 ) -> ProblemResult:
    """Every candidate checked against the reference, then timed; the fastest correct one."""
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    weight_bytes = problem.n * problem.k // 2
    copies = max(2, min(64, math.ceil(ROTATED_BYTES * l2 / weight_bytes)))
    sets, x, extra = _random_problem(problem, copies, device, seed=problem.n * 31 + problem.k)
    want = int4_gemv_reference(x, *sets[0], problem.group_size, **extra).float()
    timed, rejected = [], 0
    for index, cfg in enumerate(candidates(problem, device)):
        try:
            got = int4_gemv(x, *sets[0], problem.group_size, config=cfg, **extra).float()
            error = ((got - want).norm() / want.norm()).item()
            if not error < MAX_REL_ERR:
                rejected += 1
            else:
                timed.append((graph_time(lambda i: int4_gemv(x, *sets[i], problem.group_size, config=cfg, **extra),
                                          copies), index, cfg))
        except Exception:  # noqa: BLE001 - a tile this GPU cannot compile (e.g. out of shared memory) is no winner
            rejected += 1
        on_candidate()
    if not timed:
        raise FfchatError(f"no candidate tile for the {problem.role} GEMV ({problem.n}x{problem.k}) passed the "
                          f"reference check on this GPU", hint="report this with `ffchat --debug tune ...`")
    seconds, _, best = min(timed, key=lambda item: item[0])
    profile_us = next((t for t, index, _ in timed if index == 0), math.nan) * 1e6
    return ProblemResult(problem, best, seconds * 1e6, profile_us, rejected)


def tune(config: ModelConfig, group_size: int, device: torch.device,
         on_candidate: Callable[[], None] = lambda: None) -> tuple[Path, list[ProblemResult], float]:
    """Tune every decode GEMV of the shape on ``device``, store the result; (file, results, seconds)."""
    started = time.perf_counter()
    problems = decode_problems(config, group_size)
    results = [tune_problem(problem, device, on_candidate) for problem in problems]
    seconds = time.perf_counter() - started
    identity = GpuIdentity.of(device)
    path = tuning_path(identity, problems)
    save_tuning(path, identity, results, seconds)
    return path, results, seconds


def shape_to_tune(model: str | None, shape: str | None) -> tuple[str, ModelConfig, int]:
    """(label, config, INT4 group size) of a stored model's artifact, or of a benchmark shape at group 128."""
    from ffchat.quantize.artifact import read_manifest
    from ffchat.shapes import shape_config
    from ffchat.store import Store

    if model and shape:
        raise FfchatError("name a stored model or a --shape, not both")
    if model is None:
        name = shape or "llama-3.2-1b"
        return name, shape_config(name), 128
    record = Store().get(model)
    if record.record_dir is None or not (record.record_dir / "int4").is_dir():
        raise FfchatError(f"{model} has no INT4 weights to tune for", hint=f"run `ffchat quantize {model}` first")
    manifest = read_manifest(record.record_dir / "int4")
    return record.name, ModelConfig.from_file(record.model_dir / "config.json"), int(manifest["group_size"])


def run_tune(model: str | None, shape: str | None, out, err) -> None:
    """`ffchat tune`: a progress bar per candidate, then a table of what was chosen against the profile."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    label, config, group_size = shape_to_tune(model, shape)  # a wrong model name first, GPU or not
    if not torch.cuda.is_available():
        raise FfchatError("ffchat tune needs a CUDA GPU and none was found")
    device = torch.device("cuda")
    total = sum(len(candidates(p, device)) for p in decode_problems(config, group_size))
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as progress:
        task = progress.add_task(f"tuning {label}", total=total)
        path, results, seconds = tune(config, group_size, device, lambda: progress.advance(task))
    table = Table(title=f"{label} on {GpuIdentity.of(device).name}: decode GEMV tiles")
    for column in ("GEMV", "N x K", "tile (outputs x inputs, warps)", "us", "profile's us", "rejected"):
        table.add_column(column)
    for r in results:
        c = r.config
        tile = f"{c.block_n} x {c.block_k}, {c.num_warps}" + (f", {c.max_registers} regs" if c.max_registers else "") \
            + (", prefetch" if c.prefetch else "")
        table.add_row(r.problem.role, f"{r.problem.n} x {r.problem.k}", tile, f"{r.us:.2f}", f"{r.profile_us:.2f}",
                      str(r.rejected))
    out.print(table)
    out.print(f"tuned in {seconds:.1f} s; saved {path}")
