"""`ffchat tune`'s search space and its cache (the timing itself needs a GPU: tests/gpu/test_tune_gpu.py)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from ffchat import tune, tuning_cache
from ffchat.kernels.int4_gemv import GemvConfig, pick_config
from ffchat.profiles import GpuIdentity
from ffchat.shapes import shape_config
from ffchat.megakernel_backend import default_config
from ffchat.tune import (
    DP2A, DP2A_ROW_LOOPS, MEGAKERNEL_CANDIDATES, W4A16, Contender, ProblemResult, candidates, contenders,
    megakernel_candidates,
)
from ffchat.tuning_cache import (
    GemvProblem, MegakernelTuning, decode_problems, describe_megakernel, load_tuning, save_tuning, tuning_path,
)

GPU = GpuIdentity("NVIDIA H200", (9, 0), 132, "580.159.04", "13.0", "3.6.0")
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton" / "cache"))


def test_tuning_lives_beside_the_triton_cache(tmp_path):
    assert tuning_cache.tuning_dir() == tmp_path / "triton" / "ffchat-tuning"


def test_decode_problems_are_the_launches_of_a_step():
    problems = {p.role: p for p in decode_problems(shape_config("llama-3.2-1b"), 128)}
    assert problems["qkv"] == GemvProblem("qkv", 3072, 2048, 128, norm=True)
    assert problems["o"] == GemvProblem("o", 2048, 2048, 128, residual=True)
    assert problems["gate_up"] == GemvProblem("gate_up", 16384, 2048, 128, gated=True, norm=True)
    assert problems["down"] == GemvProblem("down", 2048, 8192, 128, residual=True)
    assert problems["head"] == GemvProblem("head", 128256, 2048, 128, norm=True)
    qwen = {p.role: p for p in decode_problems(shape_config("qwen2.5-0.5b"), 128)}
    assert (qwen["qkv"].n, qwen["qkv"].k, qwen["down"].k) == (1152, 896, 4864)
    assert [p.group_size for p in decode_problems(shape_config("qwen2.5-0.5b"), 256)][:2] == [128, 128]  # 896 = 7 * 128


@pytest.mark.parametrize("role", ["qkv", "gate_up", "down", "head"])
def test_candidates_start_with_the_profile_and_fit_the_problem(role):
    problem = {p.role: p for p in decode_problems(shape_config("qwen2.5-0.5b"), 128)}[role]
    found = candidates(problem, CPU)
    assert found[0] == (W4A16, pick_config(problem.n, problem.k, problem.group_size, gated=problem.gated, device=CPU))
    assert len(found) == len(set(found))
    kernels = [kernel for kernel, _ in found]
    assert kernels.count(W4A16) >= 4 and kernels.count(DP2A) >= 4 and set(kernels) == {W4A16, DP2A}
    dp2a = next(cfg for kernel, cfg in found if kernel == DP2A)
    assert dp2a == pick_config(problem.n, problem.k, problem.group_size, gated=problem.gated, w4a8=True, device=CPU)
    outputs = problem.n // 2 if problem.gated else problem.n
    for kernel, cfg in found:
        assert cfg.block_n <= outputs and cfg.block_k % problem.group_size == 0
        assert cfg.split_k == 1 or kernel == DP2A and cfg.split_k <= -(-problem.k // cfg.block_k), "K slices fit K"
        assert not (kernel == DP2A and cfg.prefetch), "prefetch is a W4A16 option"


def test_word_a_lane_tiles_go_to_every_gemv_whose_shape_they_run():
    """Every 8B GEMV gets the word-a-lane tiles (gate/up's count outputs, 8 gate and 8 up rows); the 0.5B down (K 4864
    in no whole tile) and the 0.5B q/k/v (1152 rows of 896: a 1024- or 2048-input tile) do not."""
    for problem in decode_problems(shape_config("llama-3.1-8b"), 128):
        lanes = [cfg for kernel, cfg in candidates(problem, CPU) if kernel == tune.LANES]
        rows = 8 if problem.gated else 16
        assert lanes == [GemvConfig(rows, block_k, warps, prefetch=prefetch) for block_k, warps, prefetch in
                         tune.LANE_TILES], problem.role
    for problem in decode_problems(shape_config("qwen2.5-0.5b"), 128):
        if problem.role in ("down", "qkv"):
            assert tune.LANES not in {kernel for kernel, _ in candidates(problem, CPU)}, problem.role


def test_row_loops_go_to_lm_heads_and_gemvs_of_a_row_block_an_sm_with_all_of_k_in_one_tile(monkeypatch):
    monkeypatch.setattr(tune, "sm_count", lambda device: 132)  # an H100's
    problems = {p.role: p for p in decode_problems(shape_config("llama-3.2-1b"), 128)}

    def looped(role):
        return [(kernel, cfg) for kernel, cfg in candidates(problems[role], CPU) if cfg.programs_per_sm]

    assert len(looped("head")) == len(DP2A_ROW_LOOPS)
    # gate/up: 8192 outputs in blocks of 8 (16 rows of 2048) make 3.9 blocks a program at two an SM
    assert [(cfg.block_n, cfg.num_warps, cfg.programs_per_sm) for _, cfg in looped("gate_up")] == [(8, 4, 2),
                                                                                                   (4, 4, 4)]
    for role in ("head", "gate_up"):
        assert all(kernel == DP2A and cfg.block_k >= problems[role].k and cfg.split_k == 1
                   for kernel, cfg in looped(role))
    # o: 2048 rows of 2048 inputs; the 4096-word tile (16 rows) leaves 128 row blocks, fewer than the SMs
    assert [(cfg.block_n, cfg.programs_per_sm) for _, cfg in looped("o")] == [(8, 4)]
    # down: all of K = 8192 in a 4096-word tile leaves 4 rows, 512 blocks; K is too long for the 2048-word tile
    assert [(cfg.block_n, cfg.block_k, cfg.programs_per_sm) for _, cfg in looped("down")] == [(4, 8192, 2)]
    qwen_o = next(p for p in decode_problems(shape_config("qwen2.5-0.5b"), 128) if p.role == "o")
    assert not [cfg for _, cfg in candidates(qwen_o, CPU) if cfg.programs_per_sm]  # 896 rows: under 132 blocks
    gate_up_8b = next(p for p in decode_problems(shape_config("llama-3.1-8b"), 128) if p.role == "gate_up")
    assert [(cfg.block_n, cfg.programs_per_sm) for _, cfg in candidates(gate_up_8b, CPU) if cfg.programs_per_sm] \
        == [(4, 2), (2, 4)]
    down_8b = next(p for p in decode_problems(shape_config("llama-3.1-8b"), 128) if p.role == "down")
    assert [(cfg.block_n, cfg.block_k, cfg.programs_per_sm) for _, cfg in candidates(down_8b, CPU)
            if cfg.programs_per_sm] == [(2, 16384, 2)]  # K 14336: only the tile of two programs an SM


def result(problem, block_n, kernel=W4A16):
    return ProblemResult(problem, GemvConfig(block_n=block_n, block_k=1024, num_warps=4), 2.0, 2.5, 0, kernel)


LLAMA_1B = shape_config("llama-3.2-1b")
MEGAKERNEL = MegakernelTuning({"programs": 264, "num_warps": 4, "tiles": {}}, 480.0, 500.0, [512, 4096], 0, 13)


def test_a_saved_tuning_is_found_again_and_only_for_its_gpu_and_shape():
    problems = decode_problems(LLAMA_1B, 128)
    path = tuning_path(GPU, LLAMA_1B, 128)
    results = [result(p, 8, DP2A if p.role == "head" else W4A16) for p in problems]
    results[0] = dataclasses.replace(results[0], runners_up=(Contender(DP2A, GemvConfig(16, 2048, 8), 1.9),),
                                     release_early=True)
    save_tuning(path, GPU, results, 12.5, MEGAKERNEL)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    assert json.loads(path.read_text())["gemv"]["qkv"]["runners_up"] == [
        {"kernel": DP2A, "config": dataclasses.asdict(GemvConfig(16, 2048, 8)), "us": 1.9}], "what the step weighed"
    loaded = load_tuning(GPU, LLAMA_1B, 128)
    assert set(loaded.gemv) == {p.role for p in problems}
    assert GemvConfig(**loaded.gemv["down"]) == GemvConfig(block_n=8, block_k=1024, num_warps=4)
    assert loaded.kernels == {p.role: DP2A if p.role == "head" else W4A16 for p in problems}
    assert loaded.megakernel == MEGAKERNEL and loaded.megakernel.faster
    assert loaded.release_early == {"qkv"}, "the roles that release the next launch before their wait"
    other_driver = GpuIdentity(*{**GPU.__dict__, "driver": "590.1"}.values())
    assert load_tuning(other_driver, LLAMA_1B, 128) is None
    assert load_tuning(GPU, LLAMA_1B, 64) is None
    assert load_tuning(GPU, shape_config("qwen2.5-0.5b"), 128) is None
    fewer_layers = dataclasses.replace(LLAMA_1B, num_layers=LLAMA_1B.num_layers - 1)  # same GEMVs, other schedule
    assert load_tuning(GPU, fewer_layers, 128) is None


def test_a_tuning_without_the_megakernel_says_so():
    save_tuning(tuning_path(GPU, LLAMA_1B, 128), GPU, [result(p, 8) for p in decode_problems(LLAMA_1B, 128)], 1.0)
    assert load_tuning(GPU, LLAMA_1B, 128).megakernel is None
    assert describe_megakernel(None) == "whole-model kernel not tuned"
    assert describe_megakernel(MEGAKERNEL) == ("auto runs the megakernel (megakernel 480 us, fastest of 13 "
                                               "configurations, triton 500 us per step at 512 and 4096 tokens, "
                                               "averaged)")
    slower = dataclasses.replace(MEGAKERNEL, us=600.0)
    assert not slower.faster and describe_megakernel(slower).startswith("auto runs the triton backend")
    failed = MegakernelTuning({}, math.inf, 500.0, [512, 4096], 2, 13)
    assert not failed.faster and "no megakernel configuration passed" in describe_megakernel(failed)


def test_the_megakernel_search_covers_tiles_grids_warps_and_attention_within_the_registers():
    """On a GPU of 132 SMs with 64K registers each: every candidate distinct, the default first, all resident."""
    from ffchat.megakernel_backend import MegakernelBackend
    from ffchat.shapes import random_weights

    model = MegakernelBackend(random_weights(shape_config("tiny"), label="tiny", int4=True, device="cpu"), 64).model
    default = dataclasses.replace(default_config(model, CPU), programs=264)
    tuned = {role: dataclasses.replace(tile, block_n=max(1, tile.block_n // 2), max_registers=128)
             for role, tile in default.tiles.items()}
    found = megakernel_candidates(default, tuned, 132, 65536, model.num_kv_heads)
    assert found[0] == default and all(found.count(c) == 1 for c in found) and len(found) <= MEGAKERNEL_CANDIDATES
    grids = {(c.programs, c.num_warps, c.max_registers) for c in found}
    assert grids == {(264, 4, None), (396, 4, 168), (132, 8, None)}
    assert {c.attention_block for c in found} == {64, 32} and len({c.attention_splits for c in found}) >= 2
    halved = {role: dataclasses.replace(tile, max_registers=None, prefetch=True) for role, tile in tuned.items()}
    assert {tuple(sorted(c.tiles.items())) for c in found} == {tuple(sorted(default.tiles.items())),
                                                              tuple(sorted(halved.items()))}
    for c in found:  # a thread holds at most 255 registers; the programs of one SM share 64K
        assert c.programs // 132 * c.num_warps * 32 * (c.max_registers or 256) <= 65536
    without_head = megakernel_candidates(default, {r: t for r, t in tuned.items() if r != "head"}, 132, 65536,
                                         model.num_kv_heads)
    assert all(c.tiles["head"] == default.tiles["head"] for c in without_head), \
        "a role tuned to the dp2a kernel keeps the profile's tile in the megakernel"


@pytest.mark.parametrize("damage", ["truncate", "format"])
def test_a_damaged_tuning_file_is_ignored(damage):
    problems = decode_problems(LLAMA_1B, 128)
    path = tuning_path(GPU, LLAMA_1B, 128)
    save_tuning(path, GPU, [result(p, 16) for p in problems], 3.0)
    text = path.read_text()
    path.write_text(text[: len(text) // 2] if damage == "truncate" else json.dumps({**json.loads(text), "format": 99}))
    assert load_tuning(GPU, LLAMA_1B, 128) is None


def test_status_without_a_gpu():
    assert tuning_cache.tuning_status(shape_config("llama-3.2-1b"), 128) == "no CUDA GPU here"


def test_tune_without_a_gpu_is_one_clear_error(tmp_path):
    from cli_helpers import assert_only_error_line, ffchat

    result = ffchat("tune", "--shape", "llama-3.2-1b", FFCHAT_HOME=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    assert_only_error_line(result, "ffchat tune needs a CUDA GPU")
    assert not (tmp_path / "triton").exists()


def test_tune_names_the_model_problem_before_the_gpu(tmp_path, tiny_model_dir):
    from cli_helpers import assert_only_error_line, ffchat

    home = {"FFCHAT_HOME": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    assert_only_error_line(ffchat("tune", "nope", **home), "model 'nope' not found")
    assert ffchat("pull", str(tiny_model_dir("llama")), "--name", "tiny", **home).returncode == 0
    assert_only_error_line(ffchat("tune", "tiny", **home), "tiny has no INT4 weights", "ffchat quantize tiny")
    assert_only_error_line(ffchat("tune", "tiny", "--shape", "tiny", **home), "not both")


def tile(block_n):
    return GemvConfig(block_n=block_n, block_k=1024, num_warps=4)


def test_contenders_are_the_fastest_of_each_kernel_and_the_near_ties():
    timed = [Contender(W4A16, tile(8), 10.0), Contender(W4A16, tile(16), 10.5), Contender(W4A16, tile(32), 12.0),
             Contender(DP2A, tile(8), 14.0), Contender(DP2A, tile(16), 9.9)]
    assert contenders(timed) == [Contender(DP2A, tile(16), 9.9), Contender(W4A16, tile(8), 10.0),
                                 Contender(W4A16, tile(16), 10.5)]
    # the other kernel's fastest is always one, however slow; a third within NEAR_TIE only
    assert contenders(timed[2:4]) == [Contender(W4A16, tile(32), 12.0), Contender(DP2A, tile(8), 14.0)]
    assert contenders(timed[:3]) == [Contender(W4A16, tile(8), 10.0), Contender(W4A16, tile(16), 10.5)]
    assert contenders(timed[2:3]) == [Contender(W4A16, tile(32), 12.0)]


def test_the_table_says_where_the_step_chose_a_tile_not_fastest_alone():
    from rich.console import Console

    problems = decode_problems(LLAMA_1B, 128)
    results = [result(p, 8) for p in problems]
    results[2] = dataclasses.replace(results[2], us=7.2, runners_up=(Contender(DP2A, tile(8), 7.0),))
    console = Console(width=200, record=True)
    console.print(tune.results_table("1B", results))
    rows = {line.split("│")[1].strip(): line for line in console.export_text().splitlines() if line.count("│") > 3}
    assert "no: 7.00 (the step chose)" in rows["gate_up"] and "7.20" in rows["gate_up"]
    assert all("yes" in rows[p.role] for p in problems if p.role != "gate_up")
    assert all("after its wait" in rows[p.role] for p in problems)
    results[0] = dataclasses.replace(results[0], release_early=True)
    console = Console(width=200, record=True)
    console.print(tune.results_table("1B", results))
    rows = {line.split("│")[1].strip(): line for line in console.export_text().splitlines() if line.count("│") > 3}
    assert "before its wait" in rows["qkv"] and "after its wait" in rows["o"]


def test_show_names_the_roles_that_release_early(monkeypatch):
    """`ffchat show`'s tuning line says which GEMVs run which kernel and which let the next launch start before their
    wait."""
    monkeypatch.setattr(tuning_cache.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(GpuIdentity, "of", classmethod(lambda cls, device: GPU))
    results = [dataclasses.replace(result(p, 8, tune.LANES if p.role == "down" else DP2A),
                                   release_early=p.role in ("o", "qkv")) for p in decode_problems(LLAMA_1B, 128)]
    save_tuning(tuning_path(GPU, LLAMA_1B, 128), GPU, results, 1.0)
    status = tuning_cache.tuning_status(LLAMA_1B, 128)
    assert "GEMVs on dp2a: gate_up, head, o, qkv; GEMVs on the word-a-lane kernel: down; releasing the next launch " \
           "before their wait: o, qkv;" in status


class FakeBackend:
    """Times a step as the sum of fixed per-(role, kernel, block_n) costs: the step, not the GEMV alone, decides."""

    costs: dict = {}
    early_costs: dict = {}
    steps = 0
    drift = 0.0

    def __init__(self, weights, context):
        self.tuning, self.role_kernels, self.early_release_roles = None, {}, frozenset()

    def use_kernels(self, tuning, role_kernels, early_release_roles):
        self.tuning, self.role_kernels, self.early_release_roles = tuning, role_kernels, early_release_roles


def fake_median_step_us(backend, context, tokens, repeats):
    """The tiles' costs, plus or minus what releasing early changes in a role (``early_costs``), plus ``drift`` for
    every step timed before: the GPU slowing down (or, negative, speeding up) while tune runs."""
    FakeBackend.steps += 1
    return FakeBackend.drift * FakeBackend.steps + sum(
        FakeBackend.costs.get((role, backend.role_kernels.get(role, W4A16), cfg.block_n), 10.0)
        + FakeBackend.early_costs.get(role, 0.0) * (role in backend.early_release_roles)
        for role, cfg in backend.tuning.items())


@pytest.fixture
def fake_steps(monkeypatch):
    """``settle_on_step`` on ``FakeBackend``: no GPU, every step's time from ``fake_median_step_us``."""
    from ffchat import bench, triton_backend

    FakeBackend.costs, FakeBackend.early_costs, FakeBackend.steps, FakeBackend.drift = {}, {}, 0, 0.0
    monkeypatch.setattr(triton_backend, "TritonBackend", FakeBackend)
    monkeypatch.setattr(bench, "fill_cache", lambda backend, context, tokens: None)
    monkeypatch.setattr(tune, "median_step_us", fake_median_step_us)
    return type("Weights", (), {"config": LLAMA_1B})()


