"""`attend()`: the whole NSA layer as one function.

It validates every argument, asks :func:`nsa_flex.dispatch.plan` which path each branch takes,
runs the branches (FlexAttention's in :mod:`nsa_flex.flex`, the Triton selected branch in
:mod:`nsa_flex.triton_backend`, selection in :mod:`nsa_flex.selection`) and gates them
(:mod:`nsa_flex.gating`). `BACKENDS = ("flex", "triton", "reference")` are the accepted values
of `backend`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from . import dispatch, reference, selection, triton_backend, varlen
from ._validation import (
    BACKENDS,
    check_backend,
    check_block_indices,
    check_bool,
    check_callable,
    check_gates,
    check_kernel_head_dims,
    check_qk_cmp,
    check_qkv,
    resolve_q_offset,
    resolve_scale,
)
from .compression import mean_compress
from .config import NSAConfig, resolve_config
from .flex import branches
from .gating import gate
from .scoring import straight_through_score_mod
from .triton_support import check_triton

__all__ = ["attend", "NSAAux", "BACKENDS"]


def _check_triton_args(q: Tensor, score_mod, mask_mod) -> None:
    check_triton(q)
    if score_mod is not None or mask_mod is not None:
        raise ValueError(
            "the triton backend's selected-branch kernel runs no score_mod or mask_mod; "
            "use backend='flex' for them"
        )


class NSAAux(NamedTuple):
    """What `attend(..., return_aux=True)` (and `SparseAttention(..., return_aux=True)`) returns
    beside the output.

    Attributes:
        block_indices: `(B, Hkv, T, n)` int32 (or the given tensor), the selection used,
            computed or given: valid indices ascending, then `-1`.
        o_cmp, o_slc, o_swa: `(B, Hq, T, Dv)`, each branch's output before gating.
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
    q_offset: int | None = None,
) -> Tensor | tuple[Tensor, NSAAux]:
    """Native Sparse Attention: compressed, selected and sliding-window attention, gated.

    `o = g[..., 0] * o_cmp + g[..., 1] * o_slc + g[..., 2] * o_swa` (paper eq. 5), causal,
    as defined in docs/semantics.md.

    Args:
        q: `(B, Hq, T, Dk)` floating queries.
        k: `(B, Hkv, T, Dk)` keys, `q`'s dtype and device; `Hkv` divides `Hq` and query head
            `h` reads KV head `h // (Hq // Hkv)`.
        v: `(B, Hkv, T, Dv)` values, likewise; `Dv` may differ from `Dk`.
        gates: `(B, Hq, T, 3)` floating branch weights on `q`'s device, in the order
            (compressed, selected, window), cast to `q`'s dtype; `None` weighs each branch 1.
        config: hyperparameters (default `NSAConfig()`, the paper's).
        k_cmp, v_cmp: `(B, Hkv, Tc, Dk)` / `(B, Hkv, Tc, Dv)` compressed keys and values,
            `Tc = config.num_compressed(T)`, `q`'s dtype and device; each defaults to the mean
            over its block (`mean_compress`).
        block_indices: `(B, Hkv, T, n)` int32/int64 selection in `[-1, Ns)` (`-1` is
            padding, a repeated block counts once); when given, scoring is skipped.
        scale: score scale, a finite real (default `Dk ** -0.5`).
        score_mod: a FlexAttention `score_mod(score, b, h, q_idx, kv_idx) -> score` applied in
            every branch and to the scores selection ranks by.
        mask_mod: a FlexAttention `mask_mod(b, h, q_idx, kv_idx) -> bool` ANDed into every
            branch and into selection's scoring.
        backend: `"flex"` (FlexAttention), `"triton"` (the hand-written selected-branch
            kernel, compressed and window branches on FlexAttention; no `score_mod` or
            `mask_mod`; float16/bfloat16/float32; needs the `triton` package; CUDA, or the CPU
            under `TRITON_INTERPRET=1`) or `"reference"` (the dense oracle of
            `nsa_flex.reference`, for checks: `T x T` work, in query chunks of bounded memory).
            Which implementation runs each branch is :func:`nsa_flex.dispatch.plan`'s choice.
        return_aux: also return :class:`NSAAux`.
        cu_seqlens: documents packed in one row (`B = 1`), FlashAttention's convention:
            `(N+1,)` int32/int64 offsets from 0 to `T`, nondecreasing (empty documents
            allowed; with `q_offset`, to `Tk`), or a :class:`nsa_flex.varlen.Documents` made from them. Each document is
            attended as if alone ([varlen.md](varlen.md)): `k_cmp`/`v_cmp` then hold each
            document's compressed blocks concatenated (`Tc = sum_n config.num_compressed(len_n)`),
            `block_indices` count from each token's document start, and the mods see packed
            positions. A tensor is read on the host once per call.
        selection_grad: gradients through the selection, straight-through (below); `"flex"`
            and `"reference"` only, not with `cu_seqlens`.
        q_offset: queries at an offset over a longer K/V (below): `q (B, Hq, Tq, Dk)` holds
            the queries at positions `q_offset .. q_offset + Tq - 1`, `k`/`v` `(B, Hkv, Tk, D)`
            the positions `0 .. Tk - 1`, with `q_offset + Tq <= Tk`. A Python int; `None`
            (default) means `Tk - Tq`, the last positions (with `Tq == Tk`, the plain call).

    Returns:
        `out (B, Hq, T, Dv)` in `q`'s dtype, or `(out, aux)` when `return_aux=True`.

    Raises:
        TypeError: a tensor argument is not a tensor or not floating point (`block_indices`:
            not int32/int64); `k`, `v`, `k_cmp`, `v_cmp` differ in dtype from `q`; `config` is
            not an `NSAConfig`; `scale` is not a real number; `score_mod`/`mask_mod` not
            callable; `return_aux` or `selection_grad` not a `bool`; `q_offset` not an int or
            `None` (a `bool` or a tensor included).
        ValueError: wrong rank; batch sizes, sequence lengths or head sizes that disagree (`k` and
            `v` of different lengths, `q` longer than them); a negative `q_offset`, or
            `q_offset + Tq > Tk`; `Hq`
            not a multiple of `Hkv`; a tensor on another device than `q`; `gates` not
            `(B, Hq, T, 3)`; `k_cmp`/`v_cmp` not holding `Tc` blocks, or with other heads than
            `k`; `block_indices` not `(B, Hkv, T, n)`, or with a value outside `[-1, Ns)`; a
            `scale` that is NaN or infinite; an unknown `backend`; `Dk` or `Dv` above 256, or
            below 16 with the flex or triton backend on CUDA (FlexAttention's kernels need at
            least 16); with `backend="triton"`, a `score_mod` or `mask_mod`, or a CPU tensor
            outside Triton's interpreter (a float64 input is a `TypeError` there).
        ImportError: `backend="triton"` without the `triton` package (the message says what to
            install). Nothing else in `attend` needs Triton: on CUDA without it, block
            selection runs in PyTorch.

    All of these are raised before any kernel runs. The value check on `block_indices` reads the
    tensor, so it is skipped while tracing under `torch.compile` and while capturing a CUDA
    graph; the `scale` check is also skipped while tracing (Dynamo may hand it over as a
    symbolic value). Shapes, dtypes and devices are always checked.

    **Layout.** Heads first, `(B, H, T, D)`, as `F.scaled_dot_product_attention` takes it.
    Tensors in FlashAttention's sequence-first layout `(B, T, H, D)` must be transposed
    (`x.transpose(1, 2)`) before the call, and the checks cannot always tell: with `Hq != Hkv`
    such tensors disagree in their third dimension and raise (`sequence lengths differ`), but
    with `Hq == Hkv` they are valid heads-first shapes as well (`T` heads of `H` tokens each)
    and are attended as such, with no error.

    **Coordinates seen by `score_mod` and `mask_mod`.** Always `(b, query head h in [0, Hq),
    query token q_idx in [0, T), key position kv_idx)`, whatever the branch does internally:

    - sliding-window and selected branches: `kv_idx` is the key's token position. (The selected
      branch runs on folded queries, see [design.md](design.md); the wrapper unfolds the
      indices before calling your function.)
    - compressed branch and selection scoring: `kv_idx` is the position of compressed block
      `i`'s **last token**, `i*d + l - 1` (the position from which the block is visible).

    The causal and branch masks are applied in addition to yours; a `mask_mod` can only remove
    keys. As in FlexAttention, write the mods with elementwise tensor operations (no Python `if`
    on index values). Selection scoring calls them once on broadcastable index tensors
    (`b (B,1,1,1)`, `h (1,Hq,1,1)`, `q_idx (1,1,C,1)`, `kv_idx (1,1,1,Tc)`, int32) rather than
    per element, so indexing a captured tensor (`doc_id[q_idx]`) works in both places. A query
    whose branch has no key left gets 0 from that branch, never NaN.

    **Gradients** reach `q, k, v, gates, k_cmp, v_cmp` (and, through `mean_compress` or a
    learned compressor, whatever produced them), and tensors a `score_mod` captures (a learned
    ALiBi slope, say). The selection itself is not differentiable. With `selection_grad=True`
    the selected branch's scores are multiplied by `w = 1 + imp - imp.detach()`, where `imp` is
    the (query, block) pair's importance from :func:`nsa_flex.block_scores`, before the user's
    `score_mod`. `w` is exactly 1, so the output is unchanged; the selected branch's gradient
    then also reaches `q` and `k_cmp` (so a learned key compressor learns from what selection
    needed) through the compressed probabilities that ranked the blocks. Cost: a differentiable
    `(B, Hkv, T, Ns)` importance (its chunks recomputed in the backward), and on CUDA the
    selected branch's FlexAttention backward over 128x128 tiles; [training.md](training.md)
    measured it. `tests/test_selection_grad.py` checks the gradient against finite differences
    of the surrogate whose weight is `imp - imp_0 + 1`.

    **Queries at an offset.** With `q_offset`, `gates` are `(B, Hq, Tq, 3)`, `block_indices`
    `(B, Hkv, Tq, n)` (in `[-1, Ns)`, `Ns = config.num_select_blocks(Tk)`), `k_cmp`/`v_cmp`
    hold `Tc = config.num_compressed(Tk)` blocks, and `score_mod`/`mask_mod` see each query's
    position `q_idx` (as on the whole sequence). The output `(B, Hq, Tq, Dv)`, the aux and the
    gradients are those of rows `q_offset .. q_offset + Tq - 1` of the call on the whole
    sequence, whatever the other queries hold: what chunked prefill and context parallelism
    need. Keys after the last query are invisible (causality) and are not read; the work
    follows `Tq` (the queries are not padded to `Tk`). With `cu_seqlens` (which then describes
    the `Tk` keys' row) each document holding some of the queries is attended alone at its own
    offset, one call per document (a Python loop). Under `torch.compile` the offset is an
    int the graph guards on: a second value recompiles once with the offset symbolic, and
    later values reuse that graph (one more recompile where `q_offset + Tq` reaches `Tk`).

    **Compiling.** With the flex or triton backend, under `torch.compile(fullgraph=True)` this
    traces without graph breaks, forward and backward (the Triton kernels are custom operators,
    [compile.md](compile.md)).

    Example: two documents packed into one sequence, kept apart by a `mask_mod`, with an
    ALiBi-style `score_mod`; the flex backend checked against the reference:

    ```python
    import torch
    import nsa_flex
    from nsa_flex import NSAConfig

    torch.manual_seed(0)
    config = NSAConfig(num_selected=4, window=128)
    B, Hq, Hkv, T, D = 1, 4, 2, 512, 32
    q = torch.randn(B, Hq, T, D, dtype=torch.float64)
    k = torch.randn(B, Hkv, T, D, dtype=torch.float64)
    v = torch.randn(B, Hkv, T, D, dtype=torch.float64)

    doc = (torch.arange(T) >= 300).int()  # tokens 0..299 and 300..511
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.float64)

    def same_doc(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx)

    out, aux = nsa_flex.attend(q, k, v, config=config, mask_mod=same_doc, score_mod=alibi, return_aux=True)
    ref = nsa_flex.attend(q, k, v, config=config, mask_mod=same_doc, score_mod=alibi, backend="reference")
    print(out.shape, aux.block_indices.shape)  # torch.Size([1, 4, 512, 32]) torch.Size([1, 2, 512, 4])
    print(((out - ref).norm() / ref.norm()).item() < 1e-10)  # True
    ```

    In the compressed branch a block is judged by its last token, so with a document mask a
    compressed block that straddles a document boundary is visible to the later document (it
    mixes tokens of both). To keep packed documents fully apart (no block straddles two
    documents, blocks counted from each document's start), pass `cu_seqlens=` instead
    ([varlen.md](varlen.md)).
    """
    check_qkv(q, k, v, longer_kv=True)
    T, Tk = q.shape[2], k.shape[2]
    offset = resolve_q_offset(q_offset, T, Tk)
    config = resolve_config(config)
    scale = resolve_scale(scale, q)
    docs = None
    tc, ns = config.num_compressed(Tk), config.num_select_blocks(Tk)
    if cu_seqlens is not None:
        docs = varlen.resolve(cu_seqlens, Tk, q.device, q.shape[0])
        tc, ns = docs.num_compressed(config), docs.num_select_blocks(config)
    if gates is not None:
        check_gates(gates, q)
    Dv = v.shape[-1]
    if k_cmp is not None:
        check_qk_cmp(q, k_cmp, config, "k_cmp", num_blocks=None if docs is None else tc, seq_len=Tk)
        if k_cmp.shape[1] != k.shape[1]:
            raise ValueError(f"k_cmp has {k_cmp.shape[1]} heads but k has {k.shape[1]}")
    if v_cmp is not None:
        check_qk_cmp(q, v_cmp, config, "v_cmp", head_dim=Dv, num_blocks=None if docs is None else tc, seq_len=Tk)
        if v_cmp.shape[1] != k.shape[1]:
            raise ValueError(f"v_cmp has {v_cmp.shape[1]} heads but k has {k.shape[1]}")
    if block_indices is not None:
        check_block_indices(block_indices, q, k.shape[1], ns, config.num_selected)
        if docs is not None:
            varlen.check_block_indices(block_indices, docs, config.select_block, offset)
    check_callable("score_mod", score_mod)
    check_callable("mask_mod", mask_mod)
    check_backend(backend)
    if backend != "reference":
        check_kernel_head_dims(q, v, backend)
    if backend == "triton":
        _check_triton_args(q, score_mod, mask_mod)
    check_bool("return_aux", return_aux)
    check_bool("selection_grad", selection_grad)
    if selection_grad and backend == "triton":
        raise ValueError("selection_grad needs backend='flex' or 'reference': the triton kernel runs no score_mod")
    if selection_grad and docs is not None:
        raise ValueError("selection_grad is not supported with cu_seqlens yet")

    if docs is not None and T != Tk:
        return _attend_documents_at_offset(
            q, k, v, gates, offset, docs, config=config, k_cmp=k_cmp, v_cmp=v_cmp, block_indices=block_indices,
            scale=scale, score_mod=score_mod, mask_mod=mask_mod, backend=backend, return_aux=return_aux,
        )
    given = block_indices
    if offset + T < Tk:
        # Keys past the last query are invisible (causality): the call runs on the keys
        # 0 .. offset + T - 1 and their blocks, where q's rows are the last positions.
        k, v, k_cmp, v_cmp, block_indices = _up_to_last_query(k, v, k_cmp, v_cmp, block_indices, config, offset + T)

    paths = dispatch.plan(q, k, v, backend=backend, score_mod=score_mod, mask_mod=mask_mod, docs=docs,
                          block_indices=block_indices, selection_grad=selection_grad)
    if paths.compressed == "reference":
        cu = None if docs is None else torch.tensor((0, *docs.lengths)).cumsum(0)
        r = reference.attend(
            q, k, v, gates, config=config, k_cmp=k_cmp, v_cmp=v_cmp,
            block_indices=block_indices, scale=scale, score_mod=score_mod, mask_mod=mask_mod,
            cu_seqlens=cu, selection_grad=selection_grad, q_offset=offset,
        )
        out, aux = r.out, NSAAux(r.block_indices if given is None else given, r.o_cmp, r.o_slc, r.o_swa)
        return (out, aux) if return_aux else out

    k_cmp = mean_compress(k, config, docs) if k_cmp is None else k_cmp
    v_cmp = mean_compress(v, config, docs) if v_cmp is None else v_cmp
    if paths.scoring == "triton_lse":
        o_cmp, lse = branches.compressed_branch(q, k_cmp, v_cmp, config, scale, docs=docs, return_lse=True,
                                                q_offset=offset)
        block_indices = selection._select_rows(q, k_cmp, config, scale, None, None, None, docs, "triton", offset, lse)
    else:
        if paths.scoring != "given":
            block_indices = selection._select_rows(q, k_cmp, config, scale, score_mod, mask_mod, None, docs,
                                                   paths.scoring, q_offset=offset)
        o_cmp = branches.compressed_branch(q, k_cmp, v_cmp, config, scale, score_mod, mask_mod, docs=docs, q_offset=offset)
    slc_score_mod = score_mod
    if selection_grad:
        importance = selection._block_scores(q, k_cmp, config, scale, score_mod, mask_mod, None, offset)
        slc_score_mod = straight_through_score_mod(importance, config.select_block, q.shape[1] // k.shape[1], score_mod,
                                                   q_offset=offset)
    o_slc = _run_selected(paths.selected, q, k, v, block_indices, config, scale, slc_score_mod, mask_mod, docs,
                          q_offset=offset)
    o_swa = branches.window_branch(q, k, v, config, scale, score_mod, mask_mod, docs=docs, q_offset=offset)
    out = gate(o_cmp, o_slc, o_swa, gates)
    return (out, NSAAux(block_indices if given is None else given, o_cmp, o_slc, o_swa)) if return_aux else out


