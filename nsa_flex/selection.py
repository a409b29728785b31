"""Block selection shared by every backend: importance scores and top-n (paper eqs. 8-12).

The scores come from the compressed branch's softmax over compressed blocks. Materialising them
for the whole sequence costs ``B * Hq * T * Tc`` floats (64 GiB at T=65536 with the reference
shape of docs/semantics.md), so ``select_blocks`` walks the queries in chunks sized to a fixed
memory budget and keeps only the ``(B, Hkv, T, n)`` indices.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from . import ops, tuning
from ._validation import (
    MAX_HEAD_DIM,
    check_callable,
    check_floating,
    check_index_range,
    check_index_tensor,
    check_int,
    check_int_tensor,
    check_qk_cmp,
    check_tensor,
    resolve_scale,
)
from .triton_support import KERNEL_DTYPES, triton_missing
from .config import NSAConfig, resolve_config
from .varlen import Documents, resolve, shift_mask_mod, shift_score_mod

__all__ = ["select_blocks", "block_scores", "top_n_blocks", "block_importance", "sort_unique_blocks"]

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


def _ranking_key(scores: Tensor, j: Tensor, ns: int) -> tuple[Tensor, bool]:
    """Scores made free of exact ties: equal scores rank the lower block first.

    Returns ``(key, needs_stable_sort)``. Ties are common and structural (blocks that no visible
    compressed block overlaps all score 0; one visible compressed block spreads equal weights
    over several selection blocks), and ``torch.topk`` breaks them by its own internals, which
    differ with the row length. A fixed rule makes a selection independent of how many blocks a
    row holds, so a decode step (rows as long as the cache) picks what the full forward picks.

    Scores below float64 are widened to float64 and nudged up by less than half a spacing of
    their own precision, more for lower blocks; that orders exact ties and keeps every other
    order. Float64 scores (or more than 2**16 blocks) cannot be widened: the caller sorts them
    stably instead, which gives the same order.
    """
    key = scores.to(torch.promote_types(scores.dtype, torch.float32))
    if key.dtype != torch.float32 or ns >= 2**16:
        return key, True
    # float32's spacing at x is at least |x| * 2**-24; the nudge stays below |x| * ns * 2**-40.
    # Zero (and subnormals) are nudged from float32's smallest normal, below the smallest subnormal.
    nudge = (ns - 1 - j).to(torch.float64) * 2.0**-40
    wide = key.to(torch.float64)
    nudged = wide + wide.abs().clamp_min(torch.finfo(torch.float32).tiny) * nudge
    return torch.where(torch.isfinite(wide), nudged, wide), False


def top_n_blocks(
    scores: Tensor, config: NSAConfig, q_start: int = 0, *, positions: Tensor | None = None
) -> Tensor:
    """Pick ``n`` blocks per query: forced initial and local blocks, then the best candidates.

    Equal scores rank the lower block first, so the result does not depend on how many
    (non-candidate) blocks a row holds.

    Args:
        scores: ``(B, Hkv, C, Ns)`` importance of each block for queries ``q_start ..
            q_start + C - 1``.
        positions: instead of ``q_start``, each query's position as an integer tensor
            broadcastable to ``(B, Hkv, C)``, e.g. ``(B, 1, C)`` for batch rows at different
            offsets (a decode step). Nothing is read from it on the host (no sync, capturable
            in a CUDA graph), so it is not checked against ``Ns``: the caller makes ``scores``
            cover every candidate block.

    Returns:
        ``(B, Hkv, C, n)`` int32, valid indices ascending, then ``-1``.

    Raises:
        TypeError, ValueError: if ``scores`` is not floating or has fewer blocks than the
            queries can select from, or ``positions`` is not an integer tensor on ``scores``'
            device.
    """
    config = resolve_config(config)
    check_int("q_start", q_start, minimum=0)
    check_floating("scores", scores, min_dim=2)
    *lead, C, ns = scores.shape
    n, ls = config.num_selected, config.select_block
    if positions is None:
        if ns < -(-(q_start + C) // ls):
            raise ValueError(
                f"scores must cover the {-(-(q_start + C) // ls)} blocks up to query {q_start + C - 1}, "
                f"got {ns}"
            )
        pos = torch.arange(q_start, q_start + C, device=scores.device, dtype=torch.int64)
    else:
        check_int_tensor("positions", positions)
        if positions.device != scores.device:
            raise ValueError(f"positions is on {positions.device} but scores is on {scores.device}")
        if positions.dim() < 1 or positions.shape[-1] not in (1, C):
            raise ValueError(f"positions must end in C = {C} queries, got shape {tuple(positions.shape)}")
        pos = positions.long()
    j = torch.arange(ns, device=scores.device)
    current = (pos // ls)[..., None]
    candidate = j <= current
    forced = candidate & ((j < config.num_initial) | (j > current - config.num_local))
    key, stable = _ranking_key(scores, j, ns)
    key = key.masked_fill(~candidate, float("-inf")).masked_fill(forced, float("inf"))
    return _top_n_of_keys(key, n, stable)


def _top_n_of_keys(key: Tensor, n: int, stable: bool) -> Tensor:
    """``n`` best of ``key (..., Ns)`` (forced blocks ``+inf``, non-candidates ``-inf``, from
    :func:`_ranking_key`) as ascending int32 indices, ``-1`` padded."""
    ns = key.shape[-1]
    if stable:
        vals, idx = torch.sort(key, dim=-1, descending=True, stable=True)
        vals, idx = vals[..., : min(n, ns)], idx[..., : min(n, ns)]
    else:
        vals, idx = torch.topk(key, min(n, ns), dim=-1)
    # Non-candidates sort last (sentinel ns), then become -1.
    idx = torch.where(vals == float("-inf"), ns, idx)
    idx = torch.sort(idx, dim=-1).values
    idx = torch.where(idx == ns, -1, idx).to(torch.int32)
    if ns < n:
        idx = torch.nn.functional.pad(idx, (0, n - ns), value=-1)
    return idx


def straight_through_score_mod(
    importance: Tensor, select_block: int, group_size: int, score_mod: Callable | None = None
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

    Raises:
        TypeError, ValueError: naming the argument: ``importance`` not a 4-D floating tensor
            of ``ceil(T / select_block)`` blocks, ``select_block`` or ``group_size`` not a
            positive int, ``score_mod`` not callable.
    """
    check_tensor("importance", importance, 4)
    check_int("select_block", select_block, 1)
    check_int("group_size", group_size, 1)
    check_callable("score_mod", score_mod)
    B, H, T, Ns = importance.shape
    if isinstance(T, int) and isinstance(Ns, int) and Ns != -(-T // select_block):
        raise ValueError(
            f"importance must hold Ns = ceil(T / select_block) = {-(-T // select_block)} blocks for "
            f"T = {T}, got {Ns}"
        )
    # flat, as selection_mask reads its bits (an Inductor CPU workaround, docs/design.md)
    weights = (importance - importance.detach() + 1).reshape(-1)

    def weighted(score, b, h, q_idx, kv_idx):
        w = weights[((b * H + h // group_size) * T + q_idx) * Ns + kv_idx // select_block]
        score = score * w.to(score.dtype)
        return score if score_mod is None else score_mod(score, b, h, q_idx, kv_idx)

    return weighted


def sort_unique_blocks(block_indices: Tensor, num_blocks: int) -> tuple[Tensor, Tensor]:
    """Each row's blocks sorted, with a mask that is false for ``-1`` padding and repeats.

    Every backend reads a given selection through this, so that a block listed twice counts
    once everywhere.

    Args:
        block_indices: ``(B, Hkv, T, n)`` integers in ``[-1, num_blocks)``.

    Returns:
        ``(idx, valid)``, both ``(B, Hkv, T, n)``: ``idx`` int64 ascending, padding sorted last
        as ``num_blocks``; ``valid`` bool.

    Raises:
        TypeError, ValueError: ``block_indices`` not an int32/int64 tensor of at least one
            dimension, or holding a value outside ``[-1, num_blocks)`` (a device read, skipped
            while tracing or capturing); ``num_blocks`` not an int ``>= 0``.
    """
    check_index_tensor("block_indices", block_indices, None)
    if block_indices.dim() < 1:
        raise ValueError("block_indices must have at least 1 dimension, got a 0-d tensor")
    check_int("num_blocks", num_blocks, minimum=0)
    check_index_range("block_indices", block_indices, -1, num_blocks)
    return _sort_unique_blocks(block_indices, num_blocks)


def _sort_unique_blocks(block_indices: Tensor, num_blocks: int) -> tuple[Tensor, Tensor]:
    """:func:`sort_unique_blocks` after validation: the backends' (``attend`` has checked the
    selection, and a second range check would read the device again)."""
    idx = block_indices.long()
    idx = torch.sort(torch.where(idx >= 0, idx, num_blocks), dim=-1).values
    valid = idx < num_blocks
    valid[..., 1:] &= idx[..., 1:] != idx[..., :-1]
    return idx, valid


def _fused_ok(q: Tensor, score_mod, mask_mod) -> bool:
    """Whether the Triton scoring kernel serves this call: CUDA, no modifiers (the kernel
    computes plain scores), a dtype and head size the kernel takes, Triton installed (without
    it, the PyTorch scoring serves every call). Static facts, so a compiled graph decides as an
    eager call does (it calls the kernel through the custom op ``nsa_flex::select_blocks_fused``)."""
    return (
        q.is_cuda
        and score_mod is None
        and mask_mod is None
        and q.dtype in KERNEL_DTYPES
        and q.shape[-1] <= MAX_HEAD_DIM
        and not triton_missing()
    )


def _check_chunk_size(chunk_size) -> None:
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, 1)


@torch.no_grad()
def _select_fused(q, k_cmp, config, scale, chunk_size=None, lse=None) -> Tensor:
    """``select_blocks`` with Triton kernels: ``selection_kernels.block_scores_kernel`` writes
    the ``(B, Hkv, chunk, Ns)`` float32 block scores, the only large buffer, and
    ``selection_kernels.top_n_kernel`` ranks them (the tie rule of :func:`top_n_blocks`).
    ``lse``: the compressed branch's ``(B, Hq, T)`` log-sum-exp, when the caller has it, saves
    the scoring kernel one of its two passes. Called through the custom op
    ``nsa_flex::select_blocks_fused`` (:mod:`nsa_flex.ops`), which ``torch.compile`` keeps
    opaque; returns contiguous ``(B, Hkv, T, n)`` int32."""
    from .selection_kernels import block_scores_kernel

    B, Hq, T, Dk = q.shape
    Hkv, tc = k_cmp.shape[1], k_cmp.shape[2]
    G, n = Hq // Hkv, config.num_selected
    ns = config.num_select_blocks(T)
    tiles = tuning.scoring_launch(G, Dk, config)
    if chunk_size is None:
        chunk_size = tuning.scoring_chunk(B, Hkv, ns, tiles["BLOCK_T"])
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_cmp = k_cmp.to(q.dtype)
    lse_strides = (0, 0, 0) if lse is None else lse.stride()
    out = torch.empty(B, Hkv, T, n, device=q.device, dtype=torch.int32)
    for start in range(0, T, chunk_size):
        C = min(T, start + chunk_size) - start
        # the kernel writes every block up to each query's own; the top-n reads no further
        scores = torch.empty((B, Hkv, C, ns), device=q.device, dtype=torch.float32)
        block_scores_kernel[(-(-C // tiles["BLOCK_T"]), B * Hkv)](
            q, k_cmp, scores, q if lse is None else lse,
            *q.stride(), *k_cmp.stride(), *scores.stride(), *lse_strides,
            tc, ns, Hkv, start, C, scale * tuning.LOG2E,
            G=G, CMP_BLOCK=config.compress_block, CMP_STRIDE=config.compress_stride,
            SEL_BLOCK=config.select_block, N_INITIAL=config.num_initial, N_LOCAL=config.num_local,
            DK=Dk, IEEE=q.dtype == torch.float32, HAS_LSE=lse is not None, **tiles,
        )
        _top_n_fused(scores, config, start, out=out[:, :, start : start + C])
    return out


def _top_n_fused(scores: Tensor, config: NSAConfig, q_start: int, out: Tensor | None = None) -> Tensor:
    """:func:`top_n_blocks` of ``scores (B, Hkv, C, Ns)`` float32 (contiguous along the blocks,
    ``-inf``/``+inf`` for non-candidates/forced blocks as the scoring kernel writes them, but
    only blocks up to each query's own are read) by ``selection_kernels.top_n_kernel``, into
    ``out (B, Hkv, C, n)`` int32."""
    from .selection_kernels import top_n_kernel

    B, Hkv, C, ns = scores.shape
    n = config.num_selected
    if out is None:
        out = torch.empty(B, Hkv, C, n, device=scores.device, dtype=torch.int32)
    tiles = tuning.top_n_tiles(ns, n)
    top_n_kernel[(C, B * Hkv)](
        scores, out, *scores.stride(), *out.stride(), ns, Hkv, q_start,
        SEL_BLOCK=config.select_block, N_SEL=n, num_warps=tuning.top_n_warps(tiles["BLOCK_NS"]), **tiles,
    )
    return out


@torch.no_grad()
def _select(q, k_cmp, config, scale, score_mod, mask_mod, chunk_size, lse=None) -> Tensor:
    """``select_blocks`` after validation. ``lse``: the compressed branch's ``(B, Hq, T)``
    log-sum-exp (``attend`` computes that branch first); only the fused path reads it."""
    B, _, T, _ = q.shape
    Hkv, tc = k_cmp.shape[1], k_cmp.shape[2]
    if tc == 0:
        # Nothing compressed yet: every candidate scores 0, so only forced blocks and ties.
        scores = q.new_zeros(B, Hkv, T, config.num_select_blocks(T), dtype=torch.float32)
        return top_n_blocks(scores, config)
    if _fused_ok(q, score_mod, mask_mod):
        return ops.select_blocks_fused(
            q, k_cmp, config.compress_block, config.compress_stride, config.select_block,
            config.num_selected, config.num_initial, config.num_local, scale, chunk_size,
            None if lse is None else lse.detach().contiguous(),
        )
    out = []
    for start, p in _chunk_importance(q, k_cmp, config, scale, score_mod, mask_mod, chunk_size):
        out.append(top_n_blocks(p, config, start))
    return torch.cat(out, dim=2) if len(out) > 1 else out[0]


def _chunk_importance(q, k_cmp, config, scale, score_mod, mask_mod, chunk_size, differentiable=False):
    """Yield ``(start, importance (B, Hkv, C, Ns))`` for chunks of ``C`` queries from ``start``:
    the compressed branch's probabilities mapped onto selection blocks, summed over each group.

    In place where nothing differentiates (the selection itself), out of place for
    :func:`block_scores`, whose chunks autograd replays.
    """
    B, Hq, T, _ = q.shape
    Hkv, tc = k_cmp.shape[1], k_cmp.shape[2]
    G = Hq // Hkv
    dtype = torch.promote_types(q.dtype, torch.float32)
    kc = k_cmp.to(dtype)[:, :, None]  # (B, Hkv, 1, Tc, Dk)
    kv_pos = _index(tc, q.device, (1, 1, 1, tc)) * config.compress_stride + config.compress_block - 1
    if chunk_size is None:
        chunk_size = tuning.importance_chunk(B, Hq, tc, dtype)
    b_idx = _index(B, q.device, (B, 1, 1, 1))
    h_idx = _index(Hq, q.device, (1, Hq, 1, 1))

    def importance(qc, kc, start):
        C = qc.shape[-2]
        s = (qc.to(dtype).unflatten(1, (Hkv, G)) @ kc.transpose(-1, -2)).flatten(1, 2)  # (B, Hq, C, Tc)
        s = s * scale if differentiable else s.mul_(scale)
        t_idx = torch.arange(start, start + C, device=q.device, dtype=torch.int32).view(1, 1, -1, 1)
        if score_mod is not None:
            s = score_mod(s, b_idx, h_idx, t_idx, kv_pos).expand_as(s)
            s = s if differentiable else s.clone()  # writable
        allowed = kv_pos <= t_idx
        if mask_mod is not None:
            allowed = allowed & mask_mod(b_idx, h_idx, t_idx, kv_pos)
        # A query that sees no compressed block (none allowed, or a score_mod sending every
        # one to -inf) gets a row of NaN from softmax; it scores 0. (Where nothing
        # differentiates, NaN from the data scores 0 too: the selection's rule, docs/design.md.)
        if differentiable:
            s = s.masked_fill(~allowed, float("-inf"))
            p = torch.softmax(s, dim=-1)
            p = torch.where((s != float("-inf")).any(dim=-1, keepdim=True), p, 0.0)
        else:
            p = torch.softmax(s.masked_fill_(~allowed, float("-inf")), dim=-1).nan_to_num_(0.0)
        p = p.unflatten(1, (Hkv, G)).sum(dim=2)  # eq. 10: heads of a group share a selection
        return block_importance(p, config, T)

    for start in range(0, T, chunk_size):
        qc = q[:, :, start : min(T, start + chunk_size)]
        if differentiable:
            # recomputed in the backward, so that only one chunk's scores are ever held
            yield start, checkpoint(importance, qc, kc, start, use_reentrant=False)
        else:
            yield start, importance(qc, kc, start)


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
    :func:`select_blocks` ranks, as a function of ``q`` and ``k_cmp``.

    Args: as :func:`select_blocks`.

    Returns:
        ``(B, Hkv, T, Ns)`` float32 (float64 for float64 inputs), ``0`` where a block has no
        visible compressed block. Autograd keeps one chunk of ``(B, Hq, chunk, Tc)`` scores at a
        time (the chunks are recomputed in the backward, ``torch.utils.checkpoint``), but the
        result itself is ``T x Ns``: 1 GiB at T=65536 with the reference shape.
    """
    config = resolve_config(config)
    check_qk_cmp(q, k_cmp, config)
    scale = resolve_scale(scale, q)
    _check_chunk_size(chunk_size)
    check_callable("score_mod", score_mod)
    check_callable("mask_mod", mask_mod)
    B, Hq, T, _ = q.shape
    if k_cmp.shape[2] == 0:
        dtype = torch.promote_types(q.dtype, torch.float32)
        # Sums over no element: exactly 0 whatever q holds (a NaN query must not reach other
        # rows), and still in the graph, so q and k_cmp get zero gradients rather than none.
        zero = (q[..., :0].sum() + k_cmp.sum()).to(dtype)
        return zero + q.new_zeros(B, k_cmp.shape[1], T, config.num_select_blocks(T), dtype=dtype)
    parts = [p for _, p in _chunk_importance(q, k_cmp, config, scale, score_mod, mask_mod, chunk_size, True)]
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


def _select_documents(q, k_cmp, config, scale, score_mod, mask_mod, chunk_size, docs: Documents) -> Tensor:
    """Each document of a packed row selected alone (doc-local block indices), concatenated.

    A Python loop over the documents: exact by construction, and the work per document is the
    same as for a separate sequence; many tiny documents cost one small launch sequence each.
    """
    out = []
    offsets = docs.compressed_offsets(config)
    for n, (start, length) in enumerate(zip(docs.starts, docs.lengths)):
        if length == 0:
            continue
        out.append(_select(
            q[:, :, start : start + length], k_cmp[:, :, offsets[n] : offsets[n + 1]], config, scale,
            shift_score_mod(score_mod, start), shift_mask_mod(mask_mod, start), chunk_size,
        ))
    return torch.cat(out, dim=2) if len(out) > 1 else out[0]


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
    """Choose each query's ``n`` selection blocks from the compressed keys.

    Importance is the compressed branch's attention probability, moved onto selection blocks
    by token overlap and summed over the heads of a GQA group; blocks ``0 .. num_initial-1``
    and the ``num_local`` most recent are always taken (docs/semantics.md, "Selection").

    Args:
        q: ``(B, Hq, T, Dk)`` queries.
        k_cmp: ``(B, Hkv, Tc, Dk)`` compressed keys, ``Tc = config.num_compressed(T)``.
        config: hyperparameters (default ``NSAConfig()``).
        scale: score scale (default ``Dk ** -0.5``).
        score_mod, mask_mod: the same FlexAttention modifiers given to ``attend()``; they
            shape the compressed-branch probabilities the scores come from.
        chunk_size: queries scored at once (default: sized so a chunk's scores take ~512 MiB).
        cu_seqlens: for a packed row (``B = 1``): ``(N+1,)`` document offsets or a
            :class:`~nsa_flex.varlen.Documents`. ``k_cmp`` then holds each document's blocks
            concatenated (``Tc`` = their total), and each document is selected alone: the
            result's block indices count from the document's start (docs/varlen.md).

    Returns:
        ``block_indices``: ``(B, Hkv, T, n)`` int32; each row holds the chosen blocks in
        ascending order, then ``-1`` padding. Not differentiable.
    """
    config = resolve_config(config)
    docs = None
    if cu_seqlens is not None:
        if isinstance(q, Tensor) and q.dim() == 4:
            docs = resolve(cu_seqlens, q.shape[2], q.device, q.shape[0])
    check_qk_cmp(q, k_cmp, config, num_blocks=None if docs is None else docs.num_compressed(config))
    scale = resolve_scale(scale, q)
    _check_chunk_size(chunk_size)
    check_callable("score_mod", score_mod)
    check_callable("mask_mod", mask_mod)
    if docs is not None:
        return _select_documents(q, k_cmp, config, scale, score_mod, mask_mod, chunk_size, docs)
    return _select(q, k_cmp, config, scale, score_mod, mask_mod, chunk_size)
