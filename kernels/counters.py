"""Dependencies between the programs of one persistent launch: counters in global memory, capped spins.

The whole-model kernel (``ffchat.kernels.megakernel``) runs every op of a decode step in one
launch, so an op cannot rely on a kernel boundary to see its inputs. Each op instead counts
its finished items in a counter; a consumer polls the counter of the op it reads until the
count is reached. Two rules keep it safe:

* Ordering. A producer's threads meet at a block barrier before one of them adds with
  release semantics; a consumer's poll is an acquire, followed by a block barrier, so every
  thread's later loads see the producer's stores (the pattern of a cooperative grid sync).
* No hang. Every wait polls at most ``cap`` times. A wait that runs out sets the error flag
  to the index of the counter + 1 and returns, and later waits see the flag and do not spin:
  a broken schedule yields a wrong token and an error the host reads, never a hung GPU.

Under the interpreter programs run one after another, so a wait on a later program can
only run out: that is how the CPU tests see the flag.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def wait_count(counters_ptr, index, target, cap, error_ptr):
    """Poll counter ``index`` until it reaches ``target`` (nothing to do for target 0), at most ``cap`` times."""
    if target > 0:
        seen = tl.atomic_add(counters_ptr + index, 0, sem="acquire")
        failed = tl.atomic_add(error_ptr, 0, sem="relaxed") != 0  # an earlier wait ran out: do not spin again
        polls = tl.where(failed, cap, 0)
        while (seen < target) & (polls < cap):
            seen = tl.atomic_add(counters_ptr + index, 0, sem="acquire")
            polls += 1
        if seen < target:
            tl.atomic_xchg(error_ptr, index + 1)
    tl.debug_barrier()


@triton.jit
def add_count(counters_ptr, index, count):
    """Publish ``count`` finished items on counter ``index`` (nothing for 0)."""
    tl.debug_barrier()  # every thread's stores are issued before the release below
    if count > 0:
        tl.atomic_add(counters_ptr + index, count, sem="release")


@triton.jit
def reset_when_last(counters_ptr, exits_ptr, NUM_COUNTERS: tl.constexpr, NUM_PROGRAMS: tl.constexpr):
    """Called by every program at its end: the last one out zeroes the counters for the next launch.

    Nobody waits any more by then, so the next token starts from zero without a host round trip.
    """
    tl.debug_barrier()
    if tl.atomic_add(exits_ptr, 1, sem="acq_rel") == NUM_PROGRAMS - 1:
        offs = tl.arange(0, NUM_COUNTERS)
        tl.store(counters_ptr + offs, tl.zeros((NUM_COUNTERS,), tl.int32))
        tl.atomic_xchg(exits_ptr, 0)
