"""Block selection's entry points, shared by every backend: :func:`select_blocks` (paper
eqs. 8-12) and :func:`block_scores` (the same importances, differentiably).

They validate, then route: the importances are :mod:`nsa_flex.scoring`'s (PyTorch, in query
chunks) or the Triton scoring kernel's (``nsa_flex.ops.scoring``), as
:func:`nsa_flex.dispatch.scoring_path` decides; the top-n is :mod:`nsa_flex.top_n`'s; a packed
row's documents are selected together, in the same launches or query chunks. Both keep only
the ``(B, Hkv, T, n)`` indices (or the ``(B, Hkv, T, Ns)`` importances), never a ``T x Tc``
tensor.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from . import dispatch, scoring
from ._validation import check_callable, check_int, check_qk_cmp, resolve_scale
from .block_indices import sort_unique_blocks
from .config import NSAConfig, resolve_config
from .ops.scoring import select_blocks_fused_op
from .scoring import block_importance, straight_through_score_mod  # noqa: F401 (a documented path)
from .top_n import top_n_blocks
from .varlen import Documents, resolve

__all__ = ["select_blocks", "block_scores", "top_n_blocks", "block_importance", "sort_unique_blocks"]


def check_chunk_size(chunk_size) -> None:
    """``chunk_size``: ``None`` or an int ``>= 1``."""
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, 1)


@torch.no_grad()
def _select_row(q, k_cmp, config, scale, score_mod, mask_mod, chunk_size, path: str, lse=None, q_offset=0) -> Tensor:
    """``select_blocks`` of one sequence after validation, on ``path`` (``"triton"`` or
    ``"torch"``, :func:`nsa_flex.dispatch.scoring_path`). ``lse``: the compressed branch's
    ``(B, Hq, T)`` log-sum-exp (``attend`` computes that branch first on the ``"triton_lse"``
    path); only the kernels read it. ``q_offset``: ``q``'s rows are the positions
    ``q_offset ..``, and ``k_cmp`` the ``num_compressed(q_offset + T)`` blocks up to the last."""
    B, _, T, _ = q.shape
    Hkv, tc = k_cmp.shape[1], k_cmp.shape[2]
    if tc == 0:
        # Nothing compressed yet: every candidate scores 0, so only forced blocks and ties.
        scores = q.new_zeros(B, Hkv, T, config.num_select_blocks(q_offset + T), dtype=torch.float32)
        return top_n_blocks(scores, config, q_offset)
    if path == "triton":
        return select_blocks_fused_op(
            q, k_cmp, config.compress_block, config.compress_stride, config.select_block,
            config.num_selected, config.num_initial, config.num_local, scale, chunk_size,
            None if lse is None else lse.detach().contiguous(), q_offset,
        )
    out = []
    for start, p in scoring.chunk_importance(q, k_cmp, config, scale, score_mod, mask_mod, chunk_size,
                                             q_offset=q_offset):
        out.append(top_n_blocks(p, config, q_offset + start))
    return torch.cat(out, dim=2) if len(out) > 1 else out[0]


def _select_rows(q, k_cmp, config, scale, score_mod, mask_mod, chunk_size, docs: Documents | None, path: str,
                 q_offset: int = 0, lse=None) -> Tensor:
    """``select_blocks`` after validation: one sequence per batch row, or a packed row's
    documents each alone. ``lse`` as :func:`_select_row`'s (the ``"triton"`` path only)."""
    if docs is not None:
        return _select_documents(q, k_cmp, config, scale, score_mod, mask_mod, chunk_size, docs, path, lse)
    return _select_row(q, k_cmp, config, scale, score_mod, mask_mod, chunk_size, path, lse, q_offset)


