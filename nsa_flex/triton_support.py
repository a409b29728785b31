"""What the hand-written Triton kernels can take: the Triton package, a device, a dtype.

Triton is optional. It is needed only by the kernels (``backend="triton"``, the fused decode
step, the fused block selection and the Triton backward on CUDA); ``import nsa_flex``, the flex
and reference backends, the module and the PyTorch decode step work without it. The kernel
modules (:mod:`nsa_flex.kernels`) import Triton at their top, so nothing imports them before one
of these checks has passed. torch's CUDA wheels on Linux bring Triton with them.

This module says what *can* run; :mod:`nsa_flex.dispatch` decides what *does*.
"""

from __future__ import annotations

import os

import torch

from ._validation import resolve_device

INSTALL_TRITON = "pip install triton (or install nsa_flex with its extra: pip install 'nsa_flex[triton]')"

# The dtypes every kernel takes.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_missing(what: str = "this") -> str:
    """Why ``what`` cannot run for want of Triton: empty if ``import triton`` succeeds."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return f"{what} needs the `triton` package, which is not installed: {INSTALL_TRITON}"
    return ""


def interpreting() -> bool:
    """Whether Triton's CPU interpreter is on (``TRITON_INTERPRET=1``, set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device: torch.device) -> tuple[bool, str]:
    """Whether the kernels can run on ``device`` (a ``torch.device`` or a string), and why not."""
    device = resolve_device(device)
    missing = triton_missing("the triton backend")
    if missing:
        return False, missing
    if device.type == "cuda" or interpreting():
        return True, ""
    return False, (
        f"the triton backend runs on CUDA tensors (got {device}); on the CPU only under "
        "Triton's interpreter, TRITON_INTERPRET=1 set before importing nsa_flex"
    )


def triton_refusal(device: torch.device, dtype: torch.dtype) -> tuple[type[Exception], str] | None:
    """``None`` when the kernels can take tensors of ``dtype`` on ``device``; otherwise the
    exception class and message saying why: ``ImportError`` without Triton (naming what to
    install), ``ValueError`` for the device, ``TypeError`` for the dtype."""
    missing = triton_missing("the triton backend")
    if missing:
        return ImportError, missing
    ok, why = available(device)
    if not ok:
        return ValueError, why
    if dtype not in KERNEL_DTYPES:
        return TypeError, f"the triton backend takes float16, bfloat16 or float32, got {dtype}"
    if dtype == torch.bfloat16 and device.type == "cpu":
        # Triton's interpreter computes bf16 tl.dot wrongly (seen with triton 3.9); refuse
        # rather than return garbage. float16 and float32 interpret fine.
        return TypeError, "the triton backend under Triton's CPU interpreter takes float16 or float32, not bfloat16"
    return None


def check_triton(q: torch.Tensor) -> None:
    """Raise unless the kernels can run on ``q``'s device and dtype (:func:`triton_refusal`)."""
    refusal = triton_refusal(q.device, q.dtype)
    if refusal is not None:
        exc, message = refusal
        raise exc(message)
