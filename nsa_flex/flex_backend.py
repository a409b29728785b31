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

import contextlib
import functools
import math
import warnings
from typing import Callable

import torch
import torch.nn.attention.flex_attention as _flex_module
from torch import Tensor
from torch.nn.attention.flex_attention import AuxRequest, flex_attention

from . import ops, triton_backend, tuning
from .config import NSAConfig
from .masks import (
    compressed_block_mask,
    _selection_block_mask,
    compressed_varlen_block_mask,
    sliding_window_block_mask,
    sliding_window_varlen_block_mask,
)
from .varlen import Documents

__all__ = ["compressed_branch", "selected_branch", "window_branch"]


def _flex_call(q, k, v, **kw):
    return flex_attention(q, k, v, **kw)


@functools.cache
def _compiled_flex():
    # A function of our own rather than flex_attention itself: Dynamo counts graphs, and gives
    # up compiling past its recompile limit, per code object, so a user's (or a benchmark's)
    # torch.compile(flex_attention) must not share this one's count.
    return torch.compile(_flex_call, dynamic=False)


def _room_to_recompile():
    """Config patch under which the shared compiled flex_attention (and the CPU gradient path)
    may hold many graphs.

    Each branch and each shape is its own graph (three per length), and Dynamo's default limit
    of 8 per function is reached by the third length; past it Dynamo would run FlexAttention
    unfused, materialising the scores, with only a warning (or, for the CPU path, which traces
    with ``fullgraph=True``, fail). The total over all functions (``accumulated_recompile_limit``,
    256 by default) is raised with it: a long CPU test session reached it.
    """
    cfg = torch._dynamo.config
    limits = {}
    # Newer names first (torch renamed them); a name the module lacks is left alone, never assumed.
    for names, floor in ((("recompile_limit", "cache_size_limit"), _MAX_EAGER_GRAPHS),
                         (("accumulated_recompile_limit", "accumulated_cache_size_limit"), 4 * _MAX_EAGER_GRAPHS)):
        for name in names:
            value = getattr(cfg, name, None)
            if isinstance(value, int):
                limits[name] = max(value, floor)
                break
    return cfg.patch(**limits)


# About 300 sequence lengths (or shapes) in one process; torch.compile'd models don't use this
# path. An entry is one traced graph and, on CUDA, its compiled kernels.
_MAX_EAGER_GRAPHS = 1024


@functools.cache
def _cpu_flex_op():
    from torch._higher_order_ops.flex_attention import flex_attention as flex_op

    def call(q, k, v, score_mod, block_mask, scale):
        return flex_op(q, k, v, score_mod, block_mask, scale, {"OUTPUT_LOGSUMEXP": True})[:2]

    # Traced by Dynamo (eager backend), as the public flex_attention does: tensors that the
    # mods capture (a learned ALiBi slope, say) become inputs of the traced call and so get
    # gradients.
    return torch.compile(call, backend="eager", fullgraph=True, dynamic=False)


def _cpu_flex_with_grad(q, k, v, score_mod, block_mask, scale, return_lse=False):
    # The public flex_attention refuses CPU inputs that require grad, although its eager
    # operator differentiates fine (FlexAttention's math path: materialised scores, autograd).
    if score_mod is None:
        score_mod = _identity_score
    G = q.shape[1] // k.shape[1]
    if G > 1:  # the operator has no enable_gqa
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    with _room_to_recompile():
        out, lse = _cpu_flex_op()(q, k, v, score_mod, block_mask.as_tuple(), scale)
    # the operator's log-sum-exp is base 2; the public flex_attention returns the natural one
    return (out, lse * math.log(2.0)) if return_lse else out


def _identity_score(score, b, h, q_idx, kv_idx):
    return score


def _flex(q, k, v, score_mod, block_mask, scale, return_lse: bool = False):
    """``flex_attention(q, k, v, ...)`` as this call's context runs it (traced while compiling, the
    shared compiled function on CUDA, the operator under CPU autograd, eager on the CPU);
    ``return_lse``: ``(out, lse)`` with the natural log-sum-exp."""
    kw = dict(
        score_mod=score_mod, block_mask=block_mask, scale=scale,
        # AuxRequest rather than return_lse, which torch deprecates (a FutureWarning per process)
        return_aux=AuxRequest(lse=True) if return_lse else None,
        enable_gqa=q.shape[1] != k.shape[1],
        kernel_options=tuning.flex_kernel_options(q, v, block_mask.BLOCK_SIZE),
    )
    if torch.compiler.is_compiling():
        return _lse_pair(flex_attention(q, k, v, **kw), return_lse)
    if q.is_cuda:
        with _room_to_recompile():
            return _lse_pair(_compiled_flex()(q, k, v, **kw), return_lse)
    if q.requires_grad or k.requires_grad or v.requires_grad:
        if torch.is_grad_enabled():
            return _cpu_flex_with_grad(q, k, v, score_mod, block_mask, scale, return_lse)
        # under no_grad nothing will differentiate, but the public call refuses such inputs
        q, k, v = q.detach(), k.detach(), v.detach()
    with _eager_flex_quietly():
        return _lse_pair(flex_attention(q, k, v, **kw), return_lse)


