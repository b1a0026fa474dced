"""The whole-model kernel's schedule: which program runs which work item of which op, as data.

A decode step is a chain of ops (``OPS``): the embedding row, then per layer norm+QKV,
attention (with RoPE, KV append and the combine of its shares), O+residual, norm+gate/up+SiLU,
down+residual, and finally norm+LM head. Each op is cut into items (row blocks of a GEMV,
(KV head, share) pairs of attention). The schedule is an int32 tensor [programs, slots,
FIELDS]: row p is program p's list of items, in order. Keeping it data means a change of
assignment, balance or order is a host-side change the kernel never sees, and a test can
hand the kernel a deliberately broken one.

Every op has one counter, its finished items. An item waits for the counter of the op before
it to reach that op's item count: every op reads all of its predecessor's output (a norm over
the whole vector, a GEMV over all of K), and by induction everything older is finished too,
so no buffer is overwritten while someone still reads it. Only a program's first item of an
op polls (its later items of that op know the answer), and only its last publishes, adding
all of its items of that op at once: one atomic each way per op and program.

Items are dealt round-robin, continuing from op to op, so every program gets an equal share
of every op and the leftovers of one op fall on other programs than the last. Per program the
order is the ops' order, which cannot deadlock when all programs are resident: a program
waits only on items of earlier ops, which wait only on earlier ones still.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

OP_NOP, OP_EMBED, OP_QKV, OP_ATTENTION, OP_O, OP_GATE_UP, OP_DOWN, OP_HEAD = range(8)
LAYER_OPS = (OP_QKV, OP_ATTENTION, OP_O, OP_GATE_UP, OP_DOWN)
OP_NAMES = {OP_EMBED: "embed", OP_QKV: "qkv", OP_ATTENTION: "attention", OP_O: "o", OP_GATE_UP: "gate_up",
            OP_DOWN: "down", OP_HEAD: "head"}

# Fields of one schedule entry: (op, layer, item, wait counter, wait target, done counter, done count, unused).
FIELDS = 8
NO_COUNTER = 0  # a wait of target 0 and a done count of 0 never touch a counter


@dataclass(frozen=True)
class Stage:
    """One op of one layer, cut into ``items``; its counter is its index in the step's list of stages."""

    op: int
    layer: int
    items: int

    @property
    def name(self) -> str:
        return OP_NAMES[self.op] if self.op in (OP_EMBED, OP_HEAD) else f"layer {self.layer} {OP_NAMES[self.op]}"


def decode_stages(num_layers: int, items: dict[int, int]) -> list[Stage]:
    """The stages of one decode step, in order; ``items`` gives each op's item count."""
    stages = [Stage(OP_EMBED, 0, items[OP_EMBED])]
    stages += [Stage(op, layer, items[op]) for layer in range(num_layers) for op in LAYER_OPS]
    return stages + [Stage(OP_HEAD, 0, items[OP_HEAD])]


def build_schedule(stages: list[Stage], num_programs: int) -> torch.Tensor:
    """int32 [num_programs, slots + 1, FIELDS]: each program's entries, padded with no-ops.

    The extra last slot is a no-op for every program, so the kernel may read the entry after
    its last one while it runs that one.
    """
    if num_programs < 1 or any(stage.items < 1 for stage in stages):
        raise ValueError("a schedule needs at least one program and one item per stage")
    lists: list[list[list[int]]] = [[] for _ in range(num_programs)]
    first_program = 0
    for index, stage in enumerate(stages):
        wait_counter, wait_target = (index - 1, stages[index - 1].items) if index else (NO_COUNTER, 0)
        mine: dict[int, list[list[int]]] = {}
        for item in range(stage.items):
            program = (first_program + item) % num_programs
            mine.setdefault(program, []).append([stage.op, stage.layer, item, wait_counter, 0, index, 0, 0])
        for program, entries in mine.items():
            entries[0][4] = wait_target  # the first item of this stage on this program polls
            entries[-1][6] = len(entries)  # the last publishes them all
            lists[program] += entries
        first_program = (first_program + stage.items) % num_programs
    slots = max(len(entries) for entries in lists) + 1
    schedule = torch.zeros(num_programs, slots, FIELDS, dtype=torch.int32)
    for program, entries in enumerate(lists):
        if entries:
            schedule[program, : len(entries)] = torch.tensor(entries, dtype=torch.int32)
    return schedule


def stage_of_error(stages: list[Stage], flag: int) -> str:
    """What an error flag names: the stage whose counter a wait gave up on (flag = counter index + 1)."""
    index = flag - 1
    return stages[index].name if 0 <= index < len(stages) else f"unknown counter {index}"
