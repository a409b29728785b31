"""The triton backend's selected branch: launch code around ``triton_kernels``.

The forward and dQ kernels run one program per (query position, batch row, KV head), the G
query heads of the group as the rows of every tile. The dK/dV kernel runs one program per
(selection-block tile, batch row, KV head) over the queries that selected that block: the
selection is inverted with a sort, so every key has exactly one writer and the gradients are
deterministic without atomics. Nothing here reads device values on the host, so forward and
backward can be captured in a CUDA graph.

Autograd and ``torch.compile`` see the launches as the custom operators of :mod:`nsa_flex.ops`
(``nsa_flex::selected_attention`` and ``nsa_flex::selected_attention_backward``), so the
branch runs inside a ``torch.compile(fullgraph=True)`` graph, forward and backward, as eagerly.

On the CPU the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1`` set before
``nsa_flex`` is imported), which is slow and meant for tests on tiny shapes.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import Tensor

from . import ops
from ._validation import check_block_indices, check_kernel_head_dims, check_qkv, resolve_scale
from .config import NSAConfig
from .selection import _pow2, sort_unique_blocks
from .varlen import Documents, resolve
from .varlen import check_block_indices as varlen_check_block_indices

__all__ = ["selected_attention", "selected_branch", "invert_selection", "available"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device: torch.device) -> tuple[bool, str]:
    """Whether the kernels can run on ``device``, and why not."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "the triton backend needs the `triton` package"
    if device.type == "cuda" or _interpreting():
        return True, ""
    return False, (
        f"the triton backend runs on CUDA tensors (got {device}); on the CPU only under "
        "Triton's interpreter, TRITON_INTERPRET=1 set before importing nsa_flex"
    )


def check_runnable(q: Tensor) -> None:
    """Raise unless the kernels can run on ``q``'s device and dtype."""
    ok, why = available(q.device)
    if not ok:
        raise ValueError(why)
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the triton backend takes float16, bfloat16 or float32, got {q.dtype}")
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        # Triton's interpreter computes bf16 tl.dot wrongly (seen with triton 3.9); refuse
        # rather than return garbage. float16 and float32 interpret fine.
        raise TypeError("the triton backend under Triton's CPU interpreter takes float16 or float32, not bfloat16")


def _meta(G: int, Dk: int, Dv: int, select_block: int, dtype: torch.dtype) -> dict:
    block_dk, block_dv = _pow2(Dk), _pow2(Dv)
    # Key tile: up to 64 keys, fewer when one K+V tile would pass 64 KiB, so that two pipeline
    # stages fit in shared memory for every dtype and head dim up to 256.
    block_n = min(64, _pow2(select_block))
    itemsize = torch.empty((), dtype=dtype).element_size()
    while block_n > 16 and block_n * (block_dk + block_dv) * itemsize > 64 * 2**10:
        block_n //= 2
    return dict(
        G=G,
        SEL_BLOCK=select_block,
        DK=Dk,
        DV=Dv,
        BLOCK_G=_pow2(G),
        BLOCK_N=block_n,
        BLOCK_DK=block_dk,
        BLOCK_DV=block_dv,
        # float32 inputs get true float32 products (Triton's default would be TF32)
        IEEE=dtype == torch.float32,
        num_warps=4,
        num_stages=2,
    )


def _strides(x: Tensor) -> tuple[int, ...]:
    return tuple(x.stride())


def invert_selection(idx: Tensor, num_blocks: int) -> tuple[Tensor, Tensor]:
    """For each block, the queries that selected it.

    Args:
        idx: ``(B, Hkv, T, n)`` int, each row ascending and unique with ``-1`` last.

    Returns:
        ``(qlist (B, Hkv, T*n) int32, qstart (B, Hkv, Ns+1) int32)``: the queries that selected
        block ``j`` are ``qlist[b, h, qstart[b, h, j] : qstart[b, h, j+1]]``, ascending.
    """
    B, H, T, n = idx.shape
    valid = idx >= 0
    t = torch.arange(T, device=idx.device).view(1, 1, T, 1)
    block = torch.where(valid, idx.long(), num_blocks)
    key = (block * T + t).view(B, H, T * n)  # padding sorts after every real block
    qlist = (torch.sort(key, dim=-1).values % T).to(torch.int32)
    counts = torch.zeros(B, H, num_blocks + 1, dtype=torch.int64, device=idx.device)
    counts.scatter_add_(-1, block.view(B, H, T * n), torch.ones_like(key))
    qstart = torch.zeros_like(counts)
    qstart[..., 1:] = torch.cumsum(counts[..., :num_blocks], dim=-1)
    return qlist.contiguous(), qstart.to(torch.int32).contiguous()