def _lse_pair(result, return_lse: bool):
    """``flex_attention``'s result as ``_flex`` returns it: ``out``, or ``(out, lse)``."""
    if not return_lse:
        return result
    out, aux = result
    return out, aux.lse


# PyTorch's advice, given on the first eager flex_attention call of a process, to compile it.
_EAGER_FLEX_WARNING = r"flex_attention called without torch\.compile"


@contextlib.contextmanager
def _eager_flex_quietly():
    """Around a call of the public ``flex_attention`` that is eager by choice (the CPU path,
    which nsa_flex runs eagerly on purpose): PyTorch's once-per-process advice to compile it
    is not shown, every other warning is.

    The filter lives only for the call (``warnings.catch_warnings``, which swaps the process's
    filter list: not thread-safe, and Dynamo cannot trace it, so it is never entered while
    compiling; compiled calls give no such warning anyway). PyTorch records the advice as given
    even while it is filtered; that record is undone here, so that a user's own eager
    ``flex_attention`` call later still gets it.
    """
    if torch.compiler.is_compiling():
        yield
        return
    shown = getattr(_flex_module, "_WARNINGS_SHOWN", None)  # torch's private record, if it has one
    fresh = isinstance(shown, set) and "flex_attention_performance" not in shown
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_EAGER_FLEX_WARNING, category=UserWarning)
            yield
    finally:
        if fresh:
            shown.discard("flex_attention_performance")


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
) -> Tensor | tuple[Tensor, Tensor]:
    """``o_cmp (B, Hq, T, Dv)``: attention over the compressed blocks visible to each query.

    ``docs``: a packed row's documents; ``k_cmp``/``v_cmp`` then hold each document's blocks
    concatenated, and a query sees only its own document's blocks. ``return_lse``: also the
    ``(B, Hq, T)`` float32 natural log-sum-exp of each query's scores, ``-inf`` where it sees
    no block (selection reuses it, :func:`nsa_flex.selection._select_fused`)."""
    B, Hq, T, _ = q.shape
    if k_cmp.shape[2] == 0:
        # No block is complete yet: the branch contributes exactly 0 (docs/semantics.md). Adding the
        # empty (hence zero) sums keeps k_cmp/v_cmp in the graph, so whatever produced them gets
        # zero gradients rather than none (DDP counts a parameter without a gradient as unused).
        zero = k_cmp.sum() + v_cmp.sum()
        out = q.new_zeros(B, Hq, T, v_cmp.shape[-1]) + zero
        return (out, q.new_full((B, Hq, T), float("-inf"), dtype=torch.float32)) if return_lse else out
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

    G = Hq // k_cmp.shape[1]
    if tuning.compressed_kv_per_head(q.is_cuda, G, _needs_backward(q, k_cmp, v_cmp)):
        k_cmp, v_cmp = k_cmp.repeat_interleave(G, dim=1), v_cmp.repeat_interleave(G, dim=1)
    return _flex(q, k_cmp, v_cmp, user_score, block_mask, scale, return_lse)


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


