"""Timestamps from inside the whole-model kernel: where a persistent launch's step goes.

A profiler sees the megakernel as one launch. With a trace buffer, every schedule entry
records three stamps: when its program starts it, when its wait is over (its inputs are
ready), and when it is done (a program's last entry of a stage also publishes its items).
On the GPU a stamp is ``%globaltimer`` (ns).
The interpreter has no clock and no inline asm, so there a stamp is the next value of a
counter in the buffer's last cell: programs run one after another there, so the order, and
the analysis built on it, are still exercised. Without a buffer the stamps compile away.

``stage_times`` turns the stamps into one row per stage of the step; ``op_summary`` adds the
rows of each op over the layers into its share of the critical path: from the previous stage's
last entry done to this stage's, split into the release (until this stage's first waiter got
through) and the rest (its items' work and its stragglers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ffchat.kernels.schedule import OP_NAMES, Stage

STAMPS = 3  # per schedule entry: started, inputs ready, done
STARTED, READY, DONE = range(STAMPS)


@triton.jit
def stamp(entry_ptr, which: tl.constexpr, clock_ptr, TRACE: tl.constexpr, INTERPRET: tl.constexpr):
    """Record stamp ``which`` of a schedule entry (nothing unless TRACE)."""
    if TRACE:
        if INTERPRET:
            now = tl.atomic_add(clock_ptr, 1).to(tl.int64)
        else:
            now = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False,
                                            pack=1)
        tl.store(entry_ptr + which, now)


def trace_buffer(schedule: torch.Tensor) -> torch.Tensor:
    """Zeroed int64 stamps for a [programs, slots + 1, FIELDS] schedule, and the interpreter's clock cell last."""
    programs, slots = schedule.shape[0], schedule.shape[1] - 1
    return torch.zeros(programs * slots * STAMPS + 1, dtype=torch.int64, device=schedule.device)


@dataclass(frozen=True)
class StageTime:
    """One stage's stamps, relative to the step's first one: its first start, first and last entry through its
    wait, first and last entry done (ns on the GPU, ticks in the interpreter)."""

    stage: Stage
    started: int
    first_ready: int
    last_ready: int
    first_done: int
    last_done: int


@dataclass(frozen=True)
class OpTime:
    """An op's share of the step, summed over its stages (one per layer): critical = release + work."""

    op: str
    stages: int
    critical: int
    release: int
    work: int


def stage_times(stages: list[Stage], schedule: torch.Tensor, trace: torch.Tensor) -> list[StageTime]:
    """A row per stage, in the step's order, from a traced launch of ``schedule``."""
    entries = schedule[:, :-1].cpu()
    stamps = trace[:-1].view(entries.shape[0], entries.shape[1], STAMPS).cpu()
    real = entries[:, :, 0] != 0  # padding no-ops run no op
    origin = int(stamps[real][:, STARTED].min())
    rows = []
    for index, stage in enumerate(stages):
        mine = stamps[real & (entries[:, :, 5] == index)] - origin  # field 5: the counter (= index) it adds to
        if not len(mine):
            raise ValueError(f"the schedule has no entry of stage {index} ({stage.name})")
        rows.append(StageTime(stage, int(mine[:, STARTED].min()), int(mine[:, READY].min()),
                              int(mine[:, READY].max()), int(mine[:, DONE].min()), int(mine[:, DONE].max())))
    return rows


def op_summary(rows: list[StageTime]) -> list[OpTime]:
    """Each op's critical-path share of the step, in the order ops first appear."""
    totals: dict[str, list[int]] = {}
    previous = 0
    for row in rows:
        total = totals.setdefault(OP_NAMES[row.stage.op], [0, 0, 0])
        release = max(row.first_ready - previous, 0)
        total[0] += 1
        total[1] += row.last_done - previous
        total[2] += release
        previous = row.last_done
    return [OpTime(op, count, critical, release, critical - release)
            for op, (count, critical, release) in totals.items()]
