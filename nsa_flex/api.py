"""``attend()``: the whole NSA layer as one function."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from . import flex_backend, reference, selection, triton_backend, varlen
from ._validation import (
    BACKENDS,
    check_block_indices,
    check_callable,
    check_gates,
    check_kernel_head_dims,
    check_qk_cmp,
    check_backend,
    check_bool,
    check_qkv,
    resolve_scale,
)
from .compression import mean_compress
from .config import NSAConfig, resolve_config
from .triton_support import check_triton
from .selection import block_scores, select_blocks, straight_through_score_mod

__all__ = ["attend", "NSAAux", "BACKENDS"]


def _gate(o_cmp: Tensor, o_slc: Tensor, o_swa: Tensor, gates: Tensor | None) -> Tensor:
    """``g[..., 0] * o_cmp + g[..., 1] * o_slc + g[..., 2] * o_swa`` (eq. 5).

    Eagerly, one product and two in-place ``addcmul_``: no temporary beyond the output, and
    autograd keeps nothing new (the branch outputs it needs are already saved by the branches'
    own backward). Under ``torch.compile`` the same sum is written as a reduction over a stacked
    last axis, for Inductor to fuse: the plain elementwise sum would be fused into the CPU
    FlexAttention template as an epilogue, which the template then refuses (torch 2.13,
    "Unsupported for `epilogue_nodes`").
    """
    if torch.compiler.is_compiling():
        branches = torch.stack((o_cmp, o_slc, o_swa), dim=-1)  # (B, Hq, T, Dv, 3)
        if gates is None:
            return branches.sum(dim=-1)
        return (branches * gates.to(branches.dtype)[..., None, :]).sum(dim=-1)
    if gates is None:
        return (o_cmp + o_slc).add_(o_swa)
    g = gates.to(o_cmp.dtype).unsqueeze(-2)  # (B, Hq, T, 1, 3)
    return (o_cmp * g[..., 0]).addcmul_(o_slc, g[..., 1]).addcmul_(o_swa, g[..., 2])


def _check_triton(q: Tensor, score_mod, mask_mod) -> None:
    check_triton(q)
    if score_mod is not None or mask_mod is not None:
        raise ValueError(
            "the triton backend's selected-branch kernel runs no score_mod or mask_mod; "
            "use backend='flex' for them"
        )


class NSAAux(NamedTuple):
    """What ``attend(..., return_aux=True)`` returns beside the output.

    Attributes:
        block_indices: ``(B, Hkv, T, n)`` int32, the selection used (given or computed).
        o_cmp, o_slc, o_swa: ``(B, Hq, T, Dv)``, each branch's output before gating.
    """

    block_indices: Tensor
    o_cmp: Tensor
    o_slc: Tensor
    o_swa: Tensor


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gates: Tensor | None = None,
    *,
    config: NSAConfig | None = None,
    k_cmp: Tensor | None = None,
    v_cmp: Tensor | None = None,
    block_indices: Tensor | None = None,
    scale: float | None = None,
    score_mod: Callable | None = None,
    mask_mod: Callable | None = None,
    backend: str = "flex",
    return_aux: bool = False,
    cu_seqlens: Tensor | varlen.Documents | None = None,
    selection_grad: bool = False,
) -> Tensor | tuple[Tensor, NSAAux]:
    """Native Sparse Attention: compressed, selected and sliding-window attention, gated.

    ``o = g[..., 0] * o_cmp + g[..., 1] * o_slc + g[..., 2] * o_swa`` (paper eq. 5), causal,
    as defined in docs/semantics.md.

    Args:
        q: ``(B, Hq, T, Dk)`` queries.
        k: ``(B, Hkv, T, Dk)`` keys; ``Hkv`` divides ``Hq`` and query head ``h`` reads KV head
            ``h // (Hq // Hkv)``.
        v: ``(B, Hkv, T, Dv)`` values; ``Dv`` may differ from ``Dk``.
        gates: ``(B, Hq, T, 3)`` branch weights in the order (compressed, selected, window);
            ``None`` weighs each branch 1.
        config: hyperparameters (default ``NSAConfig()``, the paper's).
        k_cmp, v_cmp: ``(B, Hkv, Tc, Dk)`` / ``(B, Hkv, Tc, Dv)`` compressed keys and values,
            ``Tc = config.num_compressed(T)``; each defaults to the mean over its block.
        block_indices: ``(B, Hkv, T, n)`` int32/int64 selection in ``[-1, Ns)`` (``-1`` is
            padding, a repeated block counts once); when given, scoring is skipped.
        scale: score scale (default ``Dk ** -0.5``).
        score_mod: a FlexAttention ``score_mod(score, b, h, q_idx, kv_idx)`` applied in every
            branch (and to the scores selection ranks by). ``kv_idx`` is a token position; in
            the compressed branch block ``i`` is at its last token, ``i*d + l - 1``.
        mask_mod: a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` ANDed into every branch,
            with the same coordinates (e.g. to keep packed documents apart).
        backend: ``"flex"`` (FlexAttention), ``"triton"`` (the hand-written selected-branch
            kernel; compressed and window branches on FlexAttention; no ``score_mod`` or
            ``mask_mod``; needs the ``triton`` package; CUDA, or the CPU under
            ``TRITON_INTERPRET=1``) or ``"reference"``
            (the dense oracle, for checks).
        return_aux: also return :class:`NSAAux`.
        cu_seqlens: documents packed in one row (``B = 1``), FlashAttention's convention:
            ``(N+1,)`` int32/int64 offsets from 0 to ``T``, nondecreasing (empty documents
            allowed), or a :class:`nsa_flex.varlen.Documents` made from them. Each document is
            attended as if alone (docs/varlen.md): ``k_cmp``/``v_cmp`` then hold each document's
            compressed blocks concatenated (``Tc = sum_n config.num_compressed(len_n)``),
            ``block_indices`` count from each token's document start, and the mods see packed
            positions. A tensor is read on the host once per call.
        selection_grad: gradients through the selection (straight-through): the selected
            branch's scores are multiplied by ``1 + imp - imp.detach()``, where ``imp`` is each
            (query, block) pair's importance (:func:`nsa_flex.block_scores`). The forward is
            unchanged; the selected branch's gradient then also reaches ``q`` and ``k_cmp``
            through the probabilities selection ranked by. It costs a differentiable
            ``(B, Hkv, T, Ns)`` importance tensor and, on CUDA, FlexAttention's 128x128-tile
            backward for the selected branch. Not with ``backend="triton"`` (its kernel runs
            no score_mod) or ``cu_seqlens``.

    Returns:
        ``out (B, Hq, T, Dv)`` in ``q``'s dtype, or ``(out, aux)``.

    Raises:
        TypeError, ValueError: naming the argument, before any kernel runs.
        ImportError: ``backend="triton"`` without the ``triton`` package (saying what to install).

    The layout is heads first, ``(B, H, T, D)``, as ``F.scaled_dot_product_attention`` takes it;
    transpose sequence-first tensors ``(B, T, H, D)`` (FlashAttention's layout) before calling.
    The checks cannot always catch the wrong layout: when ``Hq != Hkv``, sequence-first tensors
    disagree in their third dimension and raise, but when ``Hq == Hkv`` they are also valid
    heads-first shapes (``T`` heads of ``H`` tokens) and are attended as such, without an error.

    Gradients flow to ``q, k, v, gates, k_cmp, v_cmp`` through the attention; the selection
    itself is not differentiable, unless ``selection_grad=True`` adds its straight-through path.
    With the flex or triton backend, under ``torch.compile(fullgraph=True)`` this traces without
    graph breaks, forward and backward (value checks on ``block_indices`` are skipped while
    tracing; the Triton kernels are custom operators, docs/compile.md).
    """
    check_qkv(q, k, v)
    config = resolve_config(config)
    scale = resolve_scale(scale, q)
    docs = None
    T = q.shape[2]
    tc, ns = config.num_compressed(T), config.num_select_blocks(T)
    if cu_seqlens is not None:
        docs = varlen.resolve(cu_seqlens, T, q.device, q.shape[0])
        tc, ns = docs.num_compressed(config), docs.num_select_blocks(config)
    if gates is not None:
        check_gates(gates, q)
    Dv = v.shape[-1]
    if k_cmp is not None:
        check_qk_cmp(q, k_cmp, config, "k_cmp", num_blocks=tc)
        if k_cmp.shape[1] != k.shape[1]:
            raise ValueError(f"k_cmp has {k_cmp.shape[1]} heads but k has {k.shape[1]}")
    if v_cmp is not None:
        check_qk_cmp(q, v_cmp, config, "v_cmp", head_dim=Dv, num_blocks=tc)
        if v_cmp.shape[1] != k.shape[1]:
            raise ValueError(f"v_cmp has {v_cmp.shape[1]} heads but k has {k.shape[1]}")
    if block_indices is not None:
        check_block_indices(block_indices, q, k.shape[1], ns, config.num_selected)
        if docs is not None:
            varlen.check_block_indices(block_indices, docs, config.select_block)
    check_callable("score_mod", score_mod)
    check_callable("mask_mod", mask_mod)
    check_backend(backend)
    if backend != "reference":
        check_kernel_head_dims(q, v, backend)
    if backend == "triton":
        _check_triton(q, score_mod, mask_mod)
    check_bool("return_aux", return_aux)
    check_bool("selection_grad", selection_grad)
    if selection_grad and backend == "triton":
        raise ValueError("selection_grad needs backend='flex' or 'reference': the triton kernel runs no score_mod")
    if selection_grad and docs is not None:
        raise ValueError("selection_grad is not supported with cu_seqlens yet")

    if backend == "reference":
        cu = None if docs is None else torch.tensor((0, *docs.lengths)).cumsum(0)
        r = reference.attend(
            q, k, v, gates, config=config, k_cmp=k_cmp, v_cmp=v_cmp,
            block_indices=block_indices, scale=scale, score_mod=score_mod, mask_mod=mask_mod,
            cu_seqlens=cu, selection_grad=selection_grad,
        )
        out, aux = r.out, NSAAux(r.block_indices, r.o_cmp, r.o_slc, r.o_swa)
    else:
        k_cmp = mean_compress(k, config, docs) if k_cmp is None else k_cmp
        v_cmp = mean_compress(v, config, docs) if v_cmp is None else v_cmp
        if (block_indices is None and docs is None and q.dtype in (torch.float16, torch.bfloat16)
                and selection._fused_ok(q, score_mod, mask_mod)):
            # The compressed branch first: its log-sum-exp saves the scoring kernel a pass.
            # (float32 keeps the kernel's own: FlexAttention's float32 products follow the
            # global TF32 setting, the kernel's are exact, and p = exp(s - lse) mixes the two.)
            o_cmp, lse = flex_backend.compressed_branch(q, k_cmp, v_cmp, config, scale, return_lse=True)
            block_indices = selection._select(q, k_cmp, config, scale, None, None, None, lse)
        else:
            if block_indices is None:
                block_indices = select_blocks(
                    q, k_cmp, config=config, scale=scale, score_mod=score_mod, mask_mod=mask_mod, cu_seqlens=docs
                )
            o_cmp = flex_backend.compressed_branch(q, k_cmp, v_cmp, config, scale, score_mod, mask_mod, docs=docs)
        if backend == "triton":
            o_slc = triton_backend.selected_branch(q, k, v, block_indices, config, scale, docs=docs)
        else:
            slc_score_mod = score_mod
            if selection_grad:
                importance = block_scores(q, k_cmp, config=config, scale=scale, score_mod=score_mod, mask_mod=mask_mod)
                slc_score_mod = straight_through_score_mod(importance, config.select_block, q.shape[1] // k.shape[1], score_mod)
            o_slc = flex_backend.selected_branch(
                q, k, v, block_indices, config, scale, slc_score_mod, mask_mod, docs=docs
            )
        o_swa = flex_backend.window_branch(q, k, v, config, scale, score_mod, mask_mod, docs=docs)
        out = _gate(o_cmp, o_slc, o_swa, gates)
        aux = NSAAux(block_indices, o_cmp, o_slc, o_swa)
    return (out, aux) if return_aux else out
