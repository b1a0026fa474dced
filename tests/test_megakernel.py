"""The whole-model kernel under TRITON_INTERPRET=1: one program running the sequential schedule, on tiny INT4
models of every family, against ``megakernel_reference`` and against the Triton backend; its schedule as data;
and the error flag when the schedule is broken.

The interpreter runs programs one after another, so a program waiting on a later one can never be
served: with two programs the round-robin schedule must raise the flag, not hang.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from factory import VOCAB_SIZE  # noqa: E402
from test_triton_backend import CONTEXT, assert_close, tiny_config  # noqa: E402

from ffchat.errors import FfchatError  # noqa: E402
from ffchat.kernels.megakernel import megakernel_reference  # noqa: E402
from ffchat.kernels.decode_attention import pick_config as pick_attention_config  # noqa: E402
from ffchat.kernels.trace import op_summary  # noqa: E402
from ffchat.kernels.schedule import (  # noqa: E402
    FIELDS, OP_ATTENTION, OP_EMBED, OP_HEAD, OP_QKV, Stage, build_schedule, decode_stages,
)
from ffchat.megakernel_backend import (  # noqa: E402
    MegakernelBackend, attention_splits, config_from_fields, default_config,
)
from ffchat.shapes import random_weights  # noqa: E402
from ffchat.triton_backend import TritonBackend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def weights_of(family: str, seed: int = 0):
    return random_weights(tiny_config(family), label=family, int4=True, seed=seed, group_size=32, device=DEVICE)


def prompt_of(length: int, seed: int = 1) -> list[int]:
    return torch.randint(0, VOCAB_SIZE, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


# --- the schedule -----------------------------------------------------------------------------


def test_schedule_deals_every_item_once_and_counts_it_once():
    stages = decode_stages(2, {OP_EMBED: 1, OP_QKV: 5, OP_ATTENTION: 4, 4: 3, 5: 7, 6: 3, OP_HEAD: 9})
    assert len(stages) == 2 + 5 * 2 and stages[1] == Stage(OP_QKV, 0, 5)
    schedule = build_schedule(stages, 3)
    assert schedule.shape[0] == 3 and schedule.shape[2] == FIELDS
    assert not schedule[:, -1].any(), "every program ends with a no-op slot"
    for index, stage in enumerate(stages):
        items, done = [], 0
        for program in range(3):
            mine = [e for e in schedule[program].tolist() if e[0] and e[5] == index]
            items += [e[2] for e in mine]
            done += sum(e[6] for e in mine)
            want = stages[index - 1].items if index else 0
            assert all(e[3] == max(index - 1, 0) and e[4] in (0, want) for e in mine), stage
            assert [e[4] for e in mine][:1] in ([], [want]), "a program's first item of a stage polls"
            assert all(e[4] == 0 for e in mine[1:]), "its later items of that stage do not"
        assert sorted(items) == list(range(stage.items)), stage
        assert done == stage.items, "the done counts add up to the stage's items"


def test_schedule_balances_and_keeps_the_order_of_ops():
    stages = decode_stages(1, {OP_EMBED: 1, OP_QKV: 4, OP_ATTENTION: 4, 4: 4, 5: 4, 6: 4, OP_HEAD: 5})
    schedule = build_schedule(stages, 4)
    for program in range(4):
        done = [c for c in schedule[program, :, 5].tolist()]
        ops = [c for c, op in zip(done, schedule[program, :, 0].tolist()) if op]
        assert ops == sorted(ops), "a program runs its items in the order of the stages"
        assert len(ops) in (6, 7)  # 27 items over 4 programs
    with pytest.raises(ValueError, match="at least one"):
        build_schedule(stages, 0)


# --- the kernel against its reference -----------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_kernel_matches_its_reference(family):
    """One step on a cache filled by a prompt: logits, the appended key and value, and no error."""
    backend = MegakernelBackend(weights_of(family), CONTEXT, dtype=torch.float16)
    assert backend.kernel_config.programs == 1
    backend.prefill(prompt_of(21))  # past mistral's 16-token window
    k, v = backend.k_cache.clone(), backend.v_cache.clone()
    want = megakernel_reference(backend.model, k, v, backend.rope_cos, backend.rope_sin, 5, 22)
    got = backend.decode(5)
    backend.check()
    assert_close(got, want.float())
    for got_cache, want_cache in ((backend.k_cache, k), (backend.v_cache, v)):
        assert (got_cache[:, :, 21] - want_cache[:, :, 21]).abs().max() < 2e-2
        assert torch.equal(got_cache[:, :, :21], want_cache[:, :, :21]), "earlier tokens are never written"
    assert not backend.state.counters.any() and not backend.state.exits.any(), "counters reset for the next step"
    assert not backend.attention_workspace.arrivals.any(), "each KV head's last share resets its arrival counter"


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_backend_decodes_as_the_triton_backend(family):
    """Same weights, same prefill: the greedy tokens of several steps agree and the logits stay close."""
    weights = weights_of(family, seed=3)
    mega = MegakernelBackend(weights, CONTEXT, dtype=torch.float16)
    triton = TritonBackend(weights, CONTEXT, dtype=torch.float16)
    prompt = prompt_of(9, seed=4)
    assert_close(mega.prefill(prompt), triton.prefill(prompt))
    token = 3
    for _ in range(4):
        want = triton.decode(token)
        got = mega.decode(token)
        assert_close(got, want)
        assert int(got.argmax()) == int(want.argmax())
        token = int(want.argmax())
    mega.check()


def test_attention_shares_fill_the_grid_whatever_the_context():
    """About one attention item per program per layer, never more than 32 shares per KV head: the Triton
    backend's workspace, sized for one KV head at the full context, would give 8 x 512 items at 128k."""
    assert [attention_splits(264, hkv) for hkv in (2, 8, 32)] == [32, 32, 8]
    assert attention_splits(1, 8) == 2 and attention_splits(100, 8) == 8
    assert pick_attention_config(131072, 1, num_sms=132).splits == 512
    long_context = 2048
    backend = MegakernelBackend(weights_of("llama"), long_context, dtype=torch.float16)
    splits = backend.kernel_config.attention_splits
    assert backend.attention_workspace.config == backend.kernel_config.attention_config()
    assert backend.attention_workspace.acc.shape[1] == splits == 2  # one program in the interpreter
    attention = [stage for stage in backend.state.stages if stage.op == OP_ATTENTION]
    assert {stage.items for stage in attention} == {backend.config.num_kv_heads * splits}
    backend.prefill(prompt_of(130))  # more keys than two shares of one 64-key block each
    want = megakernel_reference(backend.model, backend.k_cache.clone(), backend.v_cache.clone(), backend.rope_cos,
                                backend.rope_sin, 7, 131)
    assert_close(backend.decode(7), want.float())
    backend.check()