@torch.no_grad()
def _select_documents(q, k_cmp, config, scale, score_mod, mask_mod, chunk_size, docs: Documents, path: str,
                      lse=None) -> Tensor:
    """Each document of a packed row selected alone (doc-local block indices).

    On the ``"triton"`` path the kernels take the documents (``Documents.scoring_tables``):
    every document in the same launches, a tile of queries scored against each of its
    documents' blocks in turn. The PyTorch path (modifiers, or no kernels) walks the packed
    row in query chunks, each scored against the blocks of the documents it meets
    (:func:`nsa_flex.scoring.packed_importance`), and ranks each query's blocks from its
    document's start.
    """
    if path == "triton":
        doc_id, cu, cmp_cu = docs.scoring_tables(config)
        return select_blocks_fused_op(
            q, k_cmp, config.compress_block, config.compress_stride, config.select_block,
            config.num_selected, config.num_initial, config.num_local, scale, chunk_size,
            None if lse is None else lse.detach().contiguous(), 0, doc_id, cu, cmp_cu,
            docs.num_select_blocks(config),
        )
    out = [top_n_blocks(p, config, positions=pos.view(1, 1, -1))
           for _, p, pos in scoring.packed_importance(q, k_cmp, config, scale, score_mod, mask_mod, chunk_size, docs)]
    return torch.cat(out, dim=2) if len(out) > 1 else out[0]


