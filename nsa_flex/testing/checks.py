"""Checks of NSA code against the library's float64 reference, and the reporting they share
with the contract checks (:mod:`nsa_flex.testing.contracts`).

Each check raises ``AssertionError`` with a report of where the code differs (as
``torch.testing.assert_close`` does) and returns ``None`` when it holds. The attention checks
take ``(fn, q, k, v, gates=None, **attend_kwargs)`` where ``fn`` has ``nsa_flex.attend``'s
signature (``attend`` itself, a ``functools.partial`` of it, or a user's own implementation);
the keyword arguments go to ``fn`` as given.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
from typing import Callable

import torch
from torch import Tensor

import nsa_flex
from nsa_flex import NSAConfig

__all__ = [
    "TOLERANCES",
    "SELECTION_TOLERANCES",
    "GRAD_FLOOR",
    "tolerance",
    "rel_err",
    "assert_matches_reference",
]

# ||out - ref|| / ||ref|| bounds by the dtype of q: those the library's own tests and
# `python -m nsa_flex` hold its backends to (docs/semantics.md, "Tolerances"; float32 on CUDA
# with TF32 off).
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
# Relative bound on the scores of the blocks a selection chose, against the reference's choice.
SELECTION_TOLERANCES = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
# Gradients compare as ||a - b|| <= rtol * max(||b||, GRAD_FLOOR): a gradient that vanishes on
# both sides (a softmax over one key) is rounding noise, not a relative error.
GRAD_FLOOR = 1.0

_BRANCHES = ("o_cmp", "o_slc", "o_swa")


def tolerance(dtype: torch.dtype) -> float:
    """The relative bound :data:`TOLERANCES` holds for ``dtype``."""
    if dtype not in TOLERANCES:
        raise TypeError(f"no tolerance for {dtype}: pass rtol= (known: {sorted(map(str, TOLERANCES))})")
    return TOLERANCES[dtype]


def rel_err(out: Tensor, ref: Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (``||out - ref||`` when ``ref`` is 0), on ``out``'s
    device (``ref`` may live elsewhere, e.g. a CPU reference of a CUDA result)."""
    out, ref = out.detach().double(), ref.detach().double().to(out.device)
    num, den = float((out - ref).norm()), float(ref.norm())
    return num if den == 0 else num / den


# ----------------------------------------------------------------------------- comparisons


def _rtol(rtol, dtype: torch.dtype, table=TOLERANCES, name: str = "rtol") -> float:
    if rtol is None:
        if dtype not in table:
            raise TypeError(f"no default {name} for {dtype}: pass {name}=")
        return table[dtype]
    if isinstance(rtol, bool) or not isinstance(rtol, numbers.Real) or not (0 <= rtol < math.inf):
        raise ValueError(f"{name} must be a finite number >= 0, got {rtol!r}")
    return float(rtol)


def _compare(name: str, got: Tensor, want: Tensor, rtol: float, *, floor: float = 0.0, rows=None,
             unit: str = "row t", labels=("fn", "reference"), note: Callable[[int], str] | None = None,
             heads: bool = True) -> tuple[float, str | None]:
    """The relative error of ``got`` against ``want`` (4-D, ``(B, H, rows, features)``) and,
    when it exceeds ``rtol``, a line saying where: the worst head and the first row (smallest
    index) whose own error exceeds ``rtol`` relative to its norm or the typical row norm.
    Non-finite entries equal on both sides (NaN and NaN included) count as equal. ``rows`` maps
    row positions back to the caller's numbering."""
    if tuple(got.shape) != tuple(want.shape):
        return math.inf, f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    a, b = got.detach().double(), want.detach().double().to(got.device)
    diff = torch.where((a == b) | (a.isnan() & b.isnan()), 0.0, a - b)
    finite_b = torch.where(b.isfinite(), b, 0.0)
    ref_norm, err = float(finite_b.norm()), float(diff.norm())
    den = max(ref_norm, floor)
    rel = err / den if den > 0 else err
    if rel <= rtol or a.numel() == 0:
        return rel, None
    B, H, R, _ = a.shape
    row_err = diff.norm(dim=-1).nan_to_num(nan=math.inf)
    row_ref = finite_b.norm(dim=-1)
    typical = max(ref_norm, floor) / math.sqrt(B * H * R)
    bad = row_err > rtol * row_ref.clamp(min=typical)
    if not bool(bad.any()):
        bad = row_err == row_err.max()
    where = bad.nonzero()
    bi, hi, ri = where[torch.argmin(where[:, 2] * (B * H) + where[:, 0] * H + where[:, 1])].tolist()
    d = int(diff[bi, hi, ri].abs().nan_to_num(nan=math.inf).argmax())
    r = ri if rows is None else int(rows[ri])
    at = f"batch {bi}, head {hi}" if heads else f"batch {bi}"
    if note is not None:
        at += note(r)
    worst = ""
    if heads and H > 1:
        worst = f"; worst head {int(diff.nan_to_num(nan=math.inf).square().sum(dim=(0, 2, 3)).argmax())}"
    got_, want_ = labels
    return rel, (
        f"{name}: rel err {rel:.2e} > {rtol:.1e}{worst}; first bad {unit}={r} ({at}): "
        f"|{got_} - {want_}| {float(row_err[bi, hi, ri]):.2e} against |{want_}| {float(row_ref[bi, hi, ri]):.2e}, "
        f"largest at feature {d}: {got_} {float(a[bi, hi, ri, d]):.6g}, {want_} {float(b[bi, hi, ri, d]):.6g}"
    )


