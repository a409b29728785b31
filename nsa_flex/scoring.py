"""Block importance, the scores selection ranks by (paper eqs. 8-10), in PyTorch operations.

The compressed branch's softmax over the compressed blocks a query sees (:func:`masked_softmax`),
moved onto selection blocks by token overlap (:func:`block_importance`) and summed over the
heads of a GQA group. Materialising it for the whole sequence costs ``B * Hq * T * Tc`` floats
(64 GiB at T=65536 with the reference shape of docs/semantics.md), so :func:`chunk_importance`
walks the queries in chunks sized to a fixed memory budget (``tuning.CHUNK_BYTES``). The Triton
scoring kernel (``nsa_flex.ops.scoring``) computes the same importances without a ``T x Tc``
tensor; :func:`straight_through_score_mod` turns differentiable ones into gradients through the
selection.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from . import tuning
from ._validation import check_callable, check_floating, check_int, check_tensor
from .config import NSAConfig, num_select_blocks, resolve_config

__all__ = ["block_importance", "masked_softmax", "chunk_importance", "packed_importance", "straight_through_score_mod"]


def _index(n: int, device, shape) -> Tensor:
    return torch.arange(n, device=device, dtype=torch.int32).view(shape)


def block_importance(p_cmp: Tensor, config: NSAConfig, seq_len: int) -> Tensor:
    """Map compressed-block probabilities onto selection blocks by token overlap (eq. 9).

    Compressed block ``i`` covers the ``r = l / d`` stride-chunks ``i .. i + r - 1`` of ``d``
    tokens; selection block ``j`` covers the ``l' / d`` chunks from ``j * l' / d``. Their
    overlap over ``d`` is the number of chunks they share, so spreading each block's probability
    over its chunks and summing the chunks of each selection block is the overlap rule, in
    ``O(Tc * r)`` instead of a ``Tc x Ns`` product.

    Args:
        p_cmp: ``(..., Tc)``.

    Returns:
        ``(..., Ns)``.

    Raises:
        TypeError, ValueError: if ``p_cmp`` does not end in ``config.num_compressed(seq_len)``.
    """
    config = resolve_config(config)
    check_int("seq_len", seq_len, minimum=1)
    check_floating("p_cmp", p_cmp)
    tc = config.num_compressed(seq_len)
    if p_cmp.shape[-1] != tc:
        raise ValueError(f"p_cmp must end in Tc = {tc} compressed blocks for seq_len {seq_len}, got {p_cmp.shape[-1]}")
    d, r = config.compress_stride, config.compress_block // config.compress_stride
    per_sel = config.select_block // d
    ns = config.num_select_blocks(seq_len)
    n_chunks = ns * per_sel
    # chunk c collects p[c - k] for k in 0..r-1; pad r-1 zeros on the left and up to n_chunks
    # on the right (Tc + r - 1 = T // d <= n_chunks).
    padded = torch.nn.functional.pad(p_cmp, (r - 1, n_chunks - tc))
    chunks = sum(padded[..., r - 1 - k : r - 1 - k + n_chunks] for k in range(r))
    return chunks.unflatten(-1, (ns, per_sel)).sum(dim=-1)


def masked_softmax(scores: Tensor, allowed: Tensor, *, inplace: bool = False) -> Tensor:
    """Softmax of ``scores (..., S)`` over the keys ``allowed`` (bool, broadcastable) lets
    through. A row that allows none is 0 (softmax would give NaN); only such rows: a NaN or
    infinity that the scores a row sees hold stays, as in the forward.

    ``inplace``: ``scores`` is overwritten and the result built in place where nothing
    differentiates (selection's chunks: no second score-sized tensor).
    """
    if inplace:
        p = torch.softmax(scores.masked_fill_(~allowed, float("-inf")), dim=-1)
        return p.masked_fill_(~allowed.any(dim=-1, keepdim=True), 0.0)
    p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.where(allowed.any(dim=-1, keepdim=True), p, 0.0)


def _group_probabilities(qc, kc, scale, score_mod, mask_mod, b_idx, h_idx, t_idx, kv_pos, allowed, differentiable):
    """The compressed branch's probabilities of a chunk of queries ``qc (B, Hq, C, Dk)`` over
    compressed keys ``kc (B, Hkv, 1, S, Dk)`` (in the scores' dtype), summed over each GQA group:
    ``(B, Hkv, C, S)``. ``t_idx``/``kv_pos`` are the positions the mods see, ``allowed`` the
    blocks each query may see before the ``mask_mod``. Out of place when ``differentiable``,
    else the scores are overwritten."""
    Hkv = kc.shape[1]
    s = (qc.to(kc.dtype).unflatten(1, (Hkv, -1)) @ kc.transpose(-1, -2)).flatten(1, 2)  # (B, Hq, C, S)
    s = s * scale if differentiable else s.mul_(scale)
    if score_mod is not None:
        s = score_mod(s, b_idx, h_idx, t_idx, kv_pos).expand_as(s)
        s = s if differentiable else s.clone()  # writable
    if mask_mod is not None:
        allowed = allowed & mask_mod(b_idx, h_idx, t_idx, kv_pos)
    # A query that sees no compressed block (none allowed, or a score_mod sending every
    # one to -inf) gets a row of NaN from softmax; it scores 0. (Where nothing
    # differentiates, NaN from the data scores 0 too: the selection's rule, docs/design.md.)
    if differentiable:
        p = masked_softmax(s, allowed & (s != float("-inf")))
    else:
        p = masked_softmax(s, allowed, inplace=True).nan_to_num_(0.0)
    return p.unflatten(1, (Hkv, -1)).sum(dim=2)  # eq. 10: heads of a group share a selection


def chunk_importance(q, k_cmp, config, scale, score_mod, mask_mod, chunk_size, differentiable=False, q_offset=0):
    """Yield ``(start, importance (B, Hkv, C, Ns))`` for chunks of ``C`` queries from ``start``:
    the compressed branch's probabilities mapped onto selection blocks, summed over each group.
    ``start`` counts ``q``'s rows; their positions are ``q_offset + start ..`` (queries at an
    offset: ``k_cmp`` then holds the ``num_compressed(q_offset + T)`` blocks up to the last
    query, and ``Ns = num_select_blocks(q_offset + T)``).

    In place where nothing differentiates (the selection itself), out of place for
    ``selection.block_scores``, whose chunks autograd replays; ``q (B, Hq, T, Dk)``,
    ``k_cmp (B, Hkv, Tc, Dk)`` with ``Tc >= 1``.
    """
    B, Hq, T, _ = q.shape
    tc = k_cmp.shape[2]
    dtype = torch.promote_types(q.dtype, torch.float32)
    kc = k_cmp.to(dtype)[:, :, None]  # (B, Hkv, 1, Tc, Dk)
    kv_pos = config.compressed_last_token(_index(tc, q.device, (1, 1, 1, tc)))  # the mods see a block there
    if chunk_size is None:
        chunk_size = tuning.importance_chunk(B, Hq, tc, dtype)
        if chunk_size >= T:
            # One chunk. (Said so, a compiled graph guards on this comparison alone, not on the
            # chunk's size, when Tc is symbolic: queries at a dynamic offset.)
            chunk_size = T
    b_idx = _index(B, q.device, (B, 1, 1, 1))
    h_idx = _index(Hq, q.device, (1, Hq, 1, 1))

    def importance(qc, kc, start):
        C = qc.shape[-2]
        t_idx = torch.arange(q_offset + start, q_offset + start + C, device=q.device, dtype=torch.int32).view(1, 1, -1, 1)
        p = _group_probabilities(qc, kc, scale, score_mod, mask_mod, b_idx, h_idx, t_idx, kv_pos, kv_pos <= t_idx,
                                 differentiable)
        return block_importance(p, config, q_offset + T)

    for start in range(0, T, chunk_size):
        qc = q[:, :, start : min(T, start + chunk_size)]
        if differentiable:
            # recomputed in the backward, so that only one chunk's scores are ever held
            yield start, checkpoint(importance, qc, kc, start, use_reentrant=False)
        else:
            yield start, importance(qc, kc, start)


def packed_importance(q, k_cmp, config, scale, score_mod, mask_mod, chunk_size, docs):
    """Yield ``(start, importance (1, Hkv, C, Ns'), positions (C,))`` for chunks of ``C`` queries
    of a packed row (``docs``, a :class:`~nsa_flex.varlen.Documents`; ``k_cmp`` holds each
    document's blocks, concatenated): what :func:`chunk_importance` gives each document alone,
    in doc-local blocks, for all the documents a chunk meets at once.

    A chunk's queries are scored against the blocks of the documents it meets, a block allowed
    where it lies in the query's document and is visible from it; the mods see packed positions
    (a block at its last token). Each query's probabilities are then gathered into doc-local
    order (its document's first block in column 0) and moved onto selection blocks.
    ``positions`` are the queries' doc-local positions and ``Ns'`` the selection blocks of the
    longest document the chunk meets. For the selection (under ``torch.no_grad()``, which its
    caller holds): the scores are overwritten in place.
    """
    B, Hq, T, _ = q.shape
    Hkv, tc = k_cmp.shape[1], k_cmp.shape[2]
    dtype = torch.promote_types(q.dtype, torch.float32)
    lengths, starts, offsets = docs.lengths, docs.starts, docs.compressed_offsets(config)
    bounds = (*starts, T)
    doc_id, _, cmp_cu = docs.scoring_tables(config)
    last = docs.compressed_last_tokens(config)  # the mods see a block there
    block_doc = docs.compressed_blocks(config)[1].to(torch.int32)
    if chunk_size is None:
        chunk_size = min(T, tuning.importance_chunk(B, Hq, max(tc, 1), dtype))
    b_idx = _index(B, q.device, (B, 1, 1, 1))
    h_idx = _index(Hq, q.device, (1, Hq, 1, 1))
    d_first = 0
    for start in range(0, T, chunk_size):
        end = min(T, start + chunk_size)
        while bounds[d_first + 1] <= start:  # the document of query `start` (empty ones skipped)
            d_first += 1
        d_last = d_first
        while bounds[d_last + 1] < end:
            d_last += 1
        longest = max(lengths[d_first : d_last + 1])
        c0, c1 = offsets[d_first], offsets[d_last + 1]
        pos = docs.pos[start:end]
        C, ns = end - start, config.num_select_blocks(longest)
        if c1 == c0:  # no document the chunk meets holds a compressed block: every score 0
            yield start, q.new_zeros(B, Hkv, C, ns, dtype=dtype), pos
            continue
        t_idx = torch.arange(start, end, device=q.device, dtype=torch.int32).view(1, 1, -1, 1)
        kv_pos = last[c0:c1].view(1, 1, 1, -1)
        q_doc = doc_id[start:end]
        allowed = (block_doc[c0:c1] == q_doc[:, None]) & (kv_pos <= t_idx)  # in the query's document, visible
        p = _group_probabilities(q[:, :, start:end], k_cmp[:, :, None, c0:c1].to(dtype), scale, score_mod, mask_mod,
                                 b_idx, h_idx, t_idx, kv_pos, allowed, False)  # (B, Hkv, C, c1 - c0)
        # doc-local order: row t's block i is column cmp_cu[doc(t)] - c0 + i, up to its document's blocks
        width = config.num_compressed(longest)
        cols = (cmp_cu[q_doc] - c0).long()[:, None] + torch.arange(width, device=q.device)
        inside = cols < (cmp_cu[q_doc + 1] - c0).long()[:, None]
        local = p.gather(-1, cols.clamp(max=c1 - c0 - 1).expand(B, Hkv, C, width)).mul_(inside)
        yield start, block_importance(local, config, longest), pos


def straight_through_score_mod(
    importance: Tensor, select_block: int, group_size: int, score_mod: Callable | None = None, *, q_offset: int = 0
) -> Callable:
    """The selected branch's ``score_mod`` for gradients through the selection (issue 6,
    ``attend(..., selection_grad=True)``): each score is multiplied by
    ``w = 1 + importance - importance.detach()`` of its (query, block) pair, then passed to the
    user's ``score_mod``.

    ``w`` is exactly 1, so the forward is unchanged; its gradient is the importance's, so the
    gradient a block's scores receive flows into the compressed branch's probabilities that
    chose it (``q`` and ``k_cmp``), which the top-n alone would cut.

    Args:
        importance: ``(B, Hkv, T, Ns)`` from :func:`block_scores` (differentiable),
            ``Ns = ceil(T / select_block)``.
        select_block: ``l'``.
        group_size: ``G``; query head ``h`` reads row ``h // G``.
        score_mod: the user's, applied after the weight, or ``None``.
        q_offset: the position of ``importance``'s first query row: the mod is called with
            positions ``q_idx``, and reads row ``q_idx - q_offset`` (queries at an offset).

    Raises:
        TypeError, ValueError: naming the argument: ``importance`` not a 4-D floating tensor
            of ``ceil(T / select_block)`` blocks, ``select_block`` or ``group_size`` not a
            positive int, ``score_mod`` not callable.
    """
    check_tensor("importance", importance, 4)
    check_int("select_block", select_block, 1)
    check_int("group_size", group_size, 1)
    check_callable("score_mod", score_mod)
    check_int("q_offset", q_offset, 0)
    B, H, T, Ns = importance.shape
    if isinstance(T, int) and isinstance(Ns, int) and Ns != num_select_blocks(q_offset + T, select_block):
        raise ValueError(
            f"importance must hold Ns = ceil((q_offset + T) / select_block) = "
            f"{num_select_blocks(q_offset + T, select_block)} blocks for T = {T}, got {Ns}"
        )
    # flat, as selection_mask reads its bits (an Inductor CPU workaround, docs/design.md)
    weights = (importance - importance.detach() + 1).reshape(-1)

    def weighted(score, b, h, q_idx, kv_idx):
        w = weights[((b * H + h // group_size) * T + (q_idx if q_offset == 0 else q_idx - q_offset)) * Ns + kv_idx // select_block]
        score = score * w.to(score.dtype)
        return score if score_mod is None else score_mod(score, b, h, q_idx, kv_idx)

    return weighted
