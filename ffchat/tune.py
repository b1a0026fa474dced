"""`ffchat tune`: time the decode GEMV tiles of one model shape on this GPU, and cache the winners.

The GPU profile's tables (``ffchat.profiles``) were measured on one GPU and are only a
start elsewhere. Tuning times every candidate tile on the model's own decode GEMVs (q/k/v
with its norm, o with the residual, norm + gate/up + SiLU, down with the residual, the LM
head), on fresh random INT4 weights rotated through more memory than L2 holds, after
checking each candidate against ``int4_gemv_reference``; the fastest correct one wins.
The profile's own choice is always a candidate. Candidates are of three kernels: the W4A16 GEMV,
the dp2a GEMV (``ffchat.kernels.dp2a_gemv``: x as int16 codes, the same result to ~1e-5), and, for
GEMVs whose shape it runs, the word-a-lane W4A16 GEMV (``ffchat.kernels.lane_gemv``).
Timed alone, a GEMV only approximates its cost inside the captured step (PDL overlaps
neighbours): on an H200 the 1B winners, each 0-2% faster alone, made the step 4% faster;
another set, with one GEMV 7% faster alone, changed it by nothing (BENCHMARKS.md, 2026-12-02).
So the whole decode step settles each role among its contenders (``settle_on_step``): the
winner alone, the fastest tile of the other kernel, and the tiles within ``NEAR_TIE`` of it;
then whether the q/k/v GEMV lets the next launch start before its own wait (``RELEASE_CONTENDERS``).
Then the whole-model kernel (``ffchat.megakernel_backend``): its default configuration, that
with half the attention shares, and every combination of tiles (the profile's, the tuned
ones), grid and warps, and keys per attention block (``megakernel_candidates``), each checked
against the Triton backend by the backend's own start-up check and timed over decode steps at
each of ``TUNE_CONTEXTS`` cached tokens, as is the Triton backend's step in the same process.
The first `ffchat run` on a GPU tunes while the user waits, so every candidate of a phase (a
whole-kernel compile is ~6 s of an H200 host's CPU) is compiled first, on threads at once:
a 1B shape tunes in ~39 s on an H200 (BENCHMARKS.md, 2026-12-03).
The winners go to ``ffchat.tuning_cache``; the backends read them at start-up, ``auto``
runs the megakernel where it measured faster, and `ffchat show` says what a model uses here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import triton

from ffchat.config import ModelConfig
from ffchat.errors import FfchatError
from ffchat.kernels.int4_gemv import GemvConfig, int4_gemv_reference, pick_config, sm_count
from ffchat.kernels.lane_gemv import lane_gemv_fits
from ffchat.kernels.megakernel import MegakernelConfig, registers_per_sm
from ffchat.megakernel_backend import attention_splits, megakernel_tile
from ffchat.profiles import GpuIdentity
from ffchat.triton_backend import DP2A, EARLY_RELEASE_ROLES, GEMV_KERNELS, LANES, W4A16
from ffchat.tuning_cache import GemvProblem, MegakernelTuning, decode_problems, save_tuning, tuning_path

MAX_REL_ERR = 1e-3  # a correct candidate measures ~3e-5 against the fp32 reference
ROTATED_BYTES = 4  # rotate weights through this many times the L2 size, so L2 cannot serve a repeat
# Cached tokens while whole decode steps are timed: a candidate's time is the mean of its step at each, so a
# config fast only at short contexts cannot win (attention blocks of 32 keys: -1% at 512, +6% at 4096 on an H200).
TUNE_CONTEXTS = (512, 4096)
STEP_REPEATS = 50  # timed decode steps per backend (after 5 warm-up steps)
# ``settle_on_step`` times the step with the current choice (0) and a trial (1) in this order at each context, each
# timing SETTLE_REPEATS steps: a drift of the GPU's speed over the four weighs on both alike. Timed one after the
# other, the first timing of a process ran ~1% faster than later ones (BENCHMARKS.md, stop 30), more than most choices
# move the step, and a choice kept when one timing came out low set a bar later trials had to beat by luck.
PAIRED_ORDER = (0, 1, 1, 0)
SETTLE_REPEATS = 25
# A role's contenders in the step (``settle_on_step``): its winner alone, the fastest tile of the other kernel, and
# other tiles within NEAR_TIE of the winner's time alone, CONTENDERS in all at most. Near ties alone made tune's
# choices differ between runs, and with them the step: on an H100 the 1B gate/up went to W4A16 in one run and to
# dp2a in another (BENCHMARKS.md, stop 28).
NEAR_TIE = 0.08
CONTENDERS = 3
# Roles whose order under PDL the step settles after the tiles: releasing the next launch before their own wait, or
# after it (``ffchat.kernels.pdl``). On an H100 the q/k/v GEMV releasing first made one tuning's 1B step 1.7% shorter
# at 4096 cached tokens and 0.8% at 512 (another tuning's by nothing), the 0.5B's 2.8% longer at 512, the 8B's
# neither; gate/up and down releasing first shortened no shape's step by more than the spread between rounds
# (BENCHMARKS.md, stop 31). Settled by paired timings, every 1B tuning of stop 32 took it (the step from 128 to 4096
# cached tokens +12-14.5% against +16%), the 0.5B and 8B did not.
RELEASE_CONTENDERS = ("qkv",)
# The megakernel's searched grids, (programs per SM, warps per program), and keys per attention block: on an H200
# 2 x 4 warps beat 1 x 8 warps (929 us) and 3 x 4 under a register cap (659 us) by 35% and 15% (BENCHMARKS.md).
MEGAKERNEL_GRIDS = ((2, 4), (3, 4), (1, 8))
MEGAKERNEL_ATTENTION_BLOCKS = (64, 32)
MEGAKERNEL_CANDIDATES = 2 + 2 * len(MEGAKERNEL_GRIDS) * len(MEGAKERNEL_ATTENTION_BLOCKS)  # at most
MEGAKERNEL_STEPS = 1 + MEGAKERNEL_CANDIDATES  # progress steps of the megakernel phase: the Triton step, candidates
COMPILE_THREADS = min(16, os.cpu_count() or 1)
# dp2a tiles tried (rows or, gated, outputs; inputs; warps; K slices): the best of a wider sweep on an H100 over the
# 0.5B, 1B and 8B roles (BENCHMARKS.md, stop 25). Rows share the coding of x, so tiles run taller than W4A16's.
DP2A_TILES = ((8, 2048, 4, 1), (16, 2048, 4, 1), (16, 2048, 8, 1), (16, 1024, 4, 1), (16, 1024, 8, 1),
              (32, 1024, 4, 1), (32, 512, 4, 4), (32, 1024, 4, 4))
DP2A_GATED_TILES = ((8, 1024, 4, 1), (16, 1024, 4, 1), (16, 1024, 8, 1), (32, 512, 8, 1))
# dp2a with programs looping over row blocks, x coded once each, all of K in one tile.
# LM heads (ROW_LOOP_ROWS rows or more, K up to ROW_LOOP_HEAD_MAX_K) try DP2A_ROW_LOOPS, (block_n, programs per
# SM) at 4 warps. Other GEMVs try ROW_LOOP_TILES, (int32 words of a tile, programs per SM, largest K) at 4 warps,
# where every SM gets a row block. Under two blocks a program there is little to loop over, but all of K in one tile
# codes x once: on an H100 the 1B down (K 8192, 4 rows) took 5.48 us against W4A16's 6.57, the 8B o (2 rows of 4096,
# four an SM) 4.82 against 5.43, the 0.5B down (224 blocks of 4 rows) 3.21 against 3.79 (BENCHMARKS.md, stop 28).
# Compiled for sm_90: the 1B and 8B gate/up at 4096 words take 236 registers a thread (two programs fit an SM) and
# 1.6 loop instructions a nibble, at 2048 words 120 registers (four fit) and 1.7, against 1.96 for the gate/up tile
# of a program a block, which codes x per 1024 inputs; the 8B down (K 14336 in a 16384 tile) at 4096 words 237
# registers and 1.9 (2.2 a real nibble).
DP2A_ROW_LOOPS = ((16, 2), (8, 2), (8, 4))
ROW_LOOP_ROWS = 32768
ROW_LOOP_HEAD_MAX_K = 4096
ROW_LOOP_TILES = ((4096, 2, 16384), (2048, 4, 4096))
# Word-a-lane tiles (inputs, warps, prefetch), 16 weight rows each (gated: 8 outputs). Tuned on an H100 the 8B took
# them for q/k/v (6.44 us against dp2a's 6.54), down (13.02-13.15 at (2048, 8) against W4A16's 14.44) and the LM head
# (93.55 at (1024, 4) against 95.82), the 1B for o (1.81 against 2.07); dp2a kept the 8B o and gate/up and the 1B's
# other roles; against those roles' runners-up the 8B step was 2.1-2.6% shorter, alternating processes (BENCHMARKS.md,
# stops 33-35).
LANE_TILES = ((2048, 8, False), (2048, 8, True), (1024, 4, True))


def candidates(problem: GemvProblem, device: torch.device) -> list[tuple[str, GemvConfig]]:
    """(kernel, tile) pairs: the profile's W4A16 choice first, then a grid of W4A16 tiles around the measured
    optimum of the H200 sweep, then the dp2a kernel's (the W4A8 table's choice, ``DP2A_TILES``, then ``row_loops``),
    then the word-a-lane kernel's (``LANE_TILES``) where the GEMV's shape fits.

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
    dp2a = [pick_config(problem.n, problem.k, problem.group_size, gated=problem.gated, w4a8=True, device=device)]
    dp2a += [GemvConfig(block_n=block_n, block_k=block_k, num_warps=warps, split_k=split)
             for block_n, block_k, warps, split in (DP2A_GATED_TILES if problem.gated else DP2A_TILES)]
    dp2a += row_loops(problem, device)

    def shrunk(cfg: GemvConfig) -> GemvConfig:
        return pick_config(problem.n, problem.k, problem.group_size, ((math.inf, math.inf, cfg),), gated=problem.gated)

    lanes = [GemvConfig(block_n=8 if problem.gated else 16, block_k=block_k, num_warps=warps, prefetch=prefetch)
             for block_k, warps, prefetch in LANE_TILES]
    lanes = [cfg for cfg in lanes if lane_gemv_fits(problem.n, problem.k, problem.group_size, cfg,
                                                    gated=problem.gated)]
    return list(dict.fromkeys([(W4A16, shrunk(cfg)) for cfg in grid] + [(DP2A, shrunk(cfg)) for cfg in dp2a]
                              + [(LANES, cfg) for cfg in lanes]))