def block_scores(
    q: Tensor,
    k_cmp: Tensor,
    *,
    config: NSAConfig | None = None,
    scale: float | None = None,
    score_mod: Callable | None = None,
    mask_mod: Callable | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Importance of every selection block for every query, differentiably: what
    :func:`select_blocks` ranks, as a function of `q` and `k_cmp` (`selection_grad`'s
    straight-through weights come from it).

    Args: as :func:`select_blocks` (no `cu_seqlens`).

    Returns:
        `(B, Hkv, T, Ns)` float32 (float64 for float64 inputs): the compressed-branch
        probabilities moved onto selection blocks by token overlap and summed over each group;
        `0` where a block has no visible compressed block. Autograd keeps one chunk of
        `(B, Hq, chunk, Tc)` scores at a time (the chunks are recomputed in the backward,
        `torch.utils.checkpoint`), but the result itself is `T x Ns` per KV head: 1 GiB at
        T=65536 with the reference shape.

    Raises:
        TypeError, ValueError: as :func:`select_blocks`.
    """
    config = resolve_config(config)
    check_qk_cmp(q, k_cmp, config)
    scale = resolve_scale(scale, q)
    check_chunk_size(chunk_size)
    check_callable("score_mod", score_mod)
    check_callable("mask_mod", mask_mod)
    return _block_scores(q, k_cmp, config, scale, score_mod, mask_mod, chunk_size)


def _block_scores(q, k_cmp, config, scale, score_mod, mask_mod, chunk_size, q_offset: int = 0) -> Tensor:
    """:func:`block_scores` after validation; ``q_offset``: ``q``'s rows are the positions
    ``q_offset ..`` (``attend``'s queries at an offset), the result
    ``(B, Hkv, T, num_select_blocks(q_offset + T))``."""
    B, Hq, T, _ = q.shape
    if k_cmp.shape[2] == 0:
        dtype = torch.promote_types(q.dtype, torch.float32)
        # Sums over no element: exactly 0 whatever q holds (a NaN query must not reach other
        # rows), and still in the graph, so q and k_cmp get zero gradients rather than none.
        zero = (q[..., :0].sum() + k_cmp.sum()).to(dtype)
        return zero + q.new_zeros(B, k_cmp.shape[1], T, config.num_select_blocks(q_offset + T), dtype=dtype)
    parts = [p for _, p in scoring.chunk_importance(q, k_cmp, config, scale, score_mod, mask_mod, chunk_size, True,
                                                    q_offset=q_offset)]
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


def select_blocks(
    q: Tensor,
    k_cmp: Tensor,
    *,
    config: NSAConfig | None = None,
    scale: float | None = None,
    score_mod: Callable | None = None,
    mask_mod: Callable | None = None,
    chunk_size: int | None = None,
    cu_seqlens=None,
) -> Tensor:
    """Choose each query's `n` selection blocks from the compressed keys (paper eqs. 8-12):
    the step `attend` runs when no `block_indices` are given; shared by every backend.

    Importance is the compressed branch's attention probability, moved onto selection blocks
    by token overlap and summed over the heads of a GQA group; blocks `0 .. num_initial-1`
    and the `num_local` most recent are always taken (docs/semantics.md, "Selection").

    Args:
        q: `(B, Hq, T, Dk)` queries.
        k_cmp: `(B, Hkv, Tc, Dk)` compressed keys, `Tc = config.num_compressed(T)`.
        config: hyperparameters (default `NSAConfig()`).
        scale: score scale (default `Dk ** -0.5`).
        score_mod, mask_mod: the same FlexAttention modifiers given to `attend()`; they
            shape the compressed-branch probabilities the scores come from.
        chunk_size: queries scored at once (default: sized so one chunk's float32 scores
            `(B, Hq, chunk, Tc)` take about 512 MiB, `tuning.CHUNK_BYTES`).
        cu_seqlens: for a packed row (`B = 1`): `(N+1,)` document offsets or a
            :class:`~nsa_flex.varlen.Documents`. `k_cmp` then holds each document's blocks
            concatenated (`Tc` = their total), and each document is selected alone: the
            result's block indices count from the document's start ([varlen.md](varlen.md)).

    Returns:
        `block_indices`: `(B, Hkv, T, n)` int32: per query, the forced blocks and the
        highest-scoring remaining candidates `j <= t // l'`, ascending, then `-1` padding
        (fewer than `n` candidates: all are taken). Equal scores rank the lower block first.
        Computed under `torch.no_grad()`, not differentiable (:func:`block_scores` is).

    Raises:
        TypeError, ValueError: naming the argument: a bad `config`, `scale`, `q` or `k_cmp`
            (rank, dtype, device, batch, heads, `Tc`, head size), a `score_mod`/`mask_mod` that
            is not callable, a `chunk_size` that is not an int (`TypeError`) or below 1
            (`ValueError`).

    `nsa_flex.selection` also re-exports the steps it is made of: `block_importance` and
    `straight_through_score_mod` (:mod:`nsa_flex.scoring`), `top_n_blocks` (:mod:`nsa_flex.top_n`)
    and `sort_unique_blocks` (:mod:`nsa_flex.block_indices`). Compute a selection once and reuse it:

    ```python
    import torch
    import nsa_flex
    from nsa_flex import NSAConfig, mean_compress, select_blocks

    config = NSAConfig(num_selected=8, window=128)
    q = torch.randn(1, 4, 300, 16)
    k = torch.randn(1, 2, 300, 16)
    v = torch.randn(1, 2, 300, 16)

    block_indices = select_blocks(q, mean_compress(k, config), config=config)
    print(block_indices.shape, block_indices.dtype)  # torch.Size([1, 2, 300, 8]) torch.int32
    print(block_indices[0, 0, 299].tolist())         # [0, 1, 2, 3, 4, -1, -1, -1]

    out = nsa_flex.attend(q, k, v, config=config, block_indices=block_indices)
    print(torch.allclose(out, nsa_flex.attend(q, k, v, config=config)))  # True
    ```
    """
    config = resolve_config(config)
    docs = None
    if cu_seqlens is not None:
        if isinstance(q, Tensor) and q.dim() == 4:
            docs = resolve(cu_seqlens, q.shape[2], q.device, q.shape[0])
    check_qk_cmp(q, k_cmp, config, num_blocks=None if docs is None else docs.num_compressed(config))
    scale = resolve_scale(scale, q)
    check_chunk_size(chunk_size)
    check_callable("score_mod", score_mod)
    check_callable("mask_mod", mask_mod)
    path = dispatch.scoring_path(q, score_mod, mask_mod)
    return _select_rows(q, k_cmp, config, scale, score_mod, mask_mod, chunk_size, docs, path)