def _attend_documents_at_offset(q, k, v, gates, offset: int, docs: varlen.Documents, *, k_cmp, v_cmp,
                                block_indices, return_aux, score_mod, mask_mod, config, **kw):
    """A packed row's queries at an offset (validated): each document that holds some of them
    attended alone, at its own offset (the definition of a packed row), the pieces
    concatenated. Only the documents from the first query's to the last query's are read."""
    T = q.shape[2]
    offsets = docs.compressed_offsets(config)
    pieces = []
    for n, (a, length) in enumerate(zip(docs.starts, docs.lengths)):
        lo, hi = max(a, offset), min(a + length, offset + T)
        if lo >= hi:
            continue
        rows, keys, blocks = slice(lo - offset, hi - offset), slice(a, a + length), slice(offsets[n], offsets[n + 1])

        def part(x, s):
            return None if x is None else x[:, :, s]

        pieces.append(attend(
            q[:, :, rows], k[:, :, keys], v[:, :, keys], part(gates, rows), config=config, k_cmp=part(k_cmp, blocks),
            v_cmp=part(v_cmp, blocks), block_indices=part(block_indices, rows), q_offset=lo - a,
            score_mod=varlen.shift_score_mod(score_mod, a), mask_mod=varlen.shift_mask_mod(mask_mod, a),
            return_aux=True, **kw,
        ))
    out = torch.cat([o for o, _ in pieces], dim=2) if len(pieces) > 1 else pieces[0][0]
    if not return_aux:
        return out
    aux = NSAAux(*(torch.cat([getattr(x, f) for _, x in pieces], dim=2) for f in NSAAux._fields))
    return out, NSAAux(aux.block_indices if block_indices is None else block_indices, *aux[1:])