def row_loops(problem: GemvProblem, device: torch.device) -> list[GemvConfig]:
    """The dp2a row-loop tiles ``candidates`` tries for ``problem`` (see ``DP2A_ROW_LOOPS``): none where K is
    longer than the tiles allow or, below LM heads, where some SM would get no row block."""
    block_k = triton.next_power_of_2(problem.k)
    if problem.n >= ROW_LOOP_ROWS:
        if problem.k > ROW_LOOP_HEAD_MAX_K:
            return []
        return [GemvConfig(block_n=block_n, block_k=block_k, num_warps=4, programs_per_sm=programs)
                for block_n, programs in DP2A_ROW_LOOPS]
    outputs = problem.n // 2 if problem.gated else problem.n
    found = []
    for words, programs, most_k in ROW_LOOP_TILES:
        rows = words // (block_k // 8)
        block_n = rows // 2 if problem.gated else rows
        if problem.k <= most_k and block_n and \
                triton.cdiv(outputs, block_n) >= sm_count(device):
            found.append(GemvConfig(block_n=block_n, block_k=block_k, num_warps=4, programs_per_sm=programs))
    return found


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


@dataclass(frozen=True)
class Contender:
    """A candidate that passed the reference check, and its time alone."""

    kernel: str  # a name of ``GEMV_KERNELS``
    config: GemvConfig
    us: float