def _block_sets(idx: Tensor, width: int) -> Tensor:
    """``(B, H, T, n)`` block numbers -> ``(B, H, T, width)`` bool, each row's set (``-1``
    padding, repeats and numbers past ``width`` dropped)."""
    idx = idx.long()
    slot = torch.where((idx < 0) | (idx >= width), width, idx)
    sets = torch.zeros(*idx.shape[:-1], width + 1, dtype=torch.bool, device=idx.device)
    return sets.scatter_(-1, slot, True)[..., :width]


def _first_row(bad: Tensor) -> tuple[int, int, int]:
    """``(b, h, t)`` of the ``True`` entry of ``bad (B, H, T)`` with the smallest ``t``."""
    B, H, _ = bad.shape
    where = bad.nonzero()
    return tuple(where[torch.argmin(where[:, 2] * (B * H) + where[:, 0] * H + where[:, 1])].tolist())


def _name(fn) -> str:
    func = getattr(fn, "func", None)  # functools.partial
    if func is not None:
        return f"partial({_name(func)}, {', '.join(f'{k}={v!r}' for k, v in fn.keywords.items())})"
    return getattr(fn, "__name__", None) or type(fn).__name__


def _takes_return_aux(fn) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "return_aux" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _check_fn(fn, kwargs: dict) -> None:
    if not callable(fn):
        raise TypeError(f"fn must be callable (with nsa_flex.attend's signature), got {type(fn).__name__}")
    if "return_aux" in kwargs:
        raise TypeError("return_aux is the check's to set: leave it out")
    for name, x in (("k_cmp", kwargs.get("k_cmp")), ("v_cmp", kwargs.get("v_cmp"))):
        if x is not None and not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")


def _tensors(q, k, v, gates, kwargs: dict) -> dict[str, Tensor]:
    """The floating inputs by name, as ``attend`` takes them."""
    named = dict(q=q, k=k, v=v, gates=gates, k_cmp=kwargs.get("k_cmp"), v_cmp=kwargs.get("v_cmp"))
    for name in ("q", "k", "v"):
        if not isinstance(named[name], Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(named[name]).__name__}")
    return {n: x for n, x in named.items() if x is not None}


def _call(fn, tensors: dict[str, Tensor], kwargs: dict, aux: bool):
    """``fn(q, k, v, gates, **kwargs)`` with ``tensors`` in place of the given ones: ``(out,
    aux)``, ``aux`` ``None`` when not asked for or not returned."""
    kw = dict(kwargs)
    kw.update((n, tensors[n]) for n in ("k_cmp", "v_cmp") if n in tensors)
    args = (tensors["q"], tensors["k"], tensors["v"], tensors.get("gates"))
    result = fn(*args, return_aux=True, **kw) if aux else fn(*args, **kw)
    if isinstance(result, Tensor):
        return result, None
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], Tensor):
        return result
    raise TypeError(f"fn must return a tensor or (out, aux), got {type(result).__name__}")


def _config(kwargs: dict) -> NSAConfig:
    config = kwargs.get("config")
    return NSAConfig() if config is None else config


def _documents(cu):
    return cu if isinstance(cu, nsa_flex.varlen.Documents) else nsa_flex.varlen.documents(cu, device="cpu")


def _branch_pairs(out, aux, ref_out, ref_aux):
    pairs = [("out", out, ref_out)]
    for name in _BRANCHES:
        x = getattr(aux, name, None)
        if isinstance(x, Tensor):
            pairs.append((name, x, getattr(ref_aux, name)))
    return pairs


def _record(lines: list[str], passed: list[str], name: str, rel: float, line: str | None) -> None:
    if line:
        lines.append(line)
    else:
        passed.append(f"{name} {rel:.1e}")


def _fail(header: str, lines: list[str], passed: list[str], label: str = "within tolerance") -> None:
    if lines:
        ok = f"\n  {label}: {', '.join(passed)}" if passed else ""
        raise AssertionError(header + "\n  " + "\n  ".join(lines) + ok)