def _up_to_last_query(k, v, k_cmp, v_cmp, block_indices, config: NSAConfig, end: int):
    """``k, v`` (and ``k_cmp, v_cmp``, ``block_indices`` when given) cut to the keys
    ``0 .. end - 1``, ``end`` one past the last query: the rest is invisible to every query.
    A given block past ``end``'s last one lies after every query's own block, so it selects
    nothing; it becomes ``-1``."""
    tc, ns = config.num_compressed(end), config.num_select_blocks(end)
    k, v = k[:, :, :end], v[:, :, :end]
    k_cmp = None if k_cmp is None else k_cmp[:, :, :tc]
    v_cmp = None if v_cmp is None else v_cmp[:, :, :tc]
    if block_indices is not None:
        block_indices = torch.where(block_indices < ns, block_indices, -1).to(block_indices.dtype)
    return k, v, k_cmp, v_cmp, block_indices


def _run_selected(path: str, q, k, v, block_indices, config, scale, score_mod=None, mask_mod=None, docs=None,
                  q_offset: int = 0) -> Tensor:
    """The selected branch on ``path`` (:func:`nsa_flex.dispatch.selected_path`); every path
    takes the same arguments (``q_offset``: the queries' first position)."""
    if path == "triton":
        run = triton_backend.selected_branch
    elif path == "flex_fwd_triton_bwd":
        run = branches.selected_branch_triton_backward
    else:
        run = branches.selected_branch
    return run(q, k, v, block_indices, config, scale, score_mod, mask_mod, docs, q_offset=q_offset)


def _selected_branch(q, k, v, block_indices, config, scale, score_mod=None, mask_mod=None, docs=None, *,
                     backend: str = "flex") -> Tensor:
    """``o_slc (B, Hq, T, Dv)`` of the selected branch alone, planned and run as ``attend``
    would (arguments valid, as ``attend`` checks them): what the bench and the tests time and
    compile."""
    path = dispatch.selected_path(q, k, v, backend=backend, has_score_mod=score_mod is not None,
                                  has_mask_mod=mask_mod is not None, packed=docs is not None)
    return _run_selected(path, q, k, v, block_indices, config, scale, score_mod, mask_mod, docs)
