"""The triton backend's selected branch: the hand-written Triton kernels, forward and backward.

:func:`selected_attention` is the validated public entry (``(o, lse)`` for given
``block_indices``); :func:`selected_branch` is what ``attend`` runs on the ``"triton"`` path
(:mod:`nsa_flex.dispatch`). Both go through the custom operator ``nsa_flex::selected_attention``
(:mod:`nsa_flex.ops.selected`, where the launch code, the dK/dV pass and
:func:`invert_selection` live), so the branch runs inside a ``torch.compile(fullgraph=True)``
graph, forward and backward, as eagerly.

On the CPU the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1`` set before
``nsa_flex`` is imported), which is slow and meant for tests on tiny shapes; :func:`available`
says where they run.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from ._validation import check_block_indices, check_int, check_kernel_head_dims, check_qkv, resolve_q_offset, resolve_scale
from .block_indices import drop_past_query, kernel_indices
from .config import NSAConfig, num_select_blocks
from .ops.selected import PackedRow, invert_selection, selected_attention_op
from .triton_support import available, check_triton
from .varlen import Documents, resolve
from .varlen import check_block_indices as varlen_check_block_indices

__all__ = ["selected_attention", "selected_branch", "invert_selection", "available", "kernel_indices"]


def selected_attention(
    q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, select_block: int, scale: float,
    *, cu_seqlens=None, q_offset: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Selected-branch attention with the Triton kernels.

    Args:
        q: ``(B, Hq, Tq, Dk)``; k: ``(B, Hkv, Tk, Dk)``; v: ``(B, Hkv, Tk, Dv)``; ``Tk = Tq``
            unless ``q_offset`` places the queries.
        block_indices: ``(B, Hkv, Tq, n)`` in ``[-1, ceil(Tk / select_block))``; ``-1`` and
            repeats select nothing more.
        cu_seqlens: for a packed row (``B = 1``), ``(N+1,)`` document offsets or a
            :class:`~nsa_flex.varlen.Documents`: ``block_indices`` are then doc-local, in
            ``[-1, ceil(longest document / select_block))``, and no query sees another document.
        q_offset: queries at an offset over a longer K/V, as in ``attend``: ``q`` holds the
            queries at positions ``q_offset .. q_offset + Tq - 1`` of the sequence whose keys
            and values ``k``, ``v`` hold from 0; each attends causally to the keys up to its
            position. ``None`` (default): ``Tk - Tq``, the last positions. Not with
            ``cu_seqlens`` (there ``Tk = Tq``).

    Returns:
        ``(o (B, Hq, Tq, Dv), lse (B, Hq, Tq) float32)``; ``lse`` is ``-inf`` (and ``o`` is 0) for
        a query that sees no key. Differentiable in ``q, k, v``.

    Raises:
        TypeError, ValueError: naming the argument, before any kernel runs: ``q, k, v``,
            ``block_indices``, ``scale``, ``cu_seqlens`` and ``q_offset`` as for ``attend``;
            ``select_block`` not a positive int; a device, dtype or head dim the kernels do not
            take.
    """
    check_qkv(q, k, v, longer_kv=True)
    check_triton(q)
    check_kernel_head_dims(q, v, "triton")
    check_int("select_block", select_block, 1)
    scale = resolve_scale(scale, q)
    Tq, Tk = q.shape[2], k.shape[2]
    offset = resolve_q_offset(q_offset, Tq, Tk)
    docs = None
    num_blocks = num_select_blocks(Tk, select_block)
    if cu_seqlens is not None:
        if offset != 0 or Tk != Tq:
            raise ValueError(f"q_offset (queries at {offset} .. over {Tk} keys) does not go with cu_seqlens: "
                             f"a packed row's q, k and v hold the same tokens")
        docs = resolve(cu_seqlens, Tq, q.device, q.shape[0])
        num_blocks = max(num_select_blocks(n, select_block) for n in docs.lengths)
    check_block_indices(block_indices, q, k.shape[1], num_blocks)
    if docs is not None:
        varlen_check_block_indices(block_indices, docs, select_block)
    return _run(q, k, v, block_indices, select_block, scale, docs, q_offset=offset)


def _run(q, k, v, block_indices, select_block, scale, docs: Documents | None = None,
         q_offset: int = 0) -> tuple[Tensor, Tensor]:
    """:func:`selected_attention` after validation (``q_offset``: ``q``'s rows are the positions
    ``q_offset ..`` over the keys of ``k``, not packed)."""
    packed = None
    if docs is not None:
        packed = PackedRow.from_documents(docs, select_block)
        block_indices = drop_past_query(block_indices, select_block, docs.pos)
    idx = kernel_indices(block_indices, select_block, k.shape[2])
    docs_args = (None,) * 4 if packed is None else packed.op_args()
    return selected_attention_op(q.contiguous(), k.contiguous(), v.contiguous(), idx, select_block, scale, *docs_args,
                                 q_offset)


def selected_branch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_indices: Tensor,
    config: NSAConfig,
    scale: float,
    score_mod: Callable | None = None,
    mask_mod: Callable | None = None,
    docs: Documents | None = None,
    q_offset: int = 0,
) -> Tensor:
    """``o_slc (B, Hq, T, Dv)`` for ``attend`` on the ``"triton"`` path, which has validated
    (``docs``: a packed row, doc-local ``block_indices``; ``q_offset``: the queries are the
    positions ``q_offset ..`` over the keys of ``k``). The kernels run no mods: the path is
    planned only without them, and ``score_mod``/``mask_mod`` (every selected branch's
    signature) are ``None``."""
    return _run(q, k, v, block_indices, config.select_block, scale, docs, q_offset=q_offset)[0]