# ----------------------------------------------------------------------------- the reference


def _reference_scores(q: Tensor, k: Tensor, kwargs: dict) -> Tensor:
    """``(B, Hkv, T, Ns)`` float64 importance scores the reference selects by (doc-local blocks
    under ``cu_seqlens``)."""
    config, R = _config(kwargs), nsa_flex.reference
    scale = q.shape[-1] ** -0.5 if kwargs.get("scale") is None else kwargs["scale"]
    cu = kwargs.get("cu_seqlens")
    k_cmp = kwargs.get("k_cmp")
    k_cmp = nsa_flex.mean_compress(k, config, cu) if k_cmp is None else k_cmp.detach().to(torch.float64)
    score_mod, mask_mod = kwargs.get("score_mod"), kwargs.get("mask_mod")
    if cu is None:
        return R.select_blocks(q, k_cmp, config, scale, score_mod, mask_mod)[1]
    docs = _documents(cu)
    offsets = docs.compressed_offsets(config)
    scores = q.new_zeros(q.shape[0], k.shape[1], q.shape[2], docs.num_select_blocks(config))
    for n, (start, length) in enumerate(zip(docs.starts, docs.lengths)):
        if not length:
            continue
        tok, blk = slice(start, start + length), slice(offsets[n], offsets[n + 1])
        sm = None if score_mod is None else (lambda s, b, h, qi, kv, o=start: score_mod(s, b, h, qi + o, kv + o))
        mm = None if mask_mod is None else (lambda b, h, qi, kv, o=start: mask_mod(b, h, qi + o, kv + o))
        part = R.select_blocks(q[:, :, tok], k_cmp[:, :, blk], config, scale, sm, mm)[1]
        scores[:, :, tok, : part.shape[-1]] = part
    return scores


def _selection_line(fn_idx: Tensor, ref_idx: Tensor, scores: Tensor, rtol: float) -> str | None:
    """A line when ``fn_idx`` chose blocks whose reference scores differ from those of the
    reference's choice (``None`` for an equally good choice among ties)."""
    width = scores.shape[-1]

    def chosen(idx):
        return torch.where(_block_sets(idx, width), scores, -1.0).sort(dim=-1, descending=True).values

    a, b = chosen(fn_idx), chosen(ref_idx)
    bad = ~torch.isclose(a, b, rtol=rtol, atol=rtol * 1e-3).all(dim=-1)
    if not bool(bad.any()):
        return None
    bi, hi, ti = _first_row(bad)

    def listed(idx):
        blocks = _block_sets(idx, width)[bi, hi, ti].nonzero().flatten().tolist()
        return f"{blocks} (scores {', '.join(f'{float(scores[bi, hi, ti, j]):.4g}' for j in blocks)})"

    return (f"selection: {int(bad.sum())} of {bad.numel()} rows chose blocks of other scores than the "
            f"reference; first row t={ti} (batch {bi}, KV head {hi}): fn chose {listed(fn_idx)}, the "
            f"reference {listed(ref_idx)}")