@dataclass
class ProblemResult:
    problem: GemvProblem
    config: GemvConfig
    us: float
    profile_us: float
    rejected: int  # candidates that failed the reference check or did not compile
    kernel: str = W4A16  # a name of ``GEMV_KERNELS``
    runners_up: tuple[Contender, ...] = ()  # the step's other contenders for this role (``contenders``)
    release_early: bool = False  # the next launch becomes resident before this GEMV's wait (``ffchat.kernels.pdl``)

    def choosing(self, contender: Contender) -> ProblemResult:
        """This result with ``contender`` as its choice (the others stay contenders)."""
        others = tuple(c for c in (Contender(self.kernel, self.config, self.us), *self.runners_up) if c != contender)
        return dataclasses.replace(self, kernel=contender.kernel, config=contender.config, us=contender.us,
                                   runners_up=others)


def contenders(timed: list[Contender]) -> list[Contender]:
    """Of the candidates timed alone, those the step settles between, fastest first: the fastest of each kernel
    and the others within ``NEAR_TIE`` of the fastest, ``CONTENDERS`` at most."""
    ranked = sorted(timed, key=lambda c: c.us)
    chosen = [ranked[0]]
    other_kernel = next((c for c in ranked if c.kernel != ranked[0].kernel), None)
    if other_kernel is not None:
        chosen.append(other_kernel)
    chosen += [c for c in ranked if c.us <= ranked[0].us * (1 + NEAR_TIE) and c not in chosen]
    return sorted(chosen[:CONTENDERS], key=lambda c: c.us)