def selected_forward(q, k, v, idx, select_block: int, scale: float, packed=None) -> tuple[Tensor, Tensor]:
    """``(o (B, Hq, T, Dv), lse (B, Hq, T) float32)`` of the forward kernel; ``q, k, v``
    contiguous, ``idx`` as :func:`kernel_indices` makes it, ``packed`` a :class:`_Packed` for a
    packed row. Autograd and ``torch.compile`` reach it through ``nsa_flex::selected_attention``
    (:mod:`nsa_flex.ops`)."""
    from .triton_kernels import selected_fwd_kernel

    B, Hq, T, Dk = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    meta = _meta(Hq // Hkv, Dk, Dv, select_block, q.dtype)
    o = torch.empty(B, Hq, T, Dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)
    doc_start = idx if packed is None else packed.doc_start  # idx: a placeholder, never read
    selected_fwd_kernel[(T, B * Hkv)](
        q, k, v, idx, doc_start, o, lse,
        *_strides(q), *_strides(k), *_strides(v), *_strides(idx), *_strides(o), *_strides(lse),
        T, Hkv, scale, N_SEL=idx.shape[-1], VARLEN=packed is not None, **meta,
    )
    return o, lse


def selected_backward(q, k, v, idx, o, lse, do, select_block: int, scale: float, packed=None):
    """``(dq, dk, dv)`` of selected attention from the forward's output ``o (B, Hq, T, Dv)`` and
    natural log-sum-exp ``lse (B, Hq, T)`` float32 (``-inf`` for empty rows), whichever kernel
    produced them. ``idx`` as the forward kernel takes it: ascending, unique, ``-1`` last.
    ``dq, dk, dv`` take the strides of ``q, k, v``. Autograd and ``torch.compile`` reach it
    through ``nsa_flex::selected_attention_backward`` (:mod:`nsa_flex.ops`)."""
    from .triton_kernels import selected_dkdv_kernel, selected_dq_kernel

    B, Hq, T, Dk = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    meta = _meta(Hq // Hkv, Dk, Dv, select_block, q.dtype)
    do = do.to(q.dtype).contiguous()
    # the kernels read lse and delta at the same offsets: both contiguous (B, Hq, T)
    lse = lse.float().contiguous()
    delta = (do.float() * o.float()).sum(dim=-1).contiguous()  # rowsum(dO * O)
    dq = torch.empty_like(q)
    selected_dq_kernel[(T, B * Hkv)](
        q, k, v, idx, idx if packed is None else packed.doc_start, do, lse, delta, dq,
        *_strides(q), *_strides(k), *_strides(v), *_strides(idx), *_strides(do), *_strides(lse),
        T, Hkv, scale, N_SEL=idx.shape[-1], VARLEN=packed is not None, **meta,
    )
    if packed is None:
        ns = -(-T // select_block)
        qlist, qstart = invert_selection(idx, ns)
        blk_start = blk_end = qstart  # placeholders, never read
    else:
        # every document's blocks numbered one after another, so each key has one owner
        ns = packed.num_blocks
        qlist, qstart = invert_selection(torch.where(idx >= 0, idx + packed.first_block, -1), ns)
        blk_start, blk_end = packed.block_start, packed.block_end
    chunks = -(-select_block // meta["BLOCK_N"])
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    selected_dkdv_kernel[(ns * chunks, B * Hkv)](
        q, k, v, do, lse, delta, qlist, qstart, blk_start, blk_end, dk, dv,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(lse),
        *_strides(qlist)[:2], *_strides(qstart)[:2],
        T, Hkv, scale, CHUNKS=chunks, VARLEN=packed is not None, **meta,
    )
    return dq, dk, dv


def kernel_indices(block_indices: Tensor, select_block: int, T: int) -> Tensor:
    """``block_indices`` as the kernels read them: each row ascending and unique, ``-1`` last."""
    idx, valid = sort_unique_blocks(block_indices, -(-T // select_block))
    return torch.where(valid, idx, -1).to(torch.int32).contiguous()


def selected_attention(
    q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, select_block: int, scale: float,
    *, cu_seqlens=None,
) -> tuple[Tensor, Tensor]:
    """Selected-branch attention with the Triton kernels.

    Args:
        q: ``(B, Hq, T, Dk)``; k: ``(B, Hkv, T, Dk)``; v: ``(B, Hkv, T, Dv)``.
        block_indices: ``(B, Hkv, T, n)`` in ``[-1, ceil(T / select_block))``; ``-1`` and repeats
            select nothing more.
        cu_seqlens: for a packed row (``B = 1``), ``(N+1,)`` document offsets or a
            :class:`~nsa_flex.varlen.Documents`: ``block_indices`` are then doc-local, in
            ``[-1, ceil(longest document / select_block))``, and no query sees another document.

    Returns:
        ``(o (B, Hq, T, Dv), lse (B, Hq, T) float32)``; ``lse`` is ``-inf`` (and ``o`` is 0) for a
        query that sees no key. Differentiable in ``q, k, v``.
    """
    check_qkv(q, k, v)
    check_runnable(q)
    check_kernel_head_dims(q, v, "triton")
    if isinstance(select_block, bool) or not isinstance(select_block, int) or select_block < 1:
        raise ValueError(f"select_block must be a positive int, got {select_block!r}")
    scale = resolve_scale(scale, q)
    docs = None
    num_blocks = -(-q.shape[2] // select_block)
    if cu_seqlens is not None:
        docs = resolve(cu_seqlens, q.shape[2], q.device, q.shape[0])
        num_blocks = max(-(-n // select_block) for n in docs.lengths)
    check_block_indices(block_indices, q, k.shape[1], num_blocks)
    if docs is not None:
        varlen_check_block_indices(block_indices, docs, select_block)
    return _selected(q, k, v, block_indices, select_block, scale, docs)


class _Packed(NamedTuple):
    """What the kernels need to know of a packed row's documents."""

    doc_start: Tensor  # (T,) int32: each token's document start
    first_block: Tensor  # (T,) int64: number of the first block of each token's document
    block_start: Tensor  # (Nb,) int32: first key of each block, all documents' blocks in a row
    block_end: Tensor  # (Nb,) int32: end of each block's document
    num_blocks: int  # Nb


def _selected(q, k, v, block_indices, select_block, scale, docs: Documents | None = None):
    T = q.shape[2]
    packed = None
    if docs is not None:
        first_block, block_start, block_end = docs.selection_blocks(select_block)
        packed = _Packed(docs.start.contiguous(), first_block.view(1, 1, T, 1), block_start, block_end,
                         block_start.numel())
        # A doc-local block past the query's own selects nothing; drop it here so that its
        # number never reaches the next document's blocks in the backward's inversion.
        pos = docs.pos.view(1, 1, T, 1).long()
        block_indices = torch.where(block_indices.long() * select_block <= pos, block_indices, -1)
    idx = kernel_indices(block_indices, select_block, T)
    docs_args = () if packed is None else packed[:4]
    return ops.selected_attention(q.contiguous(), k.contiguous(), v.contiguous(), idx, select_block, scale, *docs_args)


def selected_branch(
    q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, config: NSAConfig, scale: float,
    docs: Documents | None = None,
) -> Tensor:
    """``o_slc (B, Hq, T, Dv)`` for ``attend(..., backend="triton")``, which has validated
    (``docs``: a packed row, doc-local ``block_indices``)."""
    return _selected(q, k, v, block_indices, config.select_block, scale, docs)[0]
