"""A selection as the backends read it: ``block_indices (B, Hkv, T, n)``, ``-1`` padded.

Every backend reads a given selection through :func:`sort_unique_blocks`, so that a block
listed twice counts once everywhere; the Triton kernels take it as :func:`kernel_indices`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._validation import check_index_range, check_index_tensor, check_int
from .config import num_select_blocks


def sort_unique_blocks(block_indices: Tensor, num_blocks: int) -> tuple[Tensor, Tensor]:
    """Each row's blocks sorted, with a mask that is false for ``-1`` padding and repeats.

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


def kernel_indices(block_indices: Tensor, select_block: int, T: int) -> Tensor:
    """``block_indices`` as the Triton kernels read them: each row ascending and unique, ``-1``
    last, int32 and contiguous."""
    idx, valid = _sort_unique_blocks(block_indices, num_select_blocks(T, select_block))
    return torch.where(valid, idx, -1).to(torch.int32).contiguous()


def drop_past_query(block_indices: Tensor, select_block: int, pos: Tensor) -> Tensor:
    """Doc-local ``block_indices (B, Hkv, T, n)`` of a packed row with each block past its
    query's own (``pos (T,)``, the query's position in its document) set to ``-1``.

    Such a block selects nothing; dropping it keeps its number from reaching the next
    document's blocks when the selection is renumbered across documents (the dK/dV pass's
    inversion)."""
    pos = pos.view(1, 1, -1, 1).long()
    return torch.where(block_indices.long() * select_block <= pos, block_indices, -1)
