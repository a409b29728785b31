"""NSA's three masks as FlexAttention ``mask_mod`` factories, and the BlockMasks built from them.

Each factory returns a small pure ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor`` (the
attention-gym habit), so it composes with a user's own mask through
``torch.nn.attention.flex_attention.and_masks``. The BlockMask builders never evaluate a mask
over ``T x T``: they compute which ``(Q tile, KV tile)`` pairs can hold a visible pair with
vectorised integer arithmetic, then hand the lists to ``BlockMask.from_kv_blocks``. Tiles where
every pair is visible are listed as *full* (FlexAttention skips the mask_mod there); the rest as
partial, where the mask_mod decides each pair.

Print a BlockMask (``print(block_mask)``) to see its tiles.

Every factory and builder checks its arguments when called (``TypeError``/``ValueError`` naming
the argument), never inside a ``mask_mod``: those bodies are traced by FlexAttention and
``torch.compile``. Checks that read tensor values (index ranges) are skipped while tracing or
capturing a CUDA graph.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, and_masks

from ._validation import (
    check_block_size,
    check_bool,
    check_callable,
    check_index_range,
    check_index_tensor,
    check_int,
    check_same_device,
    resolve_device,
)
from .config import NSAConfig, check_config
from .tuning import KV_BLOCK, Q_BLOCK, selection_tile
from .selection import _sort_unique_blocks
from .varlen import check_documents

__all__ = [
    "causal_mask",
    "compressed_mask",
    "sliding_window_mask",
    "selection_mask",
    "selection_bits",
    "compressed_block_mask",
    "sliding_window_block_mask",
    "selection_block_mask",
    "block_mask_from_tiles",
    "selection_tile",
    "document_mask",
    "compressed_varlen_block_mask",
    "sliding_window_varlen_block_mask",
    "Q_BLOCK",
    "KV_BLOCK",
]

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]



# --------------------------------------------------------------------------- mask_mods


def causal_mask(b, h, q_idx, kv_idx):
    """Key ``kv_idx`` is at or before query ``q_idx``."""
    return kv_idx <= q_idx


def compressed_mask(config: NSAConfig) -> MaskMod:
    """Compressed branch: query ``q_idx`` sees compressed block ``kv_idx`` once the block's last
    token ``kv_idx*d + l - 1`` is at or before it.

    Raises:
        TypeError: ``config`` is not an :class:`NSAConfig`.
    """
    check_config(config)
    l, d = config.compress_block, config.compress_stride

    def compressed(b, h, q_idx, kv_idx):
        return kv_idx * d + (l - 1) <= q_idx

    return compressed


def sliding_window_mask(window: int) -> MaskMod:
    """Sliding window of ``window`` keys ending at the query: ``q_idx - window < kv_idx <= q_idx``.

    Raises:
        TypeError, ValueError: ``window`` is not a positive int.
    """
    check_int("window", window, 1)

    def sliding_window(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    return sliding_window


def selection_bits(block_indices: Tensor, config: NSAConfig) -> Tensor:
    """Pack each query's selected blocks into bits: ``(B, Hkv, T, n) -> (B, Hkv, T, ceil(Ns/32))``
    int32, bit ``j % 32`` of word ``j // 32`` set iff block ``j`` is selected.

    ``-1`` entries select nothing; a block listed twice counts once.

    Raises:
        TypeError: ``block_indices`` is not an int32/int64 tensor, ``config`` not an
            :class:`NSAConfig`.
        ValueError: ``block_indices`` is not 4-D, or holds a value outside ``[-1, Ns)`` (a
            device read, skipped while tracing or capturing).
    """
    check_config(config)
    _check_selection(block_indices, config)
    return _selection_bits(block_indices, config)


def _check_selection(block_indices, config: NSAConfig) -> None:
    """``block_indices (B, Hkv, T, n)`` int32/int64 in ``[-1, Ns)``."""
    check_index_tensor("block_indices", block_indices, 4)
    T = block_indices.shape[2]
    ns = config.num_select_blocks(T)
    check_index_range("block_indices", block_indices, -1, ns, seq_len=T)


def _selection_bits(block_indices: Tensor, config: NSAConfig) -> Tensor:
    """:func:`selection_bits` after validation."""
    B, H, T, n = block_indices.shape
    ns = config.num_select_blocks(T)
    words = -(-ns // 32)
    idx, valid = _sort_unique_blocks(block_indices, ns)  # unique, so the sum below is a bitwise OR
    # What is dropped adds 0 to word 0. (Writing it to a spare word sliced off afterwards
    # would leave a view, which the CPU FlexAttention template cannot take as a mask buffer.)
    word = torch.where(valid, idx // 32, 0)
    bit = torch.bitwise_left_shift(torch.ones_like(idx, dtype=torch.int32), (idx % 32).to(torch.int32))
    bit = torch.where(valid, bit, 0)
    out = torch.zeros(B, H, T, words, dtype=torch.int32, device=idx.device)
    return out.scatter_add_(-1, word, bit)


def selection_mask(bits: Tensor, select_block: int, group_size: int = 1, doc_start: Tensor | None = None) -> MaskMod:
    """Selected branch: query ``t`` sees key ``kv_idx <= t`` iff ``kv_idx``'s selection block is
    among the query's selected blocks.

    Args:
        bits: ``(B, Hkv, T, words)`` from :func:`selection_bits`.
        select_block: ``l'``.
        group_size: ``G``. The mask is written for *folded* queries, as the flex backend runs
            the selected branch: KV head ``h``'s query row ``q_idx`` is token ``q_idx // G`` of
            query head ``h*G + q_idx % G``, so the ``G`` heads that share a selection share a
            tile of rows. With ``G=1`` rows are tokens.
        doc_start: for a packed row, ``(T,)`` the packed position of each token's document
            start: block indices are then doc-local (block ``j`` of token ``t`` is keys
            ``doc_start[t] + j*l' ..``), and keys before the document are masked.

    Raises:
        TypeError, ValueError: naming the argument: ``bits`` not a 4-D int32/int64 tensor,
            ``select_block`` or ``group_size`` not a positive int, ``doc_start`` not an integer
            ``(T,)`` tensor on ``bits``' device.
    """
    check_index_tensor("bits", bits, 4)
    check_int("select_block", select_block, 1)
    check_int("group_size", group_size, 1)
    _check_doc_start(doc_start, bits, "bits")

    _, H, T, W = bits.shape
    # Index a flat view: Inductor's CPU FlexAttention template misreads multi-dimensional
    # indexing into a mask buffer computed inside the same graph (wrong results, torch 2.13).
    flat = bits.view(-1)
    if doc_start is not None:

        def selected_in_document(b, h, q_idx, kv_idx):
            t = q_idx // group_size
            rel = kv_idx - doc_start[t]
            j = torch.where(rel >= 0, rel, 0) // select_block  # never a negative word index
            word = flat[((b * H + h) * T + t) * W + j // 32]
            return (((word >> (j % 32)) & 1) == 1) & (rel >= 0) & (kv_idx <= t)

        return selected_in_document

    def selected(b, h, q_idx, kv_idx):
        t = q_idx // group_size
        j = kv_idx // select_block
        word = flat[((b * H + h) * T + t) * W + j // 32]
        return (((word >> (j % 32)) & 1) == 1) & (kv_idx <= t)

    return selected


def _check_doc_start(doc_start, like: Tensor, like_name: str) -> None:
    """``doc_start``: ``None`` or ``(T,)`` int32/int64 on ``like``'s device, ``T = like.shape[2]``."""
    if doc_start is None:
        return
    T = like.shape[2]
    check_index_tensor("doc_start", doc_start, 1)
    check_same_device("doc_start", doc_start, like, like_name)
    if doc_start.shape[0] != T:
        raise ValueError(f"doc_start must have shape (T,) = ({T},), got {tuple(doc_start.shape)}")


# ----------------------------------------------------------------- tiles -> BlockMask


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


@functools.lru_cache(maxsize=64)
def _compressed_block_mask_cached(seq_len, config, device, block_size):
    return _build_compressed_block_mask(seq_len, config, device, None, block_size)


def _build_compressed_block_mask(seq_len, config, device, user_mask, block_size):
    l, d = config.compress_block, config.compress_stride
    tc = config.num_compressed(seq_len)
    any_t, full_t = _interval_tiles(
        seq_len,
        tc,
        lo=lambda t: torch.zeros_like(t),
        hi=lambda t: torch.div(t - (l - 1), d, rounding_mode="floor"),
        block_size=block_size,
        device=device,
    )
    user = None
    if user_mask is not None:

        def user(b, h, q_idx, kv_idx):  # the user sees block kv_idx at its last token
            return user_mask(b, h, q_idx, kv_idx * d + (l - 1))

    mask_mod, full_t = _with_user_mask(compressed_mask(config), user, full_t)
    return _from_tiles(any_t, full_t, (seq_len, tc), mask_mod, block_size)


def compressed_block_mask(
    seq_len: int,
    config: NSAConfig,
    *,
    device: torch.device | str = "cpu",
    mask_mod: MaskMod | None = None,
    block_size: tuple[int, int] = (Q_BLOCK, KV_BLOCK),
) -> BlockMask:
    """BlockMask of the compressed branch: ``T`` queries against ``Tc`` compressed blocks.

    Args:
        seq_len: ``T`` (must have ``Tc >= 1``).
        mask_mod: the user's mask, ANDed in; it sees compressed block ``i`` at position
            ``i*d + l - 1``, its last token.

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
    if config.num_compressed(seq_len) < 1:
        raise ValueError(f"seq_len {seq_len} is shorter than compress_block {config.compress_block}")
    if mask_mod is None and not torch.compiler.is_compiling():
        return _compressed_block_mask_cached(seq_len, config, device, block_size)
    return _build_compressed_block_mask(seq_len, config, device, mask_mod, block_size)


@functools.lru_cache(maxsize=64)
def _window_block_mask_cached(seq_len, window, device, block_size):
    return _build_window_block_mask(seq_len, window, device, None, block_size)


def _build_window_block_mask(seq_len, window, device, user_mask, block_size):
    any_t, full_t = _interval_tiles(
        seq_len,
        seq_len,
        lo=lambda t: t - (window - 1),
        hi=lambda t: t,
        block_size=block_size,
        device=device,
    )
    mask_mod, full_t = _with_user_mask(sliding_window_mask(window), user_mask, full_t)
    return _from_tiles(any_t, full_t, (seq_len, seq_len), mask_mod, block_size)


def sliding_window_block_mask(
    seq_len: int,
    window: int,
    *,
    device: torch.device | str = "cpu",
    mask_mod: MaskMod | None = None,
    block_size: tuple[int, int] = (Q_BLOCK, KV_BLOCK),
) -> BlockMask:
    """BlockMask of the sliding-window branch (``T x T``), with the user's ``mask_mod`` ANDed in.
    Cached like :func:`compressed_block_mask`.

    Raises:
        TypeError, ValueError: naming the argument: ``seq_len`` or ``window`` not a positive
            int, and the other arguments as for :func:`compressed_block_mask`.
    """
    check_int("seq_len", seq_len, 1)
    check_int("window", window, 1)
    device = resolve_device(device)
    check_callable("mask_mod", mask_mod)
    block_size = check_block_size(block_size)
    if mask_mod is None and not torch.compiler.is_compiling():
        return _window_block_mask_cached(seq_len, window, device, block_size)
    return _build_window_block_mask(seq_len, window, device, mask_mod, block_size)


def selection_block_mask(
    block_indices: Tensor,
    config: NSAConfig,
    *,
    group_size: int = 1,
    mask_mod: MaskMod | None = None,
    block_size: tuple[int, int] | None = None,
    doc_start: Tensor | None = None,
    transposed: bool = True,
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
    _check_selection(block_indices, config)
    check_int("group_size", group_size, 1)
    check_callable("mask_mod", mask_mod)
    if block_size is not None:
        block_size = check_block_size(block_size)
    _check_doc_start(doc_start, block_indices, "block_indices")
    check_bool("transposed", transposed)
    return _selection_block_mask(block_indices, config, group_size, mask_mod, block_size, doc_start, transposed)


def _selection_block_mask(block_indices, config, group_size=1, mask_mod=None, block_size=None, doc_start=None,
                          transposed=True) -> BlockMask:
    """:func:`selection_block_mask` after validation (the flex backend's, whose ``attend`` has
    checked the selection)."""
    G = group_size
    if block_size is None:
        # doc-local blocks of a packed row start anywhere, so no KV tile is one block
        block_size = selection_tile(G, config) if doc_start is None else (Q_BLOCK, KV_BLOCK)
    qb, kb = block_size
    bits = _selection_bits(block_indices, config)
    selected = selection_mask(bits, config.select_block, G, doc_start)
    if mask_mod is not None:

        def user(b, h, q_idx, kv_idx):
            return mask_mod(b, h * G + q_idx % G, q_idx // G, kv_idx)

        selected = and_masks(selected, user)
    full_allowed = mask_mod is None and doc_start is None
    if kb == config.select_block and doc_start is None:
        return _block_tiles(block_indices, config, G, (qb, kb), selected, full_allowed, transposed)
    return _spanning_tiles(block_indices, config, G, (qb, kb), selected, full_allowed, doc_start)


def _block_tiles(block_indices, config, G, block_size, mask_mod, full_allowed, transposed=True) -> BlockMask:
    """KV tile = selection block: each Q tile lists the union of its tokens' blocks."""
    B, H, T, n = block_indices.shape
    qb, ls = block_size
    dev = block_indices.device
    rows = T * G
    nq, ns = -(-rows // qb), config.num_select_blocks(T)
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
        before = (cand + 1) * ls - 1 <= tok0[:, None]
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
        seq_lengths=(rows, T),
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


def _spanning_tiles(block_indices, config, G, block_size, mask_mod, full_allowed, doc_start=None) -> BlockMask:
    """Any KV tile: count, per (Q tile, KV tile), the (token, block) pairs that reach it."""
    B, H, T, n = block_indices.shape
    qb, kb = block_size
    ls = config.select_block
    dev = block_indices.device
    rows = T * G
    nq, nk = -(-rows // qb), -(-T // kb)

    # Repeats count once: the full-tile test below counts (token, block) pairs.
    idx, valid = _sort_unique_blocks(block_indices, config.num_select_blocks(T))  # (B, H, T, n)
    t = torch.arange(T, device=dev)
    # KV tiles a block touches, clipped to the tile holding the query (causality).
    span = (ls - 1) // kb + 2
    base = 0 if doc_start is None else doc_start.long()[:, None]  # doc-local blocks start there
    first = torch.div(base + idx * ls, kb, rounding_mode="floor")
    last = torch.minimum(torch.div(base + (idx + 1) * ls - 1, kb, rounding_mode="floor"), (t // kb)[:, None])
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
        whole = ((q0 + qb <= rows)[:, None]) & (c0 + kb <= T)
        before = (c0 + kb - 1) <= tok0[:, None]
        full_tiles = (counts == ntok * per_tile) & whole & before
    return _from_tiles(any_tiles, full_tiles, (rows, T), mask_mod, block_size)


# ------------------------------------------------------------- packed documents (varlen)


def document_mask(doc_id: Tensor) -> MaskMod:
    """Packed documents: query ``q_idx`` sees key ``kv_idx`` only in its own document.

    Args:
        doc_id: ``(T,)`` int32/int64, the document of each packed token
            (``nsa_flex.varlen.documents(cu_seqlens).doc_id``).

    Raises:
        TypeError, ValueError: ``doc_id`` is not a 1-D int32/int64 tensor.
    """
    check_index_tensor("doc_id", doc_id, 1)

    def same_document(b, h, q_idx, kv_idx):
        return doc_id[q_idx] == doc_id[kv_idx]

    return same_document


def compressed_varlen_block_mask(docs, config: NSAConfig, *, mask_mod: MaskMod | None = None,
                                 block_size: tuple[int, int] = (Q_BLOCK, KV_BLOCK),
                                 num_blocks: int | None = None) -> BlockMask:
    """BlockMask of the compressed branch over a packed row: ``T`` queries against the
    documents' compressed blocks, concatenated (``(1, 1, T, Tc)``).

    Query ``t`` sees block ``c`` iff both are in one document and the block's last token is at
    or before ``t``. Each query's visible blocks are an interval (its document's first ones),
    so the tiles come from :func:`_interval_tiles` as for one sequence.

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
    l, d = config.compress_block, config.compress_stride
    first, cdoc = docs.compressed_blocks(config)
    tc, T, dev = first.numel(), docs.seq_len, docs.device
    if tc < 1:
        raise ValueError("no document is as long as compress_block: there is no compressed block")
    last = (first + (l - 1)).to(torch.int32)  # packed position of each block's last token
    cdoc = cdoc.to(torch.int32)
    if num_blocks is not None and num_blocks != tc:
        if num_blocks < tc:
            raise ValueError(f"num_blocks ({num_blocks}) must be at least the documents' {tc} compressed blocks")
        # padding: in no document, and shown to user mods at the last token (a valid position)
        last = torch.nn.functional.pad(last, (0, num_blocks - tc), value=T - 1)
        cdoc = torch.nn.functional.pad(cdoc, (0, num_blocks - tc), value=-1)
        tc = num_blocks
    offsets = torch.tensor(docs.compressed_offsets(config)[:-1], dtype=torch.int64, device=dev)
    lo_t = offsets[docs.doc_id.long()]
    seen = torch.div(docs.pos.long() - (l - 1), d, rounding_mode="floor") + 1
    hi_t = lo_t + seen.clamp_min(0) - 1
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
    T, dev = docs.seq_len, docs.device
    lo_t = torch.maximum(torch.arange(T, device=dev) - (window - 1), docs.start.long())
    any_t, full_t = _interval_tiles(T, T, lo=lambda r: lo_t[r], hi=lambda r: r, block_size=block_size, device=dev)
    mask = and_masks(sliding_window_mask(window), document_mask(docs.doc_id))
    mask, full_t = _with_user_mask(mask, mask_mod, full_t)
    return _from_tiles(any_t, full_t, (T, T), mask, block_size)
