"""A GQA group's query heads as rows: the layout the selected branch runs in.

KV head ``h``'s row ``t*G + g`` is query head ``h*G + g`` at token ``t``, so the ``G`` heads
that share a selection share a tile of rows and one K/V tile load serves them all, as in the
paper's kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor


def fold_rows(q: Tensor, G: int) -> Tensor:
    """``(B, Hq, T, D) -> (B, Hkv, T*G, D)``. A gather rather than transpose+reshape, so that
    the folded queries are a plain 4-D buffer: Inductor's CPU FlexAttention template cannot take
    a view of a 5-D one."""
    B, Hq, T, D = q.shape
    row = torch.arange(T * G, device=q.device)
    return q.reshape(B, Hq // G, G * T, D).index_select(2, (row % G) * T + row // G)


def unfold_rows(x: Tensor, G: int, out: Tensor | None = None) -> Tensor:
    """Inverse of :func:`fold_rows` for ``(B, Hkv, T*G, ...)``: ``-> (B, Hkv*G, T, ...)``.

    ``out``: a ``(B, Hkv*G, T, ...)`` contiguous tensor to write into (an op's fresh output,
    which may not alias its input); otherwise a view where strides allow. ``reshape``, not
    ``view``: a compiled graph may hand ``x`` over with strides a view cannot split.
    """
    B, Hkv, rows = x.shape[:3]
    T = rows // G
    rest = x.shape[3:]
    rows_by_head = x.reshape(B, Hkv, T, G, *rest).transpose(2, 3)  # (B, Hkv, G, T, ...)
    if out is None:
        return rows_by_head.reshape(B, Hkv * G, T, *rest)
    out.view(B, Hkv, G, T, *rest).copy_(rows_by_head)
    return out