def run_gemv(kernel: str, x: torch.Tensor, weights: tuple, group_size: int, config: GemvConfig, **epilogue):
    """One decode GEMV as the Triton backend runs a role tuned to ``kernel``."""
    return GEMV_KERNELS[kernel](x, *weights, group_size, config=config, **epilogue)


def tune_problem(problem: GemvProblem, device: torch.device, on_candidate: Callable[[], None] = lambda: None
                 ) -> ProblemResult:
    """Every candidate checked against the reference, then timed; the fastest correct one."""
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    weight_bytes = problem.n * problem.k // 2
    copies = max(2, min(64, math.ceil(ROTATED_BYTES * l2 / weight_bytes)))
    sets, x, extra = _random_problem(problem, copies, device, seed=problem.n * 31 + problem.k)
    want = int4_gemv_reference(x, *sets[0], problem.group_size, **extra).float()
    timed, rejected = [], 0
    found = candidates(problem, device)

    def launch(kernel: str, cfg: GemvConfig, copy: int = 0):
        return run_gemv(kernel, x, sets[copy], problem.group_size, cfg, **extra)

    with contextlib.suppress(Exception):  # alone first: Triton sets up its caches for the kernel once
        launch(*found[0])  # a failure is the loop's to count
    compile_all([lambda pair=pair: launch(*pair) for pair in found[1:]])
    for index, (kernel, cfg) in enumerate(found):
        try:
            got = launch(kernel, cfg).float()
            error = ((got - want).norm() / want.norm()).item()
            if not error < MAX_REL_ERR:
                rejected += 1
            else:
                timed.append((graph_time(lambda i: launch(kernel, cfg, i), copies), index, kernel, cfg))
        except Exception:  # noqa: BLE001 - a tile this GPU cannot compile (e.g. out of shared memory) is no winner
            rejected += 1
        on_candidate()
    if not timed:
        raise FfchatError(f"no candidate tile for the {problem.role} GEMV ({problem.n}x{problem.k}) passed the "
                          f"reference check on this GPU", hint="report this with `ffchat --debug tune ...`")
    profile_us = next((t for t, index, _, _ in timed if index == 0), math.nan) * 1e6
    best, *others = contenders([Contender(kernel, cfg, seconds * 1e6) for seconds, _, kernel, cfg in timed])
    return ProblemResult(problem, best.config, best.us, profile_us, rejected, best.kernel, tuple(others),
                         problem.role in EARLY_RELEASE_ROLES)


