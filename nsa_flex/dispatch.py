"""Which implementation runs each NSA branch: decided once per call, up front, by :func:`plan`.

``backend`` names what the user asks for; the paths name what runs. Each is a good choice for
its case, and this is the one place that makes them:

| branch | paths |
|---|---|
| compressed | `"flex"`: FlexAttention (every backend but the reference) |
| scoring | `"given"`: `block_indices` were passed, nothing is scored; `"torch"`: chunked PyTorch softmax and `top_n.top_n_blocks`; `"triton"`: the Triton scoring and top-n kernels (`nsa_flex::select_blocks_fused`), two passes over `k_cmp`; `"triton_lse"`: the same op fed the compressed branch's log-sum-exp, one pass (that branch then runs first) |
| selected | `"flex"`: FlexAttention forward and backward; `"flex_fwd_triton_bwd"`: FlexAttention's forward, the Triton backward (`nsa_flex::attach_selected_backward`); `"triton"`: the Triton kernels, forward and backward (`nsa_flex::selected_attention`) |
| window | `"flex"`: FlexAttention |
| decode step | `"fused"`: Triton launches, four for a few rows or three for many rows of long contexts (``tuning.decode_batched``); `"torch"`: PyTorch operations (:func:`decode_path`) |

``backend="reference"`` runs every branch densely (``"reference"``). The Triton kernels are
picked without being asked for only on CUDA (:func:`_picks_kernels`), with no user modifiers
(the kernels run none), and for dtypes and head sizes they take. The facts read here are
static (device, dtype, shapes, the mods given, grad mode, ``torch.compile``), so a compiled
graph plans what an eager call plans.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._validation import FLEX_MIN_HEAD_DIM_CUDA, MAX_HEAD_DIM
from .triton_support import KERNEL_DTYPES, available, triton_missing, triton_refusal


class Paths(NamedTuple):
    """The path of each branch for one call (the module docstring lists them)."""

    compressed: str
    scoring: str
    selected: str
    window: str


def _picks_kernels(device: torch.device) -> bool:
    """Whether the Triton kernels are picked without being asked for: on CUDA. (Tests patch
    this one function to take the CUDA paths on the CPU, under Triton's interpreter.)"""
    return device.type == "cuda"


def needs_backward(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether a backward will run through ``q``, ``k`` or ``v``."""
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def scoring_path(q: Tensor, score_mod, mask_mod) -> str:
    """``"triton"`` or ``"torch"``: the scoring kernel computes plain scores, so it serves only
    calls without modifiers, of a dtype and head size it takes, with Triton installed."""
    if (_picks_kernels(q.device) and score_mod is None and mask_mod is None and q.dtype in KERNEL_DTYPES
            and q.shape[-1] <= MAX_HEAD_DIM and not triton_missing()):
        return "triton"
    return "torch"


def _selected_kernels_apply(q: Tensor, v: Tensor, has_score_mod: bool, has_mask_mod: bool) -> bool:
    """Whether the Triton selected-branch kernels can stand in for FlexAttention unasked."""
    Dk, Dv = q.shape[-1], v.shape[-1]
    return (_picks_kernels(q.device) and q.dtype in KERNEL_DTYPES and not has_score_mod and not has_mask_mod
            and FLEX_MIN_HEAD_DIM_CUDA <= min(Dk, Dv) and max(Dk, Dv) <= MAX_HEAD_DIM and available(q.device)[0])


def selected_path(q: Tensor, k: Tensor, v: Tensor, *, backend: str, has_score_mod: bool, has_mask_mod: bool,
                  packed: bool) -> str:
    """The selected branch's path. ``has_score_mod``: a score_mod reaches the branch (the
    user's, or ``selection_grad``'s straight-through one); ``packed``: ``cu_seqlens`` given."""
    if backend == "triton":
        return "triton"
    if not _selected_kernels_apply(q, v, has_score_mod, has_mask_mod):
        return "flex"
    if packed:
        # A packed row's doc-local blocks start anywhere, so FlexAttention would take 128x128
        # tiles (the union of the blocks of 128 / G tokens): at 64k in 8 documents (reference
        # shape, H200) its forward took 111 ms and its backward 339 ms, the Triton kernels'
        # 17 and 37 (docs/benchmarks.md). The kernels take packed rows themselves.
        return "triton"
    if q.is_cuda and torch.compiler.is_compiling():
        # Inside a CUDA graph of torch.compile the branch is the Triton kernels' op, forward and
        # backward: FlexAttention over the one-token tiles, traced into an Inductor graph, gave
        # wrong outputs when T * G is not a multiple of the tile (torch 2.11; eager calls
        # through the shared compiled FlexAttention were right); scripts/debug_compiled.py
        # shows it. (``q.is_cuda``, not the seam: this is about Inductor's CUDA code.)
        return "triton"
    # Eager CUDA training: FlexAttention's backward cannot take the one-token tiles
    # (tuning.flex_selected_tile says why), and over 128x128 tiles it does several times the
    # work; the Triton backward needs only the forward's output and log-sum-exp.
    return "flex_fwd_triton_bwd" if needs_backward(q, k, v) else "flex"


def plan(q: Tensor, k: Tensor, v: Tensor, *, backend: str, score_mod, mask_mod, docs, block_indices,
         selection_grad: bool) -> Paths:
    """Every branch's path for ``attend(q, k, v, ...)`` with these arguments (validated):
    ``docs`` a packed row's :class:`~nsa_flex.varlen.Documents` or ``None``.

    The same facts give the same plan eagerly and while tracing. On CUDA: scoring
    ``"triton_lse"`` (float16/bfloat16) or ``"triton"`` (float32) without mods;
    selected ``"triton"`` in compiled graphs and for packed rows, ``"flex_fwd_triton_bwd"`` in
    eager training,
    ``"flex"`` otherwise (always ``"triton"`` with ``backend="triton"``); everything else
    ``"torch"``/``"flex"``."""
    if backend == "reference":
        return Paths("reference", "reference", "reference", "reference")
    if block_indices is not None:
        scoring = "given"
    else:
        scoring = scoring_path(q, score_mod, mask_mod)
        if scoring == "triton" and q.dtype in (torch.float16, torch.bfloat16):
            # The compressed branch first: its log-sum-exp saves the scoring kernel a pass.
            # (float32 keeps the kernel's own: FlexAttention's float32 products follow the
            # global TF32 setting, the kernel's are exact, and p = exp(s - lse) mixes the two.)
            scoring = "triton_lse"
    selected = selected_path(q, k, v, backend=backend, has_score_mod=score_mod is not None or selection_grad,
                             has_mask_mod=mask_mod is not None, packed=docs is not None)
    return Paths("flex", scoring, selected, "flex")


def decode_path(q: Tensor, v: Tensor, fused: bool | None) -> str:
    """``"fused"`` or ``"torch"`` for a decode step of ``q (B, Hq, m, Dk)``: as asked, or by
    default the kernels for one token per row on CUDA, outside ``torch.compile``, where they
    take the dtype and head sizes."""
    if fused is None:
        fused = (q.shape[2] == 1 and _picks_kernels(q.device) and not torch.compiler.is_compiling()
                 and triton_refusal(q.device, q.dtype) is None and max(q.shape[-1], v.shape[-1]) <= MAX_HEAD_DIM)
    return "fused" if fused else "torch"
