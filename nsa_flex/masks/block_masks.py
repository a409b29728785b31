"""BlockMasks of the compressed and sliding-window branches, and BlockMasks from tiles.

The builders never evaluate a mask over ``T x T``: they compute which ``(Q tile, KV tile)``
pairs can hold a visible pair with vectorised integer arithmetic, then hand the lists to
``BlockMask.from_kv_blocks``. Tiles where every pair is visible are listed as *full*
(FlexAttention skips the mask_mod there); the rest as partial, where the mask_mod decides each
pair. In both branches each query sees an interval of keys (:func:`_interval_tiles`), for one
sequence or for a packed row's documents. Print a BlockMask (``print(block_mask)``) to see its
tiles.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, and_masks

from .._validation import check_block_size, check_callable, check_int, check_same_device, resolve_device
from ..config import NSAConfig, check_config
from ..tuning import KV_BLOCK, Q_BLOCK
from ..varlen import check_documents
from .mods import MaskMod, compressed_mask, document_mask, sliding_window_mask


def _tile_lists(tiles: Tensor) -> tuple[Tensor, Tensor]:
    """``(..., nQ, nKV)`` bool -> (count ``(..., nQ)``, indices ``(..., nQ, nKV)`` listed first)."""
    num = tiles.sum(dim=-1, dtype=torch.int32)
    order = torch.sort(tiles.to(torch.int8), dim=-1, descending=True, stable=True).indices
    return num, order.to(torch.int32)


def block_mask_from_tiles(
    any_tiles: Tensor,
    full_tiles: Tensor | None,
    seq_lengths: tuple[int, int],
    mask_mod: MaskMod,
    block_size: tuple[int, int] = (Q_BLOCK, KV_BLOCK),
) -> BlockMask:
    """A BlockMask from per-tile booleans.

    Args:
        any_tiles: ``(B, H, nQ, nKV)`` bool, true where a tile may hold a visible pair.
        full_tiles: same shape, true where every pair of the tile is visible (``mask_mod``
            is then skipped there), or ``None``.
        seq_lengths: ``(q_len, kv_len)``.
        mask_mod: decides each pair in partial tiles (``None``: every pair of a listed tile).
        block_size: ``(Q tile, KV tile)``.

    Raises:
        TypeError, ValueError: naming the argument: tiles that are not 4-D bool tensors of
            ``(ceil(q_len / Q tile), ceil(kv_len / KV tile))`` tiles on one device, lengths that
            are not non-negative ints, a ``mask_mod`` that is not callable, a bad ``block_size``.
    """
    block_size = check_block_size(block_size)
    if not isinstance(seq_lengths, (tuple, list)) or len(seq_lengths) != 2:
        raise TypeError(f"seq_lengths must be a pair of ints (q_len, kv_len), got {seq_lengths!r}")
    for i, n in enumerate(seq_lengths):
        check_int(f"seq_lengths[{i}]", n, minimum=0)
    check_callable("mask_mod", mask_mod)
    _check_tiles("any_tiles", any_tiles, seq_lengths, block_size)
    if full_tiles is not None:
        _check_tiles("full_tiles", full_tiles, seq_lengths, block_size)
        check_same_device("full_tiles", full_tiles, any_tiles, "any_tiles")
        if full_tiles.shape != any_tiles.shape:
            raise ValueError(f"full_tiles has shape {tuple(full_tiles.shape)} but any_tiles {tuple(any_tiles.shape)}")
    return _from_tiles(any_tiles, full_tiles, tuple(seq_lengths), mask_mod, block_size)


def _check_tiles(name: str, tiles, seq_lengths, block_size) -> None:
    if not isinstance(tiles, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tiles).__name__}")
    if tiles.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {tiles.dtype}")
    if tiles.dim() != 4:
        raise ValueError(f"{name} must be (B, H, nQ, nKV), got shape {tuple(tiles.shape)}")
    sizes = (*seq_lengths, *block_size)
    if all(isinstance(x, int) for x in sizes):  # (not symbolic sizes, which would add guards)
        expected = tuple(-(-n // b) for n, b in zip(seq_lengths, block_size))
        if tuple(tiles.shape[-2:]) != expected:
            raise ValueError(
                f"{name} must hold (nQ, nKV) = {expected} tiles for seq_lengths {tuple(seq_lengths)} and "
                f"block_size {tuple(block_size)}, got {tuple(tiles.shape[-2:])}"
            )


def _from_tiles(any_tiles, full_tiles, seq_lengths, mask_mod, block_size) -> BlockMask:
    """:func:`block_mask_from_tiles` after validation."""
    partial = any_tiles if full_tiles is None else any_tiles & ~full_tiles
    kv_num, kv_idx = _tile_lists(partial)
    full_num = full_idx = None
    if full_tiles is not None:
        full_num, full_idx = _tile_lists(full_tiles)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=seq_lengths,
    )


def _interval_tiles(q_len, kv_len, lo, hi, block_size, device):
    """Tiles of a mask where query ``t`` sees the keys ``lo(t) <= s <= hi(t)``, with ``lo`` and
    ``hi`` non-decreasing and consecutive queries' intervals touching, so that the keys a tile of
    queries ``r0..r1`` sees span ``[lo(r0), hi(r1)]`` and those all of them see ``[lo(r1), hi(r0)]``.
    """
    qb, kb = block_size
    nq, nk = -(-q_len // qb), -(-kv_len // kb)
    r0 = torch.arange(nq, device=device) * qb
    r1 = torch.clamp(r0 + qb, max=q_len) - 1
    c0 = torch.arange(nk, device=device) * kb
    c1 = torch.clamp(c0 + kb, max=kv_len) - 1
    r0, r1 = r0[:, None], r1[:, None]
    any_tiles = (c0 <= hi(r1)) & (c1 >= lo(r0))
    # Tiles cut by the end of either sequence stay partial, as create_block_mask leaves them.
    whole = (r0 + qb <= q_len) & (c0 + kb <= kv_len)
    full_tiles = any_tiles & whole & (c0 >= lo(r1)) & (c1 <= hi(r0))
    return any_tiles[None, None], full_tiles[None, None]


def _with_user_mask(mask_mod: MaskMod, user_mask: MaskMod | None, full_tiles):
    if user_mask is None:
        return mask_mod, full_tiles
    # The user's mask may cut any tile, so no tile is known to be full.
    return and_masks(mask_mod, user_mask), None


def shift_queries(mask_mod: MaskMod, q_offset) -> MaskMod:
    """``mask_mod`` written for query positions, called with query rows that start at position
    ``q_offset`` (queries at an offset); ``mask_mod`` itself when the offset is 0."""
    if isinstance(q_offset, int) and q_offset == 0:
        return mask_mod

    def shifted(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx + q_offset, kv_idx)

    return shifted


def shift_score_queries(score_mod, q_offset):
    """:func:`shift_queries` for a ``score_mod`` (``None`` stays ``None``)."""
    if score_mod is None or (isinstance(q_offset, int) and q_offset == 0):
        return score_mod

    def shifted(score, b, h, q_idx, kv_idx):
        return score_mod(score, b, h, q_idx + q_offset, kv_idx)

    return shifted


def check_q_offset(q_offset) -> None:
    """``q_offset``: an int ``>= 0`` (a symbolic one passes)."""
    check_int("q_offset", q_offset, 0)


@functools.lru_cache(maxsize=64)
def _compressed_block_mask_cached(seq_len, config, device, block_size, q_offset=0):
    return _build_compressed_block_mask(seq_len, config, device, None, block_size, q_offset)


def _build_compressed_block_mask(seq_len, config, device, user_mask, block_size, q_offset=0):
    tc = config.num_compressed(q_offset + seq_len)
    any_t, full_t = _interval_tiles(
        seq_len,
        tc,
        lo=lambda t: torch.zeros_like(t),
        hi=lambda t: config.num_visible_compressed(t + q_offset) - 1,  # the last block t sees
        block_size=block_size,
        device=device,
    )
    user = None
    if user_mask is not None:

        def user(b, h, q_idx, kv_idx):  # the user sees block kv_idx at its last token
            return user_mask(b, h, q_idx, config.compressed_last_token(kv_idx))

    mask_mod, full_t = _with_user_mask(compressed_mask(config), user, full_t)
    return _from_tiles(any_t, full_t, (seq_len, tc), shift_queries(mask_mod, q_offset), block_size)


def compressed_block_mask(
    seq_len: int,
    config: NSAConfig,
    *,
    device: torch.device | str = "cpu",
    mask_mod: MaskMod | None = None,
    block_size: tuple[int, int] = (Q_BLOCK, KV_BLOCK),
    q_offset: int = 0,
) -> BlockMask:
    """BlockMask of the compressed branch: ``T`` queries against ``Tc`` compressed blocks.

    Args:
        seq_len: ``T``, the queries (must have ``Tc >= 1``).
        mask_mod: the user's mask, ANDed in; it sees compressed block ``i`` at position
            ``i*d + l - 1``, its last token, and the queries at their positions.
        q_offset: the queries' first position: they are ``q_offset .. q_offset + T - 1``, and
            the mask is ``(1, 1, T, Tc)`` with ``Tc = config.num_compressed(q_offset + T)``, the
            blocks up to the last query.

    Without a user mask the result is cached per (length, config, device, tile size) outside
    ``torch.compile``; inside a compiled graph it is rebuilt, from a handful of fused ops.

    Raises:
        TypeError, ValueError: naming the argument: ``seq_len`` not a positive int or shorter
            than ``compress_block``, ``config`` not an :class:`NSAConfig`, a ``device`` torch
            does not know, a ``mask_mod`` that is not callable, a bad ``block_size``.
    """
    check_int("seq_len", seq_len, 1)
    check_config(config)
    device = resolve_device(device)
    check_callable("mask_mod", mask_mod)
    block_size = check_block_size(block_size)
    check_q_offset(q_offset)
    if config.num_compressed(q_offset + seq_len) < 1:
        raise ValueError(
            f"q_offset + seq_len ({q_offset} + {seq_len}) is shorter than compress_block {config.compress_block}"
            if q_offset else f"seq_len {seq_len} is shorter than compress_block {config.compress_block}"
        )
    if mask_mod is None and not torch.compiler.is_compiling():
        return _compressed_block_mask_cached(seq_len, config, device, block_size, q_offset)
    return _build_compressed_block_mask(seq_len, config, device, mask_mod, block_size, q_offset)


@functools.lru_cache(maxsize=64)
def _window_block_mask_cached(seq_len, window, device, block_size, q_offset=0):
    return _build_window_block_mask(seq_len, window, device, None, block_size, q_offset)


def _build_window_block_mask(seq_len, window, device, user_mask, block_size, q_offset=0):
    kv_len = q_offset + seq_len
    any_t, full_t = _interval_tiles(
        seq_len,
        kv_len,
        lo=lambda t: t + q_offset - (window - 1),
        hi=lambda t: t + q_offset,
        block_size=block_size,
        device=device,
    )
    mask_mod, full_t = _with_user_mask(sliding_window_mask(window), user_mask, full_t)
    return _from_tiles(any_t, full_t, (seq_len, kv_len), shift_queries(mask_mod, q_offset), block_size)


def sliding_window_block_mask(
    seq_len: int,
    window: int,
    *,
    device: torch.device | str = "cpu",
    mask_mod: MaskMod | None = None,
    block_size: tuple[int, int] = (Q_BLOCK, KV_BLOCK),
    q_offset: int = 0,
) -> BlockMask:
    """BlockMask of the sliding-window branch (``T x T``), with the user's ``mask_mod`` ANDed in.
    Cached like :func:`compressed_block_mask`. ``q_offset``: the ``T`` queries are the positions
    ``q_offset .. q_offset + T - 1`` over ``q_offset + T`` keys (``(1, 1, T, q_offset + T)``).

    Raises:
        TypeError, ValueError: naming the argument: ``seq_len`` or ``window`` not a positive
            int, and the other arguments as for :func:`compressed_block_mask`.
    """
    check_int("seq_len", seq_len, 1)
    check_int("window", window, 1)
    device = resolve_device(device)
    check_callable("mask_mod", mask_mod)
    block_size = check_block_size(block_size)
    check_q_offset(q_offset)
    if mask_mod is None and not torch.compiler.is_compiling():
        return _window_block_mask_cached(seq_len, window, device, block_size, q_offset)
    return _build_window_block_mask(seq_len, window, device, mask_mod, block_size, q_offset)


def compressed_varlen_block_mask(docs, config: NSAConfig, *, mask_mod: MaskMod | None = None,
                                 block_size: tuple[int, int] = (Q_BLOCK, KV_BLOCK),
                                 num_blocks: int | None = None) -> BlockMask:
    """BlockMask of the compressed branch over a packed row: ``T`` queries against the
    documents' compressed blocks, concatenated (``(1, 1, T, Tc)``).

    Query ``t`` sees block ``c`` iff both are in one document and the block's last token is at
    or before ``t``. Each query's visible blocks are an interval (its document's first ones),
    so the tiles come from ``_interval_tiles`` as for one sequence.

    Args:
        docs: a :class:`nsa_flex.varlen.Documents`.
        mask_mod: the user's mask in packed positions; it sees block ``c`` at its last token.
        num_blocks: the key length, ``Tc`` or more: blocks past ``Tc`` are padding that no query
            sees (the flex backend pads to ``T // d``, so that the shapes, and so the compiled
            kernels, depend on ``T`` only, not on the document lengths).

    Raises:
        TypeError, ValueError: naming the argument: ``docs`` not a ``Documents``, ``config``
            not an :class:`NSAConfig`, no document as long as ``compress_block``, a
            ``num_blocks`` that is not an int or is below ``Tc``, and ``mask_mod`` and
            ``block_size`` as for :func:`compressed_block_mask`.
    """
    check_documents(docs)
    check_config(config)
    check_callable("mask_mod", mask_mod)
    block_size = check_block_size(block_size)
    if num_blocks is not None:
        check_int("num_blocks", num_blocks)
    build = functools.partial(_compressed_varlen_block_mask, docs, config, mask_mod, block_size, num_blocks)
    if mask_mod is None:  # kept with the documents: every layer of the batch asks for the same one
        return docs.memo(("compressed_block_mask", config, block_size, num_blocks), build)
    return build()


def _compressed_varlen_block_mask(docs, config, mask_mod, block_size, num_blocks) -> BlockMask:
    first, cdoc = docs.compressed_blocks(config)
    tc, T, dev = first.numel(), docs.seq_len, docs.device
    if tc < 1:
        raise ValueError("no document is as long as compress_block: there is no compressed block")
    cdoc = cdoc.to(torch.int32)
    if num_blocks is not None and num_blocks != tc:
        if num_blocks < tc:
            raise ValueError(f"num_blocks ({num_blocks}) must be at least the documents' {tc} compressed blocks")
        # padding: in no document (and shown to user mods at the last token, a valid position)
        cdoc = torch.nn.functional.pad(cdoc, (0, num_blocks - tc), value=-1)
        tc = num_blocks
    last = docs.compressed_last_tokens(config, tc)  # packed position of each block's last token
    offsets = torch.tensor(docs.compressed_offsets(config)[:-1], dtype=torch.int64, device=dev)
    lo_t = offsets[docs.doc_id.long()]
    hi_t = lo_t + config.num_visible_compressed(docs.pos.long()) - 1
    any_t, full_t = _interval_tiles(T, tc, lo=lambda r: lo_t[r], hi=lambda r: hi_t[r], block_size=block_size, device=dev)
    doc_id = docs.doc_id

    def compressed_in_document(b, h, q_idx, kv_idx):
        return (cdoc[kv_idx] == doc_id[q_idx]) & (last[kv_idx] <= q_idx)

    user = None
    if mask_mod is not None:

        def user(b, h, q_idx, kv_idx):  # the user sees block kv_idx at its last token
            return mask_mod(b, h, q_idx, last[kv_idx])

    mask, full_t = _with_user_mask(compressed_in_document, user, full_t)
    return _from_tiles(any_t, full_t, (T, tc), mask, block_size)


def sliding_window_varlen_block_mask(docs, window: int, *, mask_mod: MaskMod | None = None,
                                     block_size: tuple[int, int] = (Q_BLOCK, KV_BLOCK)) -> BlockMask:
    """BlockMask of the sliding-window branch over a packed row (``(1, 1, T, T)``): the window
    of :func:`sliding_window_mask`, cut at the query's document start (:func:`document_mask`).

    Raises:
        TypeError, ValueError: naming the argument: ``docs`` not a ``Documents``, ``window``
            not a positive int, and ``mask_mod`` and ``block_size`` as for
            :func:`sliding_window_block_mask`.
    """
    check_documents(docs)
    check_int("window", window, 1)
    check_callable("mask_mod", mask_mod)
    block_size = check_block_size(block_size)
    build = functools.partial(_sliding_window_varlen_block_mask, docs, window, mask_mod, block_size)
    if mask_mod is None:  # kept with the documents, as the compressed branch's
        return docs.memo(("window_block_mask", window, block_size), build)
    return build()


def _sliding_window_varlen_block_mask(docs, window, mask_mod, block_size) -> BlockMask:
    T, dev = docs.seq_len, docs.device
    lo_t = torch.maximum(torch.arange(T, device=dev) - (window - 1), docs.start.long())
    any_t, full_t = _interval_tiles(T, T, lo=lambda r: lo_t[r], hi=lambda r: r, block_size=block_size, device=dev)
    mask = and_masks(sliding_window_mask(window), document_mask(docs.doc_id))
    mask, full_t = _with_user_mask(mask, mask_mod, full_t)
    return _from_tiles(any_t, full_t, (T, T), mask, block_size)