def step_us(backend, tokens: list[int]) -> float:
    """Mean over ``TUNE_CONTEXTS`` of the median us of a decode step with that many tokens cached (``ffchat
    bench``'s timing)."""
    from ffchat.bench import fill_cache

    total = 0.0
    for context in TUNE_CONTEXTS:
        fill_cache(backend, context, tokens)
        total += median_step_us(backend, context, tokens, STEP_REPEATS)
    return total / len(TUNE_CONTEXTS)


def paired_step_us(backend, tokens: list[int], choose: Callable[[int], None]) -> tuple[float, float]:
    """``step_us`` of two choices of ``backend``'s kernels (``choose(0)``, ``choose(1)`` put one in place), timed
    in ``PAIRED_ORDER`` at each context on one prefill: the Triton backend's prefill does not depend on them."""
    from ffchat.bench import fill_cache

    totals = [0.0, 0.0]
    for context in TUNE_CONTEXTS:
        fill_cache(backend, context, tokens)
        for which in PAIRED_ORDER:
            choose(which)
            totals[which] += median_step_us(backend, context, tokens, SETTLE_REPEATS)
    return tuple(total / (len(TUNE_CONTEXTS) * PAIRED_ORDER.count(which)) for which, total in enumerate(totals))


def median_step_us(backend, context: int, tokens: list[int], repeats: int) -> float:
    """Median us of ``repeats`` decode steps (after 5 warm-up steps) on a cache filled with ``context`` tokens."""
    from ffchat.bench import time_cached_decode

    return statistics.median(time_cached_decode(backend, context, tokens, repeats, warmup=5)) * 1e3


