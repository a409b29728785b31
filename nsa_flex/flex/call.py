"""How nsa_flex calls FlexAttention, whichever branch it runs (:func:`run_flex`).

Inside ``torch.compile`` the call is traced into the caller's graph; called eagerly on CUDA it
goes through one shared ``torch.compile(flex_attention)`` so that eager users also get the
fused kernel (under :func:`room_to_recompile`: one graph per branch and shape); on the CPU it
runs FlexAttention's eager path, which materialises scores (fine for tests and small inputs)
and which PyTorch refuses to differentiate, so a CPU call that needs gradients runs the same
eager FlexAttention operator directly (:func:`_cpu_flex_with_grad`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings

import torch
import torch.nn.attention.flex_attention as _flex_module
from torch.nn.attention.flex_attention import AuxRequest, flex_attention

from .. import tuning


def _flex_call(q, k, v, **kw):
    return flex_attention(q, k, v, **kw)


@functools.cache
def _compiled_flex():
    # A function of our own rather than flex_attention itself: Dynamo counts graphs, and gives
    # up compiling past its recompile limit, per code object, so a user's (or a benchmark's)
    # torch.compile(flex_attention) must not share this one's count.
    return torch.compile(_flex_call, dynamic=False)


def room_to_recompile():
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
    with room_to_recompile():
        out, lse = _cpu_flex_op()(q, k, v, score_mod, block_mask.as_tuple(), scale)
    # the operator's log-sum-exp is base 2; the public flex_attention returns the natural one
    return (out, lse * math.log(2.0)) if return_lse else out


def _identity_score(score, b, h, q_idx, kv_idx):
    return score


def run_flex(q, k, v, score_mod, block_mask, scale, return_lse: bool = False):
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
        with room_to_recompile():
            return _lse_pair(_compiled_flex()(q, k, v, **kw), return_lse)
    if q.requires_grad or k.requires_grad or v.requires_grad:
        if torch.is_grad_enabled():
            return _cpu_flex_with_grad(q, k, v, score_mod, block_mask, scale, return_lse)
        # under no_grad nothing will differentiate, but the public call refuses such inputs
        q, k, v = q.detach(), k.detach(), v.detach()
    with eager_flex_quietly():
        return _lse_pair(flex_attention(q, k, v, **kw), return_lse)


def _lse_pair(result, return_lse: bool):
    """``flex_attention``'s result as :func:`run_flex` returns it: ``out``, or ``(out, lse)``."""
    if not return_lse:
        return result
    out, aux = result
    return out, aux.lse


# PyTorch's advice, given on the first eager flex_attention call of a process, to compile it.
_EAGER_FLEX_WARNING = r"flex_attention called without torch\.compile"


@contextlib.contextmanager
def eager_flex_quietly():
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
