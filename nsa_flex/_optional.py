"""Optional dependencies: whether Triton can be imported, and what to say when it cannot.

Triton is needed only by the hand-written kernels (``backend="triton"``, the fused decode step,
the fused block selection on CUDA). ``import nsa_flex``, the flex and reference backends, the
module and the PyTorch decode step work without it. The kernel modules (``triton_kernels.py``,
``selection_kernels.py``, ``decode_kernels.py``) import Triton at their top, so nothing imports
them before one of these checks has passed. torch's CUDA wheels on Linux bring Triton with them.
"""

from __future__ import annotations

INSTALL_TRITON = "pip install triton (or install nsa_flex with its extra: pip install 'nsa_flex[triton]')"


def triton_missing(what: str = "this") -> str:
    """Why ``what`` cannot run for want of Triton: empty if ``import triton`` succeeds."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return f"{what} needs the `triton` package, which is not installed: {INSTALL_TRITON}"
    return ""