def test_the_step_settles_each_role_among_its_contenders(monkeypatch, fake_steps):
    """Timed alone gate/up won with dp2a and the head with W4A16 16-row tiles; in the step W4A16 is faster for gate/up
    and the head's 8-row runner-up is, so those replace them; down's runner-up is slower in the step and loses."""
    problems = {p.role: p for p in decode_problems(LLAMA_1B, 128)}
    results = [result(problems["qkv"], 8),
               dataclasses.replace(result(problems["gate_up"], 8, DP2A), us=7.0,
                                   runners_up=(Contender(W4A16, tile(16), 7.2),)),
               dataclasses.replace(result(problems["down"], 4), us=5.0, runners_up=(Contender(DP2A, tile(4), 5.1),)),
               dataclasses.replace(result(problems["head"], 16), us=40.0,
                                   runners_up=(Contender(W4A16, tile(32), 40.5), Contender(W4A16, tile(8), 41.0)))]
    FakeBackend.costs = {("gate_up", DP2A, 8): 7.5, ("gate_up", W4A16, 16): 7.0, ("down", W4A16, 4): 5.0,
                         ("down", DP2A, 4): 5.5, ("head", W4A16, 16): 42.0, ("head", W4A16, 32): 41.5,
                         ("head", W4A16, 8): 40.0}
    FakeBackend.early_costs = {"qkv": -0.5, "down": -3.0}  # down would gain more, but is not a release contender
    weights = fake_steps
    calls = []
    settled = {r.problem.role: r for r in tune.settle_on_step(weights, results, lambda: calls.append(1))}
    assert (settled["gate_up"].kernel, settled["gate_up"].config, settled["gate_up"].us) == (W4A16, tile(16), 7.2)
    assert settled["gate_up"].runners_up == (Contender(DP2A, tile(8), 7.0),), "the loser stays a contender"
    assert (settled["head"].config, settled["head"].us) == (tile(8), 41.0)
    assert settled["down"] == results[2], "its runner-up lost, and its release order is not tried"
    assert settled["qkv"] == dataclasses.replace(results[0], release_early=True), "the step is faster so"
    assert len(calls) == 5, "each runner-up once, the q/k/v order"
    assert FakeBackend.steps == 5 * len(tune.PAIRED_ORDER) * len(tune.TUNE_CONTEXTS), "each beside the choice"
    assert len(calls) == tune.trials_to_settle(results) <= tune.steps_to_settle(LLAMA_1B, 128)

    FakeBackend.early_costs = {"qkv": +0.5}
    slower = {r.problem.role: r for r in tune.settle_on_step(weights, results)}
    assert not slower["qkv"].release_early, "releasing first made the step slower: q/k/v keeps its order"
    plain = [result(p, 8) for p in problems.values()]
    monkeypatch.setattr(tune, "RELEASE_CONTENDERS", ())
    assert tune.settle_on_step(None, plain) is plain, "nothing to settle: no step is timed"


@pytest.mark.parametrize("drift", [0.2, -0.2])
def test_a_drift_in_the_gpus_speed_does_not_settle_a_role(fake_steps, drift):
    """The runner-up is 0.1 us faster in the step while each timing drifts by more: timed beside the choice, it
    wins however the GPU drifts; a runner-up 0.1 us slower loses however it drifts."""
    problems = {p.role: p for p in decode_problems(LLAMA_1B, 128)}
    results = [dataclasses.replace(result(problems["down"], 4), runners_up=(Contender(W4A16, tile(8), 5.1),))]
    FakeBackend.early_costs, FakeBackend.drift = {}, drift
    FakeBackend.costs = {("down", W4A16, 4): 5.0, ("down", W4A16, 8): 4.9}
    assert tune.settle_on_step(fake_steps, results)[0].config == tile(8)
    FakeBackend.costs = {("down", W4A16, 4): 5.0, ("down", W4A16, 8): 5.1}
    assert tune.settle_on_step(fake_steps, results)[0] == results[0]