def test_a_config_survives_the_tuning_cache_round_trip():
    """The cache stores a config as JSON fields; read back it is the same config, tiles included."""
    model = MegakernelBackend(weights_of("qwen2"), CONTEXT, dtype=torch.float16).model
    config = replace(default_config(model, torch.device("cpu")), attention_splits=4)
    assert config_from_fields(json.loads(json.dumps(asdict(config)))) == config


# --- the trace -----------------------------------------------------------------------------------


def test_a_traced_step_stamps_every_stage_in_order_and_computes_the_same_logits():
    """One program in the interpreter: its stamps are a counter, so every stage starts, gets through its wait and
    publishes after the one before it, and the ops' shares of the step add up to the whole step."""
    backend = MegakernelBackend(weights_of("qwen3"), CONTEXT, dtype=torch.float16)
    backend.prefill(prompt_of(11))
    rows = backend.trace_step(6)
    traced = backend.logits.clone()
    assert backend.state.trace is None and backend.position == 11, "tracing leaves the backend as it was"
    assert [row.stage for row in rows] == backend.state.stages
    assert rows[0].started == 0
    for before, row in zip(rows, rows[1:]):
        assert before.last_done < row.first_ready, f"{row.stage.name} got through before its input was done"
    for row in rows:
        assert row.started <= row.first_ready < row.first_done <= row.last_done and row.last_ready < row.last_done
    ops = op_summary(rows)
    assert [op.op for op in ops] == ["embed", "qkv", "attention", "o", "gate_up", "down", "head"]
    assert {op.op: op.stages for op in ops}["qkv"] == backend.config.num_layers
    assert sum(op.critical for op in ops) == rows[-1].last_done
    assert all(op.critical == op.release + op.work and op.work > 0 for op in ops)
    assert torch.equal(backend.decode(6), traced), "the stamped kernel computes the step the graph does"


# --- a broken schedule raises the flag, it does not hang ---------------------------------------------


# A broken step computes on buffers its producers never wrote: numpy warns about the garbage.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_a_wait_that_can_never_be_met_sets_the_flag():
    weights = weights_of("llama")
    backend = MegakernelBackend(weights, CONTEXT, dtype=torch.float16)
    stages = backend.state.stages
    schedule = build_schedule(stages, 1)
    gate_up = next(i for i, s in enumerate(stages) if s.name == "layer 1 gate_up")
    first = (schedule[0, :, 5] == gate_up).nonzero()[0, 0]
    schedule[0, first, 4] += 1  # wait for one item more than layer 1's O projection has
    config = default_config(backend.model, backend.device)
    broken = MegakernelBackend(weights, CONTEXT, dtype=torch.float16, schedule=schedule,
                               config=replace(config, spin_cap=50))
    broken.prefill([1, 2, 3])
    broken.decode(4)
    with pytest.raises(FfchatError, match="stopped waiting for layer 1 o "):
        broken.check()
    assert int(broken.state.error[0]) == gate_up  # the counter index + 1 of the stage it waited for


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_two_programs_in_the_interpreter_raise_the_flag():
    """Program 0 runs to its end before program 1 starts, so it waits in vain for program 1's first items."""
    if DEVICE != "cpu":
        pytest.skip("only the interpreter runs programs one after another")
    weights = weights_of("llama")
    config = default_config(MegakernelBackend(weights, CONTEXT, dtype=torch.float16).model, torch.device("cpu"))
    backend = MegakernelBackend(weights, CONTEXT, dtype=torch.float16,
                                config=replace(config, programs=2, spin_cap=20))
    backend.prefill([1, 2, 3])
    backend.decode(4)
    with pytest.raises(FfchatError, match="stopped waiting"):
        backend.check()