def megakernel_candidates(default: MegakernelConfig, tuned_tiles: dict[str, GemvConfig], sms: int,
                          registers_per_sm: int, num_kv_heads: int) -> list[MegakernelConfig]:
    """The default config, the default with half its attention shares per KV head, then every combination of
    the other searched axes (duplicates dropped):

    * tiles: the profile's (the default's) or ``tuned_tiles`` (the W4A16 roles' tuned tiles, the profile's for
      the rest) as the megakernel runs them;
    * grid and warps (``MEGAKERNEL_GRIDS``): programs per SM, warps per program, and the register cap that lets
      them all be resident (registers per SM over their threads, a multiple of 8); shares per KV head about one
      per program;
    * keys per attention block (``MEGAKERNEL_ATTENTION_BLOCKS``).
    """
    tuned = {role: megakernel_tile(tile) for role, tile in tuned_tiles.items()}
    tile_sets = [default.tiles, {**default.tiles, **tuned}]
    found = [default, dataclasses.replace(default, attention_splits=max(2, default.attention_splits // 2))]
    for tiles in tile_sets:
        for per_sm, warps in MEGAKERNEL_GRIDS:
            programs = per_sm * sms
            cap = registers_per_sm // (per_sm * warps * 32)
            for block in MEGAKERNEL_ATTENTION_BLOCKS:
                found.append(dataclasses.replace(default, programs=programs, num_warps=warps, tiles=tiles,
                                                 max_registers=None if cap >= 255 else cap // 8 * 8,
                                                 attention_splits=attention_splits(programs, num_kv_heads),
                                                 attention_block=block))
    unique: list[MegakernelConfig] = []  # configs hold dicts: compared, not hashed
    for cfg in found:
        if cfg not in unique:
            unique.append(cfg)
    return unique


def compile_all(calls: list[Callable[[], object]]) -> None:
    """Run ``calls`` (each a compile, or a first launch that compiles) on ``COMPILE_THREADS`` threads at once:
    Triton's compiler releases the GIL. A call that fails is left for the caller's own first use to report."""
    with ThreadPoolExecutor(max_workers=COMPILE_THREADS) as pool:
        for future in [pool.submit(call) for call in calls]:
            future.exception()


def step_tokens(config: ModelConfig) -> list[int]:
    """The token ids ``step_us`` prefills and decodes."""
    return torch.randint(0, config.vocab_size, (max(TUNE_CONTEXTS) + STEP_REPEATS,),
                         generator=torch.Generator().manual_seed(0)).tolist()


def settle_on_step(weights, results: list[ProblemResult], on_contender: Callable[[], None] = lambda: None
                   ) -> list[ProblemResult]:
    """``results`` with each role's choice settled by the Triton backend's whole decode step: role by role, the
    slowest alone first, each runner-up replaces the choice if the step is faster with it; then each role of
    ``RELEASE_CONTENDERS`` releases the next launch in the other order if the step is faster so. Each trial is
    timed beside the current choice (``paired_step_us``), so neither carries a timing from another moment.

    Timed alone, a GEMV can win and still not shorten the step: when x was coded by a launch of its own, the
    8B LM head's dp2a tile on an H100 took 95 us against 110 alone, and the step was the same to 0.4%.
    ``on_contender`` is called once per trial (``trials_to_settle``).
    """
    from ffchat.triton_backend import TritonBackend

    if not trials_to_settle(results):
        return results
    tokens = step_tokens(weights.config)
    backend = TritonBackend(weights, max(TUNE_CONTEXTS) + 1)

    def use(chosen: list[ProblemResult]) -> None:
        backend.use_kernels({r.problem.role: r.config for r in chosen}, {r.problem.role: r.kernel for r in chosen},
                            frozenset(r.problem.role for r in chosen if r.release_early))

    settled = list(results)

    def try_instead(index: int, replacement: ProblemResult) -> None:
        nonlocal settled
        trial = [*settled[:index], replacement, *settled[index + 1:]]
        current_us, trial_us = paired_step_us(backend, tokens, lambda which: use(trial if which else settled))
        if trial_us < current_us:
            settled = trial
        on_contender()

    for index in sorted(range(len(settled)), key=lambda i: -settled[i].us):
        for runner_up in settled[index].runners_up:
            try_instead(index, settled[index].choosing(runner_up))
    for index in range(len(settled)):
        if settled[index].problem.role in RELEASE_CONTENDERS:
            try_instead(index, dataclasses.replace(settled[index], release_early=not settled[index].release_early))
    return settled


def trials_to_settle(results: list[ProblemResult]) -> int:
    """Trials ``settle_on_step`` times, each beside the current choice: every runner-up, and the other order of
    each role of ``RELEASE_CONTENDERS``."""
    return sum(len(r.runners_up) + (r.problem.role in RELEASE_CONTENDERS) for r in results)


def tune_megakernel(weights, device: torch.device, tuned: dict[str, GemvConfig],
                    on_candidate: Callable[[], None] = lambda: None) -> MegakernelTuning:
    """Time the Triton backend's step, then the megakernel's in every configuration of ``megakernel_candidates``
    that compiles, fits the GPU and passes its start-up check against the Triton backend; the fastest.

    All candidates are compiled first, in parallel; ``weights`` random, of the shape; every backend is freed
    before the next is built.
    """
    from ffchat.megakernel_backend import MegakernelBackend
    from ffchat.triton_backend import TritonBackend

    config = weights.config
    tokens = step_tokens(config)
    context = max(TUNE_CONTEXTS) + 1
    triton_us = step_us(TritonBackend(weights, context), tokens)
    on_candidate()
    timed, rejected, found = [], 0, []
    try:
        probe = MegakernelBackend(weights, context)  # the default config: compiled, resident, checked
    except Exception:  # noqa: BLE001 - it does not compile, fit or pass its check: the GPU runs the triton backend
        rejected = 1
    else:
        found = megakernel_candidates(probe.kernel_config, tuned, sm_count(device), registers_per_sm(device),
                                      config.num_kv_heads)
        timed.append((step_us(probe, tokens), found[0]))
        compile_all([lambda cfg=cfg: probe.compile_config(cfg) for cfg in found[1:]])
        del probe
    on_candidate()
    for cfg in found[1:]:
        torch.cuda.empty_cache()
        try:
            backend = MegakernelBackend(weights, context, config=cfg)
            timed.append((step_us(backend, tokens), cfg))
            del backend
        except Exception:  # noqa: BLE001 - no compile, no room on the GPU, or a failed check: no winner
            rejected += 1
        on_candidate()
    tried = max(1, len(found))
    for _ in range(MEGAKERNEL_CANDIDATES - tried):
        on_candidate()  # duplicates dropped, or the default failed: the progress bar still ends full
    if not timed:
        return MegakernelTuning({}, math.inf, triton_us, list(TUNE_CONTEXTS), rejected, tried)
    us, best = min(timed, key=lambda item: item[0])
    return MegakernelTuning(dataclasses.asdict(best), us, triton_us, list(TUNE_CONTEXTS), rejected, tried)


def tune(config: ModelConfig, group_size: int, device: torch.device,
         on_candidate: Callable[[], None] = lambda: None, *, megakernel: bool = True
         ) -> tuple[Path, list[ProblemResult], MegakernelTuning | None, float]:
    """Tune every decode GEMV of the shape on ``device``, then (``megakernel``) the whole-model kernel, and store
    the result; (file, GEMV results, megakernel result, seconds)."""
    from ffchat.shapes import random_weights

    started = time.perf_counter()
    results = [tune_problem(problem, device, on_candidate) for problem in decode_problems(config, group_size)]
    identity = GpuIdentity.of(device)
    path = tuning_path(identity, config, group_size)
    save_tuning(path, identity, results, time.perf_counter() - started)  # the backends timed next read it
    weights = random_weights(config, label="tune", int4=True, group_size=group_size, device=device)
    settled = settle_on_step(weights, results, on_candidate)
    for _ in range(trials_to_settle(results), steps_to_settle(config, group_size)):
        on_candidate()  # roles with fewer contenders: the progress bar still ends full
    if settled is not results:
        results = settled
        save_tuning(path, identity, results, time.perf_counter() - started)
    mega = None
    if megakernel:
        w4a16 = {r.problem.role: r.config for r in results if r.kernel == W4A16}  # the megakernel runs W4A16 tiles only
        mega = tune_megakernel(weights, device, w4a16, on_candidate)
        save_tuning(path, identity, results, time.perf_counter() - started, mega)
    return path, results, mega, time.perf_counter() - started


def progress_steps(config: ModelConfig, group_size: int, device: torch.device, megakernel: bool) -> int:
    """How many times ``tune`` calls its ``on_candidate``: a progress bar's total."""
    gemv = sum(len(candidates(p, device)) for p in decode_problems(config, group_size))
    return gemv + steps_to_settle(config, group_size) + (MEGAKERNEL_STEPS if megakernel else 0)


def steps_to_settle(config: ModelConfig, group_size: int) -> int:
    """Progress steps of ``settle_on_step`` at most: the runners-up of every role, each release order tried."""
    problems = decode_problems(config, group_size)
    return (CONTENDERS - 1) * len(problems) + sum(p.role in RELEASE_CONTENDERS for p in problems)


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


def tune_with_progress(label: str, config: ModelConfig, group_size: int, device: torch.device, err, *,
                       megakernel: bool = True):
    """``tune`` under a progress bar on ``err`` that disappears when done; ``tune``'s result."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as progress:
        task = progress.add_task(f"tuning {label}", total=progress_steps(config, group_size, device, megakernel))
        return tune(config, group_size, device, lambda: progress.advance(task), megakernel=megakernel)


def tune_if_untuned(name: str, config: ModelConfig, group_size: int, device: torch.device, err, *,
                    megakernel: bool) -> bool:
    """Tune the kernels for this shape on this GPU unless a tuning is cached (with the megakernel's, if it may run):
    the first `ffchat run` or `bench` of a shape on a GPU. Returns whether it tuned.

    A failed tuning is a notice, not an error: the profile's tables still run.
    """
    from rich.markup import escape

    from ffchat.tuning_cache import describe_megakernel, load_tuning

    identity = GpuIdentity.of(device)
    cached = load_tuning(identity, config, group_size)
    if cached is not None and (cached.megakernel is not None or not megakernel):
        return False
    err.print(f"first run of {escape(name)} on this {identity.name}: tuning its kernels once "
              "(cached for later runs; `--no-tune` skips this)")
    try:
        _, _, mega, seconds = tune_with_progress(name, config, group_size, device, err, megakernel=megakernel)
    except FfchatError as exc:
        err.print(f"tuning failed ({escape(str(exc))}): running the GPU profile's tables")
        return False
    err.print(f"tuned in {seconds:.0f} s" + (f"; {describe_megakernel(mega)}" if megakernel else ""))
    return True


def results_table(title: str, results: list[ProblemResult]):
    """`ffchat tune`'s table: per role the choice, its time alone against the profile's tile, whether it is also
    the fastest alone (else the step chose it), and when it lets the next launch start (``ffchat.kernels.pdl``)."""
    from rich.table import Table

    table = Table(title=title)
    for column in ("GEMV", "N x K", "kernel", "tile (outputs x inputs, warps)", "us", "profile's us",
                   "fastest alone", "next launch released", "rejected"):
        table.add_column(column)
    for r in results:
        c = r.config
        tile = f"{c.block_n} x {c.block_k}, {c.num_warps}" + (f", {c.max_registers} regs" if c.max_registers else "") \
            + (", prefetch" if c.prefetch else "") + (f", {c.split_k} K slices" if c.split_k > 1 else "") \
            + (f", {c.programs_per_sm} looping programs/SM" if c.programs_per_sm else "")
        fastest = min([r.us, *(runner_up.us for runner_up in r.runners_up)])
        table.add_row(r.problem.role, f"{r.problem.n} x {r.problem.k}", r.kernel, tile, f"{r.us:.2f}",
                      f"{r.profile_us:.2f}", "yes" if r.us == fastest else f"no: {fastest:.2f} (the step chose)",
                      "before its wait" if r.release_early else "after its wait", str(r.rejected))
    return table


def run_tune(model: str | None, shape: str | None, out, err) -> None:
    """`ffchat tune`: a progress bar per candidate, then a table of what was chosen against the profile."""
    from ffchat.tuning_cache import describe_megakernel

    label, config, group_size = shape_to_tune(model, shape)  # a wrong model name first, GPU or not
    if not torch.cuda.is_available():
        raise FfchatError("ffchat tune needs a CUDA GPU and none was found")
    device = torch.device("cuda")
    path, results, mega, seconds = tune_with_progress(label, config, group_size, device, err)
    out.print(results_table(f"{label} on {GpuIdentity.of(device).name}: decode GEMV tiles", results))
    out.print(f"whole-model kernel: {describe_megakernel(mega)}")
    out.print(f"tuned in {seconds:.1f} s; saved {path}")
