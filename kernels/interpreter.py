"""Whether Triton runs a kernel in its CPU interpreter.

Triton decides when ``@triton.jit`` runs, from ``TRITON_INTERPRET`` at that moment: a kernel
module imported with ``TRITON_INTERPRET=1`` holds interpreted kernels for the rest of the
process. Launchers ask the kernel itself, so they agree with that decision whatever the
environment says later.
"""

from __future__ import annotations

import triton


def interpreted(kernel) -> bool:
    """True for a kernel that Triton interprets on the CPU (it then has no inline asm, no PDL, no bf16 dots)."""
    return not isinstance(kernel, triton.runtime.JITFunction)
