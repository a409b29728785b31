"""The flex backend: each NSA branch is one ``flex_attention`` call with its own BlockMask.

- compressed: ``T`` queries against ``Tc`` compressed blocks, mask :func:`~nsa_flex.masks.compressed_mask`.
- selected: queries folded so a GQA group shares rows (``(B, Hkv, T*G, Dk)``), BlockMask built
  from ``block_indices`` (:func:`~nsa_flex.masks.selection_block_mask`); one K/V tile load serves
  the whole group, as in the paper's kernel.
- sliding window: :func:`~nsa_flex.masks.sliding_window_mask`.

A user's ``score_mod``/``mask_mod`` always sees ``(b, query head, token, key position)``;
the wrappers here translate from each branch's own coordinates.

Where it runs: inside ``torch.compile`` the call is traced into the caller's graph; called
eagerly on CUDA it goes through one shared ``torch.compile(flex_attention)`` so that eager users
also get the fused kernel; on the CPU it runs FlexAttention's eager path, which materialises
scores (fine for tests and small inputs) and which PyTorch refuses to differentiate, so a CPU
call that needs gradients runs the same eager FlexAttention operator directly (see
``_cpu_flex_with_grad``).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import flex_attention

from .config import NSAConfig
from .masks import (
    compressed_block_mask,
    compressed_varlen_block_mask,
    selection_block_mask,
    sliding_window_block_mask,
    sliding_window_varlen_block_mask,
)
from .varlen import Documents

__all__ = ["compressed_branch", "selected_branch", "window_branch"]


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def _room_to_recompile():
    """Config patch under which the shared compiled flex_attention may hold many graphs.

    Each branch and each sequence length is its own graph (three per length), and Dynamo's
    default limit of 8 per function is reached by the third length; past it Dynamo would run
    FlexAttention unfused, materialising the scores, with only a warning.
    """
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    return cfg.patch(**{name: max(getattr(cfg, name), _MAX_EAGER_GRAPHS)})


# Enough for ~40 sequence lengths in one process; torch.compile'd models don't use this path.
_MAX_EAGER_GRAPHS = 128


@functools.cache
def _cpu_flex_op():
    from torch._higher_order_ops.flex_attention import flex_attention as flex_op

    def call(q, k, v, score_mod, block_mask, scale):
        return flex_op(q, k, v, score_mod, block_mask, scale, {"OUTPUT_LOGSUMEXP": True})[0]

    # Traced by Dynamo (eager backend), as the public flex_attention does: tensors that the
    # mods capture (a learned ALiBi slope, say) become inputs of the traced call and so get
    # gradients.
    return torch.compile(call, backend="eager", fullgraph=True, dynamic=False)


def _cpu_flex_with_grad(q, k, v, score_mod, block_mask, scale):
    # The public flex_attention refuses CPU inputs that require grad, although its eager
    # operator differentiates fine (FlexAttention's math path: materialised scores, autograd).
    if score_mod is None:
        score_mod = _identity_score
    G = q.shape[1] // k.shape[1]
    if G > 1:  # the operator has no enable_gqa
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    with _room_to_recompile():
        return _cpu_flex_op()(q, k, v, score_mod, block_mask.as_tuple(), scale)


def _identity_score(score, b, h, q_idx, kv_idx):
    return score


def _kernel_options(q: Tensor, v: Tensor) -> dict | None:
    """Tile sizes for the CUDA kernels, chosen to fit shared memory on every dtype and head dim.

    Inductor's single default config for the forward kernel overflowed the H200's 227 KiB of
    shared memory in some cases (bf16 with D=64 at T=4099; fp32 with Dk=192: 240-272 KiB
    asked), and with autotuning off it has no fallback. 64x64 tiles with two stages fit:
    fp32 with D=256 needs ~200 KiB (64x32 tiles past D=128). These are safe rather than tuned.
    """
    if not q.is_cuda:
        return None
    return _tile_options(q.element_size(), max(q.shape[-1], v.shape[-1]))


def _tile_options(element_size: int, head_dim: int) -> dict:
    wide = element_size >= 4 and head_dim > 128
    return {"BLOCK_M": 64, "BLOCK_N": 32 if wide else 64, "num_stages": 2, "num_warps": 4}


def _flex(q, k, v, score_mod, block_mask, scale) -> Tensor:
    kw = dict(
        score_mod=score_mod, block_mask=block_mask, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1], kernel_options=_kernel_options(q, v),
    )
    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, **kw)
    if q.is_cuda:
        with _room_to_recompile():
            return _compiled_flex()(q, k, v, **kw)
    if q.requires_grad or k.requires_grad or v.requires_grad:
        if torch.is_grad_enabled():
            return _cpu_flex_with_grad(q, k, v, score_mod, block_mask, scale)
        # under no_grad nothing will differentiate, but the public call refuses such inputs
        q, k, v = q.detach(), k.detach(), v.detach()
    return flex_attention(q, k, v, **kw)


def compressed_branch(
    q: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    config: NSAConfig,
    scale: float,
    score_mod: Callable | None = None,
    mask_mod: Callable | None = None,
    docs: Documents | None = None,
) -> Tensor:
    """``o_cmp (B, Hq, T, Dv)``: attention over the compressed blocks visible to each query.

    ``docs``: a packed row's documents; ``k_cmp``/``v_cmp`` then hold each document's blocks
    concatenated, and a query sees only its own document's blocks."""
    B, Hq, T, _ = q.shape
    if k_cmp.shape[2] == 0:
        # No block is complete yet: the branch contributes exactly 0 (SPEC). Adding the empty
        # (hence zero) sums keeps k_cmp/v_cmp in the graph, so whatever produced them gets
        # zero gradients rather than none (DDP counts a parameter without a gradient as unused).
        zero = k_cmp.sum() + v_cmp.sum()
        return q.new_zeros(B, Hq, T, v_cmp.shape[-1]) + zero
    l, d = config.compress_block, config.compress_stride
    if docs is not None:
        # Padded to T // d blocks (at least the documents' total): the shapes, hence the
        # compiled kernels, then depend on T alone, not on each batch's document lengths.
        padded = T // d
        block_mask = compressed_varlen_block_mask(docs, config, mask_mod=mask_mod, num_blocks=padded)
        pad = (0, 0, 0, padded - k_cmp.shape[2])
        k_cmp, v_cmp = torch.nn.functional.pad(k_cmp, pad), torch.nn.functional.pad(v_cmp, pad)
    else:
        block_mask = compressed_block_mask(T, config, device=q.device, mask_mod=mask_mod)
    user_score = None
    if score_mod is not None and docs is not None:
        last = (docs.compressed_blocks(config)[0] + (l - 1)).to(torch.int32)
        last = torch.nn.functional.pad(last, (0, T // d - last.numel()), value=T - 1)

        def user_score(score, b, h, q_idx, kv_idx):  # block kv_idx is seen at its last token
            return score_mod(score, b, h, q_idx, last[kv_idx])

    elif score_mod is not None:

        def user_score(score, b, h, q_idx, kv_idx):  # block kv_idx is seen at its last token
            return score_mod(score, b, h, q_idx, kv_idx * d + (l - 1))

    return _flex(q, k_cmp, v_cmp, user_score, block_mask, scale)


def window_branch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    config: NSAConfig,
    scale: float,
    score_mod: Callable | None = None,
    mask_mod: Callable | None = None,
    docs: Documents | None = None,
) -> Tensor:
    """``o_swa (B, Hq, T, Dv)``: the last ``window`` keys up to each query (``docs``: within its
    document)."""
    if docs is not None:
        block_mask = sliding_window_varlen_block_mask(docs, config.window, mask_mod=mask_mod)
    else:
        block_mask = sliding_window_block_mask(q.shape[2], config.window, device=q.device, mask_mod=mask_mod)
    return _flex(q, k, v, score_mod, block_mask, scale)


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
) -> Tensor:
    """``o_slc (B, Hq, T, Dv)``: each query attends the keys ``s <= t`` of its selected blocks
    (``docs``: doc-local block indices, counted from each token's document start)."""
    B, Hq, T, Dk = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G = Hq // Hkv
    # Fold the group into rows: row t*G + g of KV head h is query head h*G + g at token t.
    # A gather rather than transpose+reshape, so that the folded queries are a plain 4-D
    # buffer: Inductor's CPU FlexAttention template cannot take a view of a 5-D one.
    row = torch.arange(T * G, device=q.device)
    q_rows = q.reshape(B, Hkv, G * T, Dk).index_select(2, (row % G) * T + row // G)
    doc_start = None if docs is None else docs.start
    block_mask = selection_block_mask(block_indices, config, group_size=G, mask_mod=mask_mod, doc_start=doc_start)
    user_score = None
    if score_mod is not None:

        def user_score(score, b, h, q_idx, kv_idx):
            return score_mod(score, b, h * G + q_idx % G, q_idx // G, kv_idx)

    out = _flex(q_rows, k, v, user_score, block_mask, scale)
    return out.view(B, Hkv, T, G, Dv).transpose(2, 3).reshape(B, Hq, T, Dv)
