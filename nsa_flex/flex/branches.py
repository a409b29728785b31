"""The NSA branches on FlexAttention, each one ``flex_attention`` call with its own BlockMask.

- compressed: ``T`` queries against ``Tc`` compressed blocks (:func:`compressed_branch`).
- selected: queries folded so a GQA group shares rows (``(B, Hkv, T*G, Dk)``), BlockMask built
  from ``block_indices``; one K/V tile load serves the whole group, as in the paper's kernel
  (:func:`selected_branch`), or FlexAttention's forward with the Triton backward
  (:func:`selected_branch_triton_backward`).
- sliding window (:func:`window_branch`).

Which of these runs, and where the Triton kernels run instead, is
:func:`nsa_flex.dispatch.plan`'s choice; how FlexAttention is invoked is :mod:`.call`'s. A
user's ``score_mod``/``mask_mod`` always sees ``(b, query head, token, key position)``; the
wrappers here translate from each branch's own coordinates.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .. import tuning
from .._layout import fold_rows, unfold_rows
from ..block_indices import kernel_indices
from ..config import NSAConfig
from ..dispatch import needs_backward
from ..masks.block_masks import (
    compressed_block_mask,
    compressed_varlen_block_mask,
    shift_score_queries,
    sliding_window_block_mask,
    sliding_window_varlen_block_mask,
)
from ..masks.selected import _selection_block_mask
from ..ops.selected import attach_selected_backward_op
from ..varlen import Documents
from .call import run_flex

__all__ = ["compressed_branch", "window_branch", "selected_branch", "selected_branch_triton_backward"]


def compressed_branch(
    q: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    config: NSAConfig,
    scale: float,
    score_mod: Callable | None = None,
    mask_mod: Callable | None = None,
    docs: Documents | None = None,
    return_lse: bool = False,
    q_offset: int = 0,
) -> Tensor | tuple[Tensor, Tensor]:
    """``o_cmp (B, Hq, T, Dv)``: attention over the compressed blocks visible to each query.

    ``q_offset``: the queries are the positions ``q_offset .. q_offset + T - 1`` and ``k_cmp``,
    ``v_cmp`` hold the ``num_compressed(q_offset + T)`` blocks up to the last one (not with
    ``docs``).

    ``docs``: a packed row's documents; ``k_cmp``/``v_cmp`` then hold each document's blocks
    concatenated, and a query sees only its own document's blocks. ``return_lse``: also the
    ``(B, Hq, T)`` float32 natural log-sum-exp of each query's scores, ``-inf`` where it sees
    no block (selection's kernel reuses it, the ``"triton_lse"`` scoring path)."""
    B, Hq, T, _ = q.shape
    if k_cmp.shape[2] == 0:
        # No block is complete yet: the branch contributes exactly 0 (docs/semantics.md). Adding the
        # empty (hence zero) sums keeps k_cmp/v_cmp in the graph, so whatever produced them gets
        # zero gradients rather than none (DDP counts a parameter without a gradient as unused).
        zero = k_cmp.sum() + v_cmp.sum()
        out = q.new_zeros(B, Hq, T, v_cmp.shape[-1]) + zero
        return (out, q.new_full((B, Hq, T), float("-inf"), dtype=torch.float32)) if return_lse else out
    d = config.compress_stride
    if docs is not None:
        # Padded to T // d blocks (at least the documents' total): the shapes, hence the
        # compiled kernels, then depend on T alone, not on each batch's document lengths.
        padded = T // d
        block_mask = compressed_varlen_block_mask(docs, config, mask_mod=mask_mod, num_blocks=padded)
        pad = (0, 0, 0, padded - k_cmp.shape[2])
        k_cmp, v_cmp = torch.nn.functional.pad(k_cmp, pad), torch.nn.functional.pad(v_cmp, pad)
    else:
        block_mask = compressed_block_mask(T, config, device=q.device, mask_mod=mask_mod, q_offset=q_offset)
    user_score = None
    if score_mod is not None and docs is not None:
        last = docs.compressed_last_tokens(config, padded)

        def user_score(score, b, h, q_idx, kv_idx):  # block kv_idx is seen at its last token
            return score_mod(score, b, h, q_idx, last[kv_idx])

    elif score_mod is not None:

        def user_score(score, b, h, q_idx, kv_idx):  # block kv_idx is seen at its last token
            return score_mod(score, b, h, q_idx, config.compressed_last_token(kv_idx))

    user_score = shift_score_queries(user_score, q_offset)
    G = Hq // k_cmp.shape[1]
    if tuning.compressed_kv_per_head(q.is_cuda, G, needs_backward(q, k_cmp, v_cmp)):
        k_cmp, v_cmp = k_cmp.repeat_interleave(G, dim=1), v_cmp.repeat_interleave(G, dim=1)
    return run_flex(q, k_cmp, v_cmp, user_score, block_mask, scale, return_lse)


def window_branch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    config: NSAConfig,
    scale: float,
    score_mod: Callable | None = None,
    mask_mod: Callable | None = None,
    docs: Documents | None = None,
    q_offset: int = 0,
) -> Tensor:
    """``o_swa (B, Hq, T, Dv)``: the last ``window`` keys up to each query (``docs``: within its
    document). ``q_offset``: the queries are the positions ``q_offset ..``, over
    ``q_offset + T`` keys (not with ``docs``)."""
    if docs is not None:
        block_mask = sliding_window_varlen_block_mask(docs, config.window, mask_mod=mask_mod)
    else:
        block_mask = sliding_window_block_mask(q.shape[2], config.window, device=q.device, mask_mod=mask_mod,
                                               q_offset=q_offset)
        score_mod = shift_score_queries(score_mod, q_offset)
    return run_flex(q, k, v, score_mod, block_mask, scale)


