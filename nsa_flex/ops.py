"""nsa_flex's PyTorch custom operators (namespace ``nsa_flex``): the hand-written Triton
launches as ops that ``torch.compile`` keeps opaque.

Dynamo does not trace into a ``torch.library.custom_op``: a graph records one call, takes the
output shapes from the op's fake implementation and its gradient from ``register_autograd``,
and at run time the op launches its kernels as it does eagerly. So the Triton paths run inside
``torch.compile(fullgraph=True)`` with no graph break, and eager calls go through the same ops.

- ``nsa_flex::selected_attention``: the triton backend's selected-branch forward kernel,
  ``(o, lse)``; differentiable (``o`` only) through ``selected_attention_backward``.
- ``nsa_flex::selected_attention_backward``: the Triton dQ and dK/dV kernels, from the forward's
  output and log-sum-exp (whichever kernel made them). Not differentiable itself.
- ``nsa_flex::attach_selected_backward``: the flex backend's selected branch for training on
  CUDA: takes a FlexAttention forward's output (folded rows) and log-sum-exp, computed outside
  autograd, returns the output unfolded, and differentiates it in ``q, k, v`` with the Triton
  backward.
- ``nsa_flex::select_blocks_fused``: ``select_blocks`` with the Triton scoring kernel; int32
  indices, no gradient.

Each op's implementation is the launch code in ``triton_backend`` / ``selection``; the
arguments are tensors and plain numbers (an ``NSAConfig`` travels as its fields, a packed
row's ``triton_backend._Packed`` as its tensors). Outputs are fresh contiguous tensors, and the
implementations make their inputs contiguous where the kernels need it, so the ops do not
depend on the strides a compiled graph hands them.
"""

from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "selected_attention",
    "selected_attention_backward",
    "attach_selected_backward",
    "select_blocks_fused",
]


def _packed(doc_start, first_block, block_start, block_end):
    """A packed row's ``triton_backend._Packed`` from the op arguments (``None`` when not packed)."""
    if doc_start is None:
        return None
    from .triton_backend import _Packed

    return _Packed(doc_start, first_block, block_start, block_end, block_start.numel())


# ----------------------------------------------------------------------- triton selected branch


@torch.library.custom_op("nsa_flex::selected_attention", mutates_args=())
def selected_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    idx: Tensor,
    select_block: int,
    scale: float,
    doc_start: Optional[Tensor] = None,
    first_block: Optional[Tensor] = None,
    block_start: Optional[Tensor] = None,
    block_end: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """``(o (B, Hq, T, Dv), lse (B, Hq, T) float32)`` of the Triton forward kernel.

    ``idx (B, Hkv, T, n)`` int32 as ``triton_backend.kernel_indices`` makes it. A packed row
    (``B = 1``) passes the four tensors of ``triton_backend._Packed``; otherwise all four are
    ``None``."""
    from .triton_backend import selected_forward

    packed = _packed(doc_start, first_block, block_start, block_end)
    return selected_forward(q.contiguous(), k.contiguous(), v.contiguous(), idx, select_block, scale, packed)


@selected_attention.register_fake
def _(q, k, v, idx, select_block, scale, doc_start=None, first_block=None, block_start=None, block_end=None):
    B, Hq, T, _ = q.shape
    return q.new_empty(B, Hq, T, v.shape[-1]), q.new_empty(B, Hq, T, dtype=torch.float32)


def _selected_attention_setup(ctx, inputs, output):
    q, k, v, idx, select_block, scale, *packed = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, idx, o, lse, *packed)
    ctx.select_block, ctx.scale = select_block, scale


def _selected_attention_grad(ctx, do, dlse):
    q, k, v, idx, o, lse, *packed = ctx.saved_tensors
    dq, dk, dv = selected_attention_backward(q, k, v, idx, o, lse, do, ctx.select_block, ctx.scale, *packed)
    return dq, dk, dv, None, None, None, None, None, None, None


selected_attention.register_autograd(_selected_attention_grad, setup_context=_selected_attention_setup)


