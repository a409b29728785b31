"""NSA's masks as FlexAttention ``mask_mod`` factories (the attention-gym habit).

Each factory returns a small pure ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor``, so it
composes with a user's own mask through ``torch.nn.attention.flex_attention.and_masks``. The
factories check their arguments when called (``TypeError``/``ValueError`` naming the argument),
never inside a ``mask_mod``: those bodies are traced by FlexAttention and ``torch.compile``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .._validation import check_index_range, check_index_tensor, check_int, check_same_device
from ..block_indices import _sort_unique_blocks
from ..config import NSAConfig, check_config

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


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

    def compressed(b, h, q_idx, kv_idx):
        return config.compressed_last_token(kv_idx) <= q_idx

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


def _check_selection(block_indices, config: NSAConfig, q_offset: int = 0) -> None:
    """``block_indices (B, Hkv, T, n)`` int32/int64 in ``[-1, Ns)``, ``Ns`` the blocks of the
    ``q_offset + T`` keys up to the last query."""
    check_index_tensor("block_indices", block_indices, 4)
    T = q_offset + block_indices.shape[2]
    check_index_range("block_indices", block_indices, -1, config.num_select_blocks(T), seq_len=T)


def _selection_bits(block_indices: Tensor, config: NSAConfig, num_blocks: int | None = None) -> Tensor:
    """:func:`selection_bits` after validation; ``num_blocks``: ``Ns`` when the keys are longer
    than the queries (queries at an offset)."""
    B, H, T, n = block_indices.shape
    ns = config.num_select_blocks(T) if num_blocks is None else num_blocks
    words = -(-ns // 32)
    idx, valid = _sort_unique_blocks(block_indices, ns)  # unique, so the sum below is a bitwise OR
    # What is dropped adds 0 to word 0. (Writing it to a spare word sliced off afterwards
    # would leave a view, which the CPU FlexAttention template cannot take as a mask buffer.)
    word = torch.where(valid, idx // 32, 0)
    bit = torch.bitwise_left_shift(torch.ones_like(idx, dtype=torch.int32), (idx % 32).to(torch.int32))
    bit = torch.where(valid, bit, 0)
    out = torch.zeros(B, H, T, words, dtype=torch.int32, device=idx.device)
    return out.scatter_add_(-1, word, bit)


def selection_mask(bits: Tensor, select_block: int, group_size: int = 1, doc_start: Tensor | None = None,
                   q_offset: int = 0) -> MaskMod:
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
        q_offset: the position of ``bits``' first query row (queries at an offset): token
            row ``t`` is position ``q_offset + t``, which causality compares keys against.

    Raises:
        TypeError, ValueError: naming the argument: ``bits`` not a 4-D int32/int64 tensor,
            ``select_block`` or ``group_size`` not a positive int, ``doc_start`` not an integer
            ``(T,)`` tensor on ``bits``' device.
    """
    check_index_tensor("bits", bits, 4)
    check_int("select_block", select_block, 1)
    check_int("group_size", group_size, 1)
    _check_doc_start(doc_start, bits, "bits")
    check_int("q_offset", q_offset, 0)

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

    # (no addition at offset 0, so that the plain call's mask traces as it always did)
    shifted = not (isinstance(q_offset, int) and q_offset == 0)

    def selected(b, h, q_idx, kv_idx):
        t = q_idx // group_size
        j = kv_idx // select_block
        word = flat[((b * H + h) * T + t) * W + j // 32]
        return (((word >> (j % 32)) & 1) == 1) & (kv_idx <= (t + q_offset if shifted else t))

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
