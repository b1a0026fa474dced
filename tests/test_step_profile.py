"""benchmarks/step_profile.py's reading of a profiled step: each kernel's share of the critical path."""

from __future__ import annotations

import pytest

from benchmarks.step_profile import LAYER_KERNELS, SKIPPED_STEPS, critical_path

LAYERS = 2


def step(start: float, spacings: list[float], overlap: float = 0.5) -> list[tuple[float, float]]:
    """One step's kernels (start, duration): each ends ``spacing`` after the one before and started ``overlap``
    before that one ended, as under PDL."""
    kernels, end = [(start, 1.0)], start + 1.0
    for spacing in spacings:
        kernels.append((end - overlap, spacing + overlap))
        end += spacing
    return kernels


def test_each_kernel_is_charged_the_time_from_the_previous_end_to_its_own():
    layer = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    head = 40.0
    steps = SKIPPED_STEPS + 3
    kernels = [k for i in range(steps) for k in step(1000.0 * i, layer * LAYERS + [head])]
    table = critical_path(kernels, LAYERS, steps)
    assert [table[name] for name in LAYER_KERNELS] == pytest.approx(layer)
    assert table["LM head"] == pytest.approx(head)
    assert table["step"] == pytest.approx(1.0 + LAYERS * sum(layer) + head)


def test_a_step_of_other_kernels_is_refused():
    kernels = step(0.0, [1.0] * (6 * LAYERS + 2))  # one kernel too many, as a logits copy would be
    with pytest.raises(ValueError, match="kernels a step"):
        critical_path(kernels, LAYERS, 1)