def assert_matches_reference(fn: Callable, q: Tensor, k: Tensor, v: Tensor, gates: Tensor | None = None, *,
                             grads: bool = False, rtol: float | None = None, selection_rtol: float | None = None,
                             seed: int = 0, **attend_kwargs) -> None:
    """``fn(q, k, v, gates, **attend_kwargs)`` equals ``nsa_flex.attend(..., backend="reference")``
    run on float64 copies of the inputs.

    Args:
        fn: a callable with ``attend``'s signature. If it takes ``return_aux`` (or ``**kwargs``)
            it is called with ``return_aux=True`` and each branch it returns (``o_cmp``,
            ``o_slc``, ``o_swa`` of its aux) is compared too, which names the wrong branch.
        q, k, v, gates: ``(B, Hq, T, Dk)``, ``(B, Hkv, T, Dk)``, ``(B, Hkv, T, Dv)``,
            ``(B, Hq, T, 3)`` or ``None``, on any device and of any floating dtype.
        grads: also compare the gradients of ``(out * w).sum()``, ``w`` a fixed standard-normal
            ``(B, Hq, T, Dv)`` weighting drawn from ``seed``, with respect to ``q, k, v`` and
            ``gates``, ``k_cmp``, ``v_cmp`` where given; as
            ``||a - b|| <= rtol * max(||b||, GRAD_FLOOR)``.
        rtol: the bound on ``||out - ref|| / ||ref||`` (default :data:`TOLERANCES` for
            ``q.dtype``; float32 on CUDA needs TF32 off).
        selection_rtol: the bound on the scores of the blocks ``fn`` selected (default
            :data:`SELECTION_TOLERANCES`).
        **attend_kwargs: ``attend``'s keyword arguments (``config``, ``k_cmp``, ``v_cmp``,
            ``block_indices``, ``scale``, ``score_mod``, ``mask_mod``, ``cu_seqlens``,
            ``selection_grad``, ``backend``), passed to ``fn`` as given and to the reference
            (``backend`` excepted, ``k_cmp``/``v_cmp``/``gates`` in float64).

    Selection: with ``block_indices`` given, both sides use them. Otherwise, when ``fn`` returns
    its selection and it differs from the reference's, the blocks it chose must score as well
    (by the reference's scores: ties may be broken either way), and the branches are then
    compared with the reference run on ``fn``'s selection. When ``fn`` returns no aux, only the
    outputs are compared, each side with its own selection (pass ``block_indices`` for low
    precision, where near-ties may flip).

    Raises:
        AssertionError: a report line for each output, branch, gradient or selection that
            differs, with the worst head and the first row (token) past the bound.
        TypeError, ValueError: bad arguments (as ``attend`` raises them for the reference).
    """
    _check_fn(fn, attend_kwargs)
    tensors = _tensors(q, k, v, gates, attend_kwargs)
    rtol = _rtol(rtol, q.dtype)
    selection_rtol = _rtol(selection_rtol, q.dtype, SELECTION_TOLERANCES, "selection_rtol")
    if not isinstance(grads, bool):
        raise TypeError(f"grads must be a bool, got {type(grads).__name__}")
    ref_kwargs = {n: x for n, x in attend_kwargs.items() if n != "backend"}
    ref_in = {n: x.detach().to(torch.float64, copy=True).requires_grad_(grads) for n, x in tensors.items()}
    fn_in = {n: x.detach().clone().requires_grad_() for n, x in tensors.items()} if grads else tensors
    with contextlib.nullcontext() if grads else torch.no_grad():
        out, aux = _call(fn, fn_in, attend_kwargs, _takes_return_aux(fn))

        def reference(block_indices):
            kw = dict(ref_kwargs, block_indices=block_indices)
            return _call(nsa_flex.attend, ref_in, dict(kw, backend="reference"), aux=True)

        given = attend_kwargs.get("block_indices")
        ref_out, ref_aux = reference(given)
    lines, passed = [], []
    fn_idx = getattr(aux, "block_indices", None)
    if given is None and isinstance(fn_idx, Tensor):
        ref_idx = ref_aux.block_indices
        if tuple(fn_idx.shape) != tuple(ref_idx.shape):
            lines.append(f"selection: block_indices of shape {tuple(fn_idx.shape)}, expected {tuple(ref_idx.shape)}")
        else:
            fn_idx = fn_idx.to(ref_idx.device)
            width = int(max(fn_idx.max(), ref_idx.max(), 0)) + 1
            if not torch.equal(_block_sets(fn_idx, width), _block_sets(ref_idx, width)):
                with torch.no_grad():
                    scores = _reference_scores(ref_in["q"].detach(), ref_in["k"].detach(), ref_kwargs)
                line = _selection_line(fn_idx, ref_idx, scores, selection_rtol)
                lines += [line] if line else []
                try:  # the branches on fn's own selection
                    with contextlib.nullcontext() if grads else torch.no_grad():
                        ref_out, ref_aux = reference(fn_idx)
                except ValueError as e:
                    lines.append(f"selection: fn's block_indices are not a valid selection ({e})")
    for name, a, b in _branch_pairs(out, aux, ref_out, ref_aux):
        rel, line = _compare(name, a, b, rtol)
        _record(lines, passed, name, rel, line)
    if grads and out.shape == ref_out.shape:  # (a wrong shape is reported above)
        w = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        names = list(tensors)
        try:
            got = torch.autograd.grad((out.double() * w.to(out.device)).sum(), [fn_in[n] for n in names], allow_unused=True)
        except RuntimeError as e:
            got = None
            lines.append(f"gradients: fn's output has no graph back to its inputs ({e})")
        want = torch.autograd.grad((ref_out * w.to(ref_out.device)).sum(), [ref_in[n] for n in names], allow_unused=True)
        for n, a, b in zip(names, got or [], want):
            b = torch.zeros_like(ref_in[n]) if b is None else b
            a = torch.zeros_like(b) if a is None else a
            unit = "block i" if n.endswith("_cmp") else "row t"
            rel, line = _compare(f"grad {n}", a, b, rtol, floor=GRAD_FLOOR, unit=unit)
            _record(lines, passed, f"grad {n}", rel, line)
    if lines and aux is None:
        lines.append("(fn returned no aux: branches not compared; a return_aux argument names the branch)")
    _fail(f"{_name(fn)} does not match the float64 reference ({q.dtype}):", lines, passed)