@torch.library.custom_op("nsa_flex::selected_attention_backward", mutates_args=())
def selected_attention_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    idx: Tensor,
    o: Tensor,
    lse: Tensor,
    do: Tensor,
    select_block: int,
    scale: float,
    doc_start: Optional[Tensor] = None,
    first_block: Optional[Tensor] = None,
    block_start: Optional[Tensor] = None,
    block_end: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)``, contiguous, of selected attention: ``triton_backend.selected_backward``."""
    from .triton_backend import selected_backward

    packed = _packed(doc_start, first_block, block_start, block_end)
    # the kernels write dQ/dK/dV with the strides of q/k/v: keep those dense
    return selected_backward(
        q.contiguous(), k.contiguous(), v.contiguous(), idx, o, lse, do, select_block, scale, packed
    )


@selected_attention_backward.register_fake
def _(q, k, v, idx, o, lse, do, select_block, scale, doc_start=None, first_block=None, block_start=None, block_end=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(
        k, memory_format=torch.contiguous_format
    ), torch.empty_like(v, memory_format=torch.contiguous_format)


# ------------------------------------------------------------- flex forward, Triton backward


@torch.library.custom_op("nsa_flex::attach_selected_backward", mutates_args=())
def attach_selected_backward(
    q: Tensor, k: Tensor, v: Tensor, idx: Tensor, out_rows: Tensor, lse: Tensor, select_block: int, scale: float
) -> Tensor:
    """``out_rows (B, Hkv, T*G, Dv)``, the selected branch's output over folded rows (row
    ``t*G + g`` of KV head ``h`` is query head ``h*G + g``), unfolded to ``(B, Hq, T, Dv)``.

    The value is only the unfold (a copy): the point is the gradient. ``out_rows`` and
    ``lse (B, Hq, T)`` float32 come from a forward run outside autograd (FlexAttention's, in
    ``flex_backend``); the op differentiates its output in ``q, k, v`` with the Triton backward
    kernels, which need nothing else. ``idx`` as ``triton_backend.kernel_indices`` makes it."""
    B, Hq, T, _ = q.shape
    Hkv, Dv = k.shape[1], out_rows.shape[-1]
    G = Hq // Hkv
    o = out_rows.new_empty(B, Hq, T, Dv)  # a fresh tensor even when G = 1 (an op's output may not alias)
    # reshape: a compiled graph may hand out_rows over with strides a view cannot split
    o.view(B, Hkv, G, T, Dv).copy_(out_rows.reshape(B, Hkv, T, G, Dv).transpose(2, 3))
    return o


@attach_selected_backward.register_fake
def _(q, k, v, idx, out_rows, lse, select_block, scale):
    B, Hq, T, _ = q.shape
    return out_rows.new_empty(B, Hq, T, out_rows.shape[-1])


def _attach_setup(ctx, inputs, output):
    q, k, v, idx, _, lse, select_block, scale = inputs
    ctx.save_for_backward(q, k, v, idx, output, lse)
    ctx.select_block, ctx.scale = select_block, scale


def _attach_grad(ctx, do):
    q, k, v, idx, o, lse = ctx.saved_tensors
    dq, dk, dv = selected_attention_backward(q, k, v, idx, o, lse, do, ctx.select_block, ctx.scale)
    return dq, dk, dv, None, None, None, None, None


attach_selected_backward.register_autograd(_attach_grad, setup_context=_attach_setup)


# ----------------------------------------------------------------------------- block selection


@torch.library.custom_op("nsa_flex::select_blocks_fused", mutates_args=())
def select_blocks_fused(
    q: Tensor,
    k_cmp: Tensor,
    compress_block: int,
    compress_stride: int,
    select_block: int,
    num_selected: int,
    num_initial: int,
    num_local: int,
    scale: float,
    chunk_size: Optional[int] = None,
    lse: Optional[Tensor] = None,
) -> Tensor:
    """``select_blocks(q (B, Hq, T, Dk), k_cmp (B, Hkv, Tc, Dk))`` with the Triton scoring
    kernels (``selection._select_fused``), ``Tc >= 1``, no modifiers: ``(B, Hkv, T, n)`` int32.
    The config travels as its fields (the window plays no part). ``lse``: the compressed
    branch's ``(B, Hq, T)`` natural log-sum-exp, if the caller has it."""
    from .config import NSAConfig
    from .selection import _select_fused

    config = NSAConfig(
        compress_block=compress_block, compress_stride=compress_stride, select_block=select_block,
        num_selected=num_selected, num_initial=num_initial, num_local=num_local,
    )
    return _select_fused(q, k_cmp, config, scale, chunk_size, lse)


@select_blocks_fused.register_fake
def _(q, k_cmp, compress_block, compress_stride, select_block, num_selected, num_initial, num_local, scale,
      chunk_size=None, lse=None):
    B, _, T, _ = q.shape
    return q.new_empty(B, k_cmp.shape[1], T, num_selected, dtype=torch.int32)