def _needs_backward(q: Tensor, k: Tensor, v: Tensor) -> bool:
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def _fold(q: Tensor, G: int) -> Tensor:
    """``(B, Hq, T, D) -> (B, Hkv, T*G, D)``: row ``t*G + g`` of KV head ``h`` is query head
    ``h*G + g`` at token ``t``. A gather rather than transpose+reshape, so that the folded
    queries are a plain 4-D buffer: Inductor's CPU FlexAttention template cannot take a view of
    a 5-D one."""
    B, Hq, T, D = q.shape
    row = torch.arange(T * G, device=q.device)
    return q.reshape(B, Hq // G, G * T, D).index_select(2, (row % G) * T + row // G)


def _unfold(x: Tensor, G: int) -> Tensor:
    """Inverse of :func:`_fold` for ``(B, Hkv, T*G, ...)``: ``-> (B, Hkv*G, T, ...)``."""
    B, Hkv, rows = x.shape[:3]
    T = rows // G
    return x.view(B, Hkv, T, G, *x.shape[3:]).transpose(2, 3).reshape(B, Hkv * G, T, *x.shape[3:])


def _flex_forward_triton_backward(q, k, v, block_indices, config: NSAConfig, scale: float) -> Tensor:
    """The selected branch for training on CUDA: FlexAttention's forward over one-token tiles,
    then nsa_flex's Triton backward kernels from its output and log-sum-exp.

    FlexAttention's own backward cannot take those tiles there (see :func:`_selection_tile`);
    over 128x128 tiles it would do several times the work. So the forward runs outside autograd
    (forward-only BlockMask, detached inputs), and the custom op
    ``nsa_flex::attach_selected_backward`` (:mod:`nsa_flex.ops`) unfolds its output and gives
    it the Triton gradient. Eagerly the forward goes through the shared compiled
    FlexAttention; inside ``torch.compile`` it is traced into the caller's graph like the other
    branches, and the op stays opaque, so compiled and eager training take the same path. Used
    only when nothing else can differ between the two: no score_mod or mask_mod (the Triton
    kernels run neither), see :func:`_triton_backward_applies`.
    """
    G = q.shape[1] // k.shape[1]
    # no_grad: as an inference call (one compiled entry for both); detach: the public
    # flex_attention refuses CPU inputs that require grad, even under no_grad
    with torch.no_grad():
        block_mask = _selection_block_mask(  # attend has checked the selection
            block_indices, config, group_size=G, block_size=tuning.selection_tile(G, config), transposed=False
        )
        out, lse = _flex(_fold(q.detach(), G), k.detach(), v.detach(), None, block_mask, scale, return_lse=True)
        lse = _unfold(lse, G)
    idx = triton_backend.kernel_indices(block_indices, config.select_block, q.shape[2])
    # the Triton kernels write dQ/dK/dV with the strides of q/k/v: keep those dense
    return ops.attach_selected_backward(
        q.contiguous(), k.contiguous(), v.contiguous(), idx, out, lse, config.select_block, scale
    )


def _triton_kernels_apply(q, k, v, score_mod, mask_mod) -> bool:
    """Whether the Triton selected-branch kernels can stand in for FlexAttention: CUDA, no user
    modifiers (the kernels run none), dtypes and head dims they take. Static facts."""
    return (
        q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)  # the kernels' dtypes
        and score_mod is None
        and mask_mod is None
        and 16 <= min(q.shape[-1], v.shape[-1])
        and max(q.shape[-1], v.shape[-1]) <= 256
        and triton_backend.available(q.device)[0]
    )


def _triton_backward_applies(q, k, v, score_mod, mask_mod) -> bool:
    """Whether the selected branch takes :func:`_flex_forward_triton_backward`: the Triton
    kernels apply and a backward will run. Static facts, so a compiled graph decides as an
    eager call does."""
    return _triton_kernels_apply(q, k, v, score_mod, mask_mod) and _needs_backward(q, k, v)


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
    G = q.shape[1] // k.shape[1]
    compiled_cuda = q.is_cuda and torch.compiler.is_compiling()
    if compiled_cuda and docs is None and _triton_kernels_apply(q, k, v, score_mod, mask_mod):
        # Inside a CUDA graph of torch.compile the branch is the Triton kernels' custom op,
        # forward and backward. FlexAttention over the one-token tiles, traced into an Inductor
        # graph, gave wrong outputs when T * G is not a multiple of the tile (torch 2.11, H200:
        # relative error ~1 at T=1500, G=2; exact at T=1536; eager calls through the shared
        # compiled FlexAttention were right); scripts/debug_compiled.py shows it.
        return triton_backend.selected_branch(q, k, v, block_indices, config, scale)
    if docs is None and _triton_backward_applies(q, k, v, score_mod, mask_mod):
        return _flex_forward_triton_backward(q, k, v, block_indices, config, scale)
    # Fold the group into rows, so that one K/V tile load serves the G heads of a group.
    q_rows = _fold(q, G)
    # The transposed lists only a backward reads (FlexAttention's checks for them even on its
    # CPU path) are left out of forward-only masks.
    # A backward also runs for tensors a score_mod captures (selection_grad's importance, a
    # learned bias) when q, k and v need none.
    needs_backward = _needs_backward(q, k, v) or (torch.is_grad_enabled() and score_mod is not None)
    # (A packed row's doc-local blocks start anywhere: its tiles are the 128x128 default.)
    block_mask = _selection_block_mask(  # attend has checked the selection
        block_indices, config, group_size=G, mask_mod=mask_mod,
        # (compiled CUDA graphs: FlexAttention's 128x128 tiles, never the one-token tiles, see above)
        block_size=tuning.flex_selected_tile(q.is_cuda, G, config, needs_backward or compiled_cuda) if docs is None else None,
        doc_start=None if docs is None else docs.start, transposed=needs_backward,
    )
    user_score = None
    if score_mod is not None:

        def user_score(score, b, h, q_idx, kv_idx):
            return score_mod(score, b, h * G + q_idx % G, q_idx // G, kv_idx)

    return _unfold(_flex(q_rows, k, v, user_score, block_mask, scale), G)
