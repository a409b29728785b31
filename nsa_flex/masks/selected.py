"""The selected branch's BlockMask, straight from ``block_indices``, over folded queries.

Rows are folded as the flex backend runs the branch: KV head ``h``'s row ``t*G + g`` is query
head ``h*G + g`` at token ``t`` (``nsa_flex._layout``), so the ``G`` heads that share a
selection share a tile of rows. Nothing here is ``T x T``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, and_masks

from .._validation import check_block_size, check_bool, check_callable, check_index_tensor, check_int
from ..block_indices import _sort_unique_blocks
from ..config import NSAConfig, check_config
from ..tuning import KV_BLOCK, Q_BLOCK, selection_tile
from .block_masks import _from_tiles
from .mods import MaskMod, _check_doc_start, _check_selection, _selection_bits, selection_mask


def selection_block_mask(
    block_indices: Tensor,
    config: NSAConfig,
    *,
    group_size: int = 1,
    mask_mod: MaskMod | None = None,
    block_size: tuple[int, int] | None = None,
    doc_start: Tensor | None = None,
    transposed: bool = True,
    q_offset: int = 0,
) -> BlockMask:
    """BlockMask of the selected branch, straight from ``block_indices``, over folded queries.

    Args:
        block_indices: ``(B, Hkv, T, n)``, ``-1`` padded.
        group_size: ``G = Hq // Hkv``. Rows are folded: KV head ``h``'s row ``t*G + g`` is query
            head ``h*G + g`` at token ``t`` (see :func:`selection_mask`), so the mask is
            ``(B, Hkv, T*G, T)`` and one Q tile holds ``Q tile / G`` tokens of a whole group.
        mask_mod: the user's mask in unfolded coordinates ``(b, query head, token, key)``.
        block_size: ``(Q tile, KV tile)``; default :func:`selection_tile`.
        doc_start: for a packed row, ``(T,)`` each token's document start; ``block_indices``
            are then doc-local (see :func:`selection_mask`). No tile is then full.
        transposed: build the transposed (Q) lists that FlexAttention's backward reads. With
            ``False`` and one-block KV tiles they are left out (``q_indices is None``, as
            ``BlockMask.from_kv_blocks(compute_q_blocks=False)`` does): the mask then serves
            forward passes only, and skips the largest tensors here (1 GiB each at T=65536,
            Hkv=4, G=16).
        q_offset: queries at an offset: ``block_indices``' rows are the positions
            ``q_offset .. q_offset + T - 1`` over ``q_offset + T`` keys (the mask is
            ``(B, Hkv, T*G, q_offset + T)``, the indices in ``[-1, Ns)`` of that length); the
            user's ``mask_mod`` sees positions. Not with ``doc_start``.

    A KV tile is listed for a Q tile when a token of the tile selected a block that overlaps
    the KV tile at or before the token; it is full when every token of the tile selected all of
    it and the tile lies wholly before the first token. Nothing here is ``T x T``, and nothing
    but the range check of ``block_indices`` (one read, skipped while tracing or capturing a
    CUDA graph) syncs with the host.

    When the KV tile is ``l'`` (the default for power-of-two ``l'``), the lists are built from
    the selections directly: the KV lists are only as wide as the candidates of one Q tile
    (``tokens per tile * n``), not ``ceil(T / l')``, so ``BlockMask.to_dense()`` and printing,
    which assume full width, do not apply to them. The transposed (Q) lists that the backward
    pass reads are ``(B, Hkv, ceil(T/l'), Q tiles)`` int32, as in every BlockMask.

    Raises:
        TypeError, ValueError: naming the argument: ``block_indices`` as for
            :func:`selection_bits` (values outside ``[-1, Ns)``), ``config`` not an
            :class:`NSAConfig`, ``group_size`` not a positive int, a ``mask_mod`` that is not
            callable, a bad ``block_size``, ``doc_start`` not an integer ``(T,)`` tensor on
            ``block_indices``' device, ``transposed`` not a bool.
    """
    check_config(config)
    check_index_tensor("block_indices", block_indices, 4)
    check_int("group_size", group_size, 1)
    check_callable("mask_mod", mask_mod)
    if block_size is not None:
        block_size = check_block_size(block_size)
    _check_doc_start(doc_start, block_indices, "block_indices")
    check_bool("transposed", transposed)
    check_int("q_offset", q_offset, 0)
    if q_offset and doc_start is not None:
        raise ValueError("q_offset is not supported with doc_start (packed rows)")
    _check_selection(block_indices, config, q_offset)
    return _selection_block_mask(block_indices, config, group_size, mask_mod, block_size, doc_start, transposed,
                                 q_offset)


def _selection_block_mask(block_indices, config, group_size=1, mask_mod=None, block_size=None, doc_start=None,
                          transposed=True, q_offset=0) -> BlockMask:
    """:func:`selection_block_mask` after validation (the flex backend's, whose ``attend`` has
    checked the selection)."""
    G = group_size
    if block_size is None:
        # doc-local blocks of a packed row start anywhere, so no KV tile is one block
        block_size = selection_tile(G, config) if doc_start is None else (Q_BLOCK, KV_BLOCK)
    qb, kb = block_size
    ns = config.num_select_blocks(q_offset + block_indices.shape[2])
    bits = _selection_bits(block_indices, config, ns)
    selected = selection_mask(bits, config.select_block, G, doc_start, q_offset)
    if mask_mod is not None:

        def user(b, h, q_idx, kv_idx):
            return mask_mod(b, h * G + q_idx % G, q_idx // G + q_offset, kv_idx)

        selected = and_masks(selected, user)
    full_allowed = mask_mod is None and doc_start is None
    if kb == config.select_block and doc_start is None:
        return _block_tiles(block_indices, config, G, (qb, kb), selected, full_allowed, transposed, q_offset)
    return _spanning_tiles(block_indices, config, G, (qb, kb), selected, full_allowed, doc_start, q_offset)


def _block_tiles(block_indices, config, G, block_size, mask_mod, full_allowed, transposed=True,
                 q_offset=0) -> BlockMask:
    """KV tile = selection block: each Q tile lists the union of its tokens' blocks (token row
    ``t`` at position ``q_offset + t``)."""
    B, H, T, n = block_indices.shape
    qb, ls = block_size
    dev = block_indices.device
    rows = T * G
    S = q_offset + T  # the keys
    nq, ns = -(-rows // qb), config.num_select_blocks(S)
    idx, valid = _sort_unique_blocks(block_indices, ns)  # (B, H, T, n)

    # The tokens of each Q tile: at most P, the first tok0, the last tok1.
    P = qb // G if qb % G == 0 else (qb - 1) // G + 2
    r0 = torch.arange(nq, device=dev) * qb
    tok0 = r0 // G
    tok1 = (torch.clamp(r0 + qb, max=rows) - 1) // G
    tok = tok0[:, None] + torch.arange(P, device=dev)  # (nq, P)
    in_tile = tok <= tok1[:, None]
    tok = torch.clamp(tok, max=T - 1)
    cand = torch.where(valid, idx, ns)[:, :, tok]  # (B, H, nq, P, n)
    cand = torch.where(in_tile[..., None], cand, ns).flatten(-2)
    cand = torch.sort(cand, dim=-1).values  # (B, H, nq, P*n), ascending, ns = nothing
    W = cand.shape[-1]

    # Each block once, at the last of its run; the run's length is how many tokens chose it
    # (repeats within a token are already gone).
    pos = torch.arange(W, device=dev)
    first = torch.ones_like(cand, dtype=torch.bool)
    first[..., 1:] = cand[..., 1:] != cand[..., :-1]
    last = torch.ones_like(first)
    last[..., :-1] = first[..., 1:]
    run_start = torch.cummax(torch.where(first, pos, 0), dim=-1).values
    listed = last & (cand < ns)
    if full_allowed:
        ntok = (tok1 - tok0 + 1)[:, None]
        whole = (r0 + qb <= rows)[:, None]
        before = (cand + 1) * ls - 1 <= tok0[:, None] + q_offset
        full = listed & (pos - run_start + 1 == ntok) & whole & before
    else:
        full = torch.zeros_like(listed)
    partial = listed & ~full

    kv_num, kv_idx = _compact(cand, partial, ns)
    full_num, full_idx = _compact(cand, full, ns)
    q_num = q_idx = full_q_num = full_q_idx = None
    if transposed:
        q_num, q_idx = _transpose_lists(kv_num, kv_idx, ns)
        full_q_num, full_q_idx = _transpose_lists(full_num, full_idx, ns)
    return BlockMask(
        seq_lengths=(rows, S),
        kv_num_blocks=kv_num,
        kv_indices=kv_idx,
        full_kv_num_blocks=full_num,
        full_kv_indices=full_idx,
        q_num_blocks=q_num,
        q_indices=q_idx,
        full_q_num_blocks=full_q_num,
        full_q_indices=full_q_idx,
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
    )


def _compact(values: Tensor, keep: Tensor, fill: int) -> tuple[Tensor, Tensor]:
    """Kept entries of each row (ascending ``values``, all below ``fill``) moved to the front:
    ``(count (..., R) int32, indices (..., R, W) int32, zero past the count)``."""
    ordered = torch.sort(torch.where(keep, values, fill), dim=-1).values
    num = keep.sum(dim=-1, dtype=torch.int32)
    return num, torch.where(ordered < fill, ordered, 0).to(torch.int32)


def _transpose_lists(num: Tensor, indices: Tensor, n_cols: int) -> tuple[Tensor, Tensor]:
    """Row-wise block lists to column-wise ones, ascending, without a dense ``rows x cols``
    boolean: ``(B, H, R)``, ``(B, H, R, W)`` -> ``(B, H, C)``, ``(B, H, C, R)`` int32.

    The listed (column, row) pairs are sorted by column then row; a pair's place in its
    column's list is its rank minus the column's start.
    """
    B, H, R, W = indices.shape
    dev = indices.device
    listed = (torch.arange(W, device=dev) < num[..., None]).flatten()
    seg = (torch.arange(B * H, device=dev).view(B, H, 1, 1) * n_cols + indices.long()).flatten()
    row = torch.arange(R, device=dev).view(1, 1, R, 1).expand(B, H, R, W).flatten()
    nseg = B * H * n_cols
    key = torch.sort(torch.where(listed, seg * R + row, nseg * R)).values
    counts = torch.zeros(nseg, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, torch.where(listed, seg, 0), listed.long())
    start = torch.cumsum(counts, 0) - counts
    key_seg = key // R
    real = key_seg < nseg
    key_seg = torch.where(real, key_seg, 0)
    dest = key_seg * R + torch.arange(key.numel(), device=dev) - start[key_seg]
    # Unlisted pairs add 0 at slot 0: harmless, and no boolean indexing (no host sync).
    out = torch.zeros(nseg * R, dtype=torch.int32, device=dev)
    out.scatter_add_(0, torch.where(real, dest, 0), torch.where(real, key % R, 0).to(torch.int32))
    return counts.view(B, H, n_cols).to(torch.int32), out.view(B, H, n_cols, R)


def _spanning_tiles(block_indices, config, G, block_size, mask_mod, full_allowed, doc_start=None,
                    q_offset=0) -> BlockMask:
    """Any KV tile: count, per (Q tile, KV tile), the (token, block) pairs that reach it (token
    row ``t`` at position ``q_offset + t``)."""
    B, H, T, n = block_indices.shape
    qb, kb = block_size
    ls = config.select_block
    dev = block_indices.device
    rows = T * G
    S = q_offset + T  # the keys
    nq, nk = -(-rows // qb), -(-S // kb)

    # Repeats count once: the full-tile test below counts (token, block) pairs.
    idx, valid = _sort_unique_blocks(block_indices, config.num_select_blocks(S))  # (B, H, T, n)
    t = torch.arange(T, device=dev)
    # KV tiles a block touches, clipped to the tile holding the query (causality).
    span = (ls - 1) // kb + 2
    base = 0 if doc_start is None else doc_start.long()[:, None]  # doc-local blocks start there
    first = torch.div(base + idx * ls, kb, rounding_mode="floor")
    last = torch.minimum(torch.div(base + (idx + 1) * ls - 1, kb, rounding_mode="floor"), ((t + q_offset) // kb)[:, None])
    kv_t = first[..., None] + torch.arange(span, device=dev)  # (B, H, T, n, span)
    ok = valid[..., None] & (kv_t <= last[..., None])
    # Q tiles the token's G rows fall in.
    qspan = (G - 1) // qb + 2
    q_first, q_last = t * G // qb, (t * G + G - 1) // qb
    q_t = q_first[:, None] + torch.arange(qspan, device=dev)  # (T, qspan)
    q_ok = q_t <= q_last[:, None]

    bh = torch.arange(B * H, device=dev).view(B, H, 1, 1, 1, 1)
    flat = (bh * nq + q_t.view(1, 1, T, 1, 1, qspan)) * nk + kv_t[..., None]
    valid = ok[..., None] & q_ok.view(1, 1, T, 1, 1, qspan)
    dump = B * H * nq * nk
    flat = torch.where(valid, flat, dump)
    counts = torch.zeros(dump + 1, dtype=torch.int32, device=dev)
    counts.scatter_add_(0, flat.flatten(), torch.ones_like(flat.flatten(), dtype=torch.int32))
    counts = counts[:dump].view(B, H, nq, nk)
    any_tiles = counts > 0

    full_tiles = None
    if full_allowed and (kb % ls == 0 or ls % kb == 0):
        # Aligned tiles: each touched tile lies in one block, or holds kb/ls whole blocks, so a
        # tile is fully selected iff every token of the Q tile brought all its blocks.
        per_tile = kb // ls if kb % ls == 0 else 1
        q0 = torch.arange(nq, device=dev) * qb
        tok0 = q0 // G
        tok1 = torch.clamp(q0 + qb, max=rows).sub(1) // G
        ntok = (tok1 - tok0 + 1)[:, None]
        c0 = torch.arange(nk, device=dev) * kb
        whole = ((q0 + qb <= rows)[:, None]) & (c0 + kb <= S)
        before = (c0 + kb - 1) <= tok0[:, None] + q_offset
        full_tiles = (counts == ntok * per_tile) & whole & before
    return _from_tiles(any_tiles, full_tiles, (rows, S), mask_mod, block_size)