def selected_branch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_indices: Tensor,
    config: NSAConfig,
    scale: float,
    score_mod: Callable | None = None,
    mask_mod: Callable | None = None,
    docs: Documents | None = None,
    q_offset: int = 0,
) -> Tensor:
    """``o_slc (B, Hq, T, Dv)`` on FlexAttention, forward and backward (the ``"flex"`` path):
    each query attends the keys ``s <= t`` of its selected blocks (``docs``: doc-local block
    indices, counted from each token's document start; ``q_offset``: the queries are the
    positions ``q_offset ..`` over ``q_offset + T`` keys, not with ``docs``)."""
    G = q.shape[1] // k.shape[1]
    compiled_cuda = q.is_cuda and torch.compiler.is_compiling()
    # Fold the group into rows, so that one K/V tile load serves the G heads of a group.
    q_rows = fold_rows(q, G)
    # The transposed lists only a backward reads (FlexAttention's checks for them even on its
    # CPU path) are left out of forward-only masks.
    # A backward also runs for tensors a score_mod captures (selection_grad's importance, a
    # learned bias) when q, k and v need none.
    backward = needs_backward(q, k, v) or (torch.is_grad_enabled() and score_mod is not None)
    # (A packed row's doc-local blocks start anywhere: its tiles are the 128x128 default.)
    block_mask = _selection_block_mask(  # attend has checked the selection
        block_indices, config, group_size=G, mask_mod=mask_mod,
        # (compiled CUDA graphs, which plan this path only with mods or packed rows: 128x128
        # tiles, never the one-token tiles, dispatch.selected_path says why)
        block_size=tuning.flex_selected_tile(q.is_cuda, G, config, backward or compiled_cuda) if docs is None else None,
        doc_start=None if docs is None else docs.start, transposed=backward, q_offset=q_offset,
    )
    user_score = None
    if score_mod is not None:

        def user_score(score, b, h, q_idx, kv_idx):
            return score_mod(score, b, h * G + q_idx % G, q_idx // G + q_offset, kv_idx)

    return unfold_rows(run_flex(q_rows, k, v, user_score, block_mask, scale), G)


def selected_branch_triton_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_indices: Tensor,
    config: NSAConfig,
    scale: float,
    score_mod: Callable | None = None,
    mask_mod: Callable | None = None,
    docs: Documents | None = None,
    q_offset: int = 0,
) -> Tensor:
    """The selected branch for eager CUDA training (the ``"flex_fwd_triton_bwd"`` path):
    FlexAttention's forward over one-token tiles, then nsa_flex's Triton backward kernels from
    its output and log-sum-exp.

    FlexAttention's own backward cannot take those tiles there (``tuning.flex_selected_tile``
    says why); over 128x128 tiles it would do several times the work. So the forward runs
    outside autograd (forward-only BlockMask, detached inputs), and the custom op
    ``nsa_flex::attach_selected_backward`` unfolds its output and gives it the Triton gradient.
    Planned only without score_mod, mask_mod or packed rows (the Triton kernels run no mods;
    :func:`nsa_flex.dispatch.selected_path`), so ``score_mod``, ``mask_mod`` and ``docs`` are
    ``None`` (the signature is every selected branch's). In compiled CUDA graphs the branch is
    the Triton kernels' op instead; on the CPU this path runs only when tests patch the dispatch.
    """
    G = q.shape[1] // k.shape[1]
    # no_grad: as an inference call (one compiled entry for both); detach: the public
    # flex_attention refuses CPU inputs that require grad, even under no_grad
    with torch.no_grad():
        block_mask = _selection_block_mask(  # attend has checked the selection
            block_indices, config, group_size=G, block_size=tuning.selection_tile(G, config), transposed=False,
            q_offset=q_offset,
        )
        out, lse = run_flex(fold_rows(q.detach(), G), k.detach(), v.detach(), None, block_mask, scale, return_lse=True)
        lse = unfold_rows(lse, G)
    idx = kernel_indices(block_indices, config.select_block, k.shape[2])
    # the Triton kernels write dQ/dK/dV with the strides of q/k/v: keep those dense
    return attach_selected_backward_op(
        q.contiguous(), k.contiguous(), v.contiguous(), idx, out, lse, config.select_block, scale, q_offset
    )
