"""Checks of NSA code against the library's float64 reference and against NSA's contracts.

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
from typing import Callable, Sequence

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
    "assert_causal",
    "assert_documents_isolated",
    "assert_decode_matches_forward",
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


# ----------------------------------------------------------------------------- contracts


def _perturbed(x: Tensor, rows: Tensor, fill, gen: torch.Generator, uniform: bool = False) -> Tensor:
    """A copy of ``x (B, H, R, D)`` with rows ``rows`` replaced: by ``fill``, or by fresh random
    values (uniform in ``(0, 1)`` for gates, standard normal otherwise)."""
    x = x.detach().clone()
    if rows.numel() == 0:
        return x
    size = (x.shape[0], x.shape[1], rows.numel(), x.shape[3])
    if fill is None:
        new = (torch.rand if uniform else torch.randn)(*size, generator=gen, dtype=torch.float64)
    else:
        new = torch.full(size, float(fill), dtype=torch.float64)
    x[:, :, rows.to(x.device)] = new.to(device=x.device, dtype=x.dtype)
    return x


def _compressed_last_tokens(config: NSAConfig, T: int, cu) -> Tensor:
    """The packed position of each compressed block's last token, in ``k_cmp``'s order."""
    docs = _documents(torch.tensor([0, T]) if cu is None else cu)
    first, _ = docs.compressed_blocks(config)
    return first.cpu() + config.compress_block - 1


def _default_positions(T: int, config: NSAConfig) -> list[int]:
    """Where a causality leak shows, below ``T - 1``: the first token, the last token of a middle
    compressed block, the last and first tokens of a middle selection block, an odd middle
    token and the one before the last."""
    tc, ns = config.num_compressed(T), config.num_select_blocks(T)
    mid_cmp = (tc // 2) * config.compress_stride + config.compress_block - 1 if tc else 0
    mid_slc = (ns // 2) * config.select_block
    return sorted({p for p in (0, mid_cmp, mid_slc - 1, mid_slc, T // 2 | 1, T - 2) if 0 <= p < T - 1})


def _contract_setup(fn, q, k, v, gates, kwargs, rtol, fill, seed):
    _check_fn(fn, kwargs)
    tensors = _tensors(q, k, v, gates, kwargs)
    rtol = _rtol(rtol, q.dtype)
    if fill is not None and (isinstance(fill, bool) or not isinstance(fill, numbers.Real)):
        raise TypeError(f"fill must be a number or None, got {type(fill).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return tensors, rtol, _takes_return_aux(fn)


def _changed_lines(out, aux, base_out, base_aux, rows: Tensor, rtol: float, note=None) -> list[str]:
    """Lines for each output or branch whose rows ``rows`` moved, and for selections that did."""
    lines = []
    for name, a, b in _branch_pairs(out, aux, base_out, base_aux):
        r = rows.to(a.device)
        _, line = _compare(name, a[:, :, r], b[:, :, r], rtol, rows=rows, labels=("perturbed", "original"), note=note)
        lines += [line] if line else []
    idx, base_idx = getattr(aux, "block_indices", None), getattr(base_aux, "block_indices", None)
    if isinstance(idx, Tensor) and isinstance(base_idx, Tensor) and idx.shape == base_idx.shape:
        r = rows.to(idx.device)
        width = int(max(idx.max(), base_idx.max(), 0)) + 1 if idx.numel() else 1
        moved = (_block_sets(idx[:, :, r], width) != _block_sets(base_idx[:, :, r], width)).any(dim=-1)
        if bool(moved.any()):
            bi, hi, ti = _first_row(moved)
            t = int(rows[ti])
            extra = "" if note is None else note(t)
            lines.append(f"selection: block_indices changed at {int(moved.sum())} rows; first row t={t} "
                         f"(batch {bi}, KV head {hi}{extra}): {base_idx[bi, hi, t].tolist()} -> {idx[bi, hi, t].tolist()}")
    return lines


def assert_causal(fn: Callable, q: Tensor, k: Tensor, v: Tensor, gates: Tensor | None = None, *,
                  t: int | Sequence[int] | None = None, fill: float | None = None, seed: int = 0,
                  rtol: float | None = None, **attend_kwargs) -> None:
    """Changing the tokens after ``t`` changes no output at or before ``t``.

    For each position ``t``, ``q``, ``k``, ``v`` and ``gates`` at tokens ``> t`` (and the rows of
    given ``k_cmp``/``v_cmp`` whose block ends after ``t``) are replaced, ``fn`` runs again, and
    its outputs at tokens ``<= t`` must stay within ``rtol`` of the first run's: the output,
    each branch and the selection when ``fn`` returns an aux (as in
    :func:`assert_matches_reference`). ``block_indices``, if given, stay as they are.

    Args:
        fn, q, k, v, gates, attend_kwargs: as for :func:`assert_matches_reference`; with
            ``cu_seqlens`` the positions are packed ones.
        t: a position or several in ``[0, T)``. Default: up to six where leaks show (the first
            token, the last token of a middle compressed block, the last and first tokens of a
            middle selection block, an odd middle token, ``T - 2``); in a property test, also
            draw it (``t=data.draw(st.integers(0, T - 1))``).
        fill: the new values: ``None`` (default) fresh random ones drawn from ``seed``, or a
            number for every entry. A non-finite ``fill`` (NaN) in ``v`` fails on
            ``backend="flex"`` by design: FlexAttention multiplies a whole tile's zero
            probabilities by its values (docs/design.md, "Non-finite values").
        rtol: default :data:`TOLERANCES` for ``q.dtype``.

    Raises:
        AssertionError: naming ``t``, each output or branch that changed with its first changed
            row (token) and head, and the first row whose selection changed.
    """
    tensors, rtol, want_aux = _contract_setup(fn, q, k, v, gates, attend_kwargs, rtol, fill, seed)
    T = q.shape[2]
    if t is None:
        positions = _default_positions(T, _config(attend_kwargs))
    else:
        positions = [t] if isinstance(t, int) and not isinstance(t, bool) else list(t)
        for p in positions:
            if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < T:
                raise ValueError(f"t must be positions in [0, {T}), got {t!r}")
    tokens = torch.arange(T)
    has_cmp = "k_cmp" in tensors or "v_cmp" in tensors
    last = _compressed_last_tokens(_config(attend_kwargs), T, attend_kwargs.get("cu_seqlens")) if has_cmp else None
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        base_out, base_aux = _call(fn, tensors, attend_kwargs, want_aux)
        for p in positions:
            later = {n: (last if n.endswith("_cmp") else tokens) > p for n in tensors}
            changed = {n: _perturbed(x, later[n].nonzero().flatten(), fill, gen, n == "gates") for n, x in tensors.items()}
            out, aux = _call(fn, changed, attend_kwargs, want_aux)
            lines = _changed_lines(out, aux, base_out, base_aux, tokens[: p + 1], rtol)
            _fail(f"{_name(fn)} is not causal: changing the tokens after t={p} (T={T}) changed outputs at or before it:",
                  lines, [])


def assert_documents_isolated(fn: Callable, q: Tensor, k: Tensor, v: Tensor, gates: Tensor | None = None, *,
                              cu_seqlens, documents: Sequence[int] | None = None, fill: float | None = None,
                              seed: int = 0, rtol: float | None = None, **attend_kwargs) -> None:
    """In a packed row, changing one document changes no other document's outputs.

    For each document ``n`` (default every non-empty one), its tokens of ``q``, ``k``, ``v``,
    ``gates`` and its blocks of given ``k_cmp``/``v_cmp`` are replaced, ``fn(...,
    cu_seqlens=cu_seqlens)`` runs again, and every token outside document ``n`` must keep its
    output, branches and selection (within ``rtol``). ``block_indices``, if given, stay.

    Args:
        fn, q, k, v, gates, attend_kwargs: as for :func:`assert_matches_reference`; ``B = 1``.
        cu_seqlens: ``(N+1,)`` document offsets (or a ``nsa_flex.varlen.Documents``), given to
            ``fn`` as ``cu_seqlens=``.
        documents: the indices of the documents to change.
        fill, seed, rtol: as for :func:`assert_causal` (a non-finite ``fill`` in ``v`` reaches
            other documents on ``backend="flex"``, docs/design.md).

    Raises:
        AssertionError: naming the changed document, each output or branch of another document
            that moved, its first row (token) and that token's document.
    """
    kwargs = dict(attend_kwargs, cu_seqlens=cu_seqlens)
    tensors, rtol, want_aux = _contract_setup(fn, q, k, v, gates, kwargs, rtol, fill, seed)
    docs = _documents(cu_seqlens)
    T = q.shape[2]
    if docs.seq_len != T:
        raise ValueError(f"cu_seqlens must end at T = {T}, got {docs.seq_len}")
    N = len(docs.lengths)
    if documents is None:
        documents = [n for n in range(N) if docs.lengths[n]]
    for n in documents:
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < N:
            raise ValueError(f"documents must be indices in [0, {N}), got {documents!r}")
    offsets = docs.compressed_offsets(_config(kwargs))
    doc_of = torch.repeat_interleave(torch.arange(N), torch.tensor(docs.lengths))
    note = lambda t: f", document {int(doc_of[t])}"  # noqa: E731
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        base_out, base_aux = _call(fn, tensors, kwargs, want_aux)
        for n in documents:
            start, end = docs.starts[n], docs.starts[n] + docs.lengths[n]
            rows = {name: torch.arange(offsets[n], offsets[n + 1]) if name.endswith("_cmp") else torch.arange(start, end)
                    for name in tensors}
            changed = {name: _perturbed(x, rows[name], fill, gen, name == "gates") for name, x in tensors.items()}
            out, aux = _call(fn, changed, kwargs, want_aux)
            others = (doc_of != n).nonzero().flatten()
            lines = _changed_lines(out, aux, base_out, base_aux, others, rtol, note)
            _fail(f"{_name(fn)} leaks across documents: changing document {n} (tokens {start}..{end - 1}) "
                  f"changed other documents' outputs:", lines, [])


def assert_decode_matches_forward(layer, x: Tensor, *, prompt: int | None = None, steps: int | Sequence[int] = 1,
                                  rtol: float | None = None, **decode_kwargs) -> None:
    """Prefill and decoding give ``layer(x)``.

    ``layer`` is a :class:`nsa_flex.SparseAttention` or any module with its inference methods:
    ``layer(x)``, ``layer.new_cache(B, max_len)``, ``layer.prefill(x, cache)`` and
    ``layer.decode(x, cache, **decode_kwargs)``. The check prefills ``x[:, :prompt]``, decodes
    the rest in steps of ``steps`` tokens, and compares every output with ``layer(x)``, all
    under ``torch.no_grad()``.

    Args:
        x: ``(B, T, dim)``.
        prompt: the prefilled tokens, ``0 .. T`` (default ``T // 2``).
        steps: tokens per decode step: an int, or a sequence of sizes used in turn (repeated
            as needed; the last step is cut at ``T``).
        rtol: default :data:`TOLERANCES` for ``x.dtype``.
        **decode_kwargs: passed to every ``layer.decode`` call (e.g. ``fused=False``).

    Raises:
        AssertionError: the first token past the bound, its batch row and the prefill or decode
            step that made it, with the error of the prefill and of the decode steps.
    """
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a (B, T, dim) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    for name in ("new_cache", "prefill", "decode"):
        if not callable(getattr(layer, name, None)):
            raise TypeError(f"layer must have a {name}() method, as SparseAttention has")
    B, T, _ = x.shape
    prompt = T // 2 if prompt is None else prompt
    if isinstance(prompt, bool) or not isinstance(prompt, int) or not 0 <= prompt <= T:
        raise ValueError(f"prompt must be an int in [0, {T}], got {prompt!r}")
    sizes = [steps] if isinstance(steps, int) and not isinstance(steps, bool) else list(steps)
    if not sizes or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in sizes):
        raise ValueError(f"steps must be a positive int or a non-empty sequence of them, got {steps!r}")
    rtol = _rtol(rtol, x.dtype)
    with torch.no_grad():
        full = layer(x)
        cache = layer.new_cache(B, T)
        outs, spans = [layer.prefill(x[:, :prompt], cache)], [("prefill", 0, prompt)]
        i, j = prompt, 0
        while i < T:
            m = min(sizes[j % len(sizes)], T - i)
            outs.append(layer.decode(x[:, i : i + m], cache, **decode_kwargs))
            spans.append((f"decode step {j}", i, i + m))
            i, j = i + m, j + 1
    got = torch.cat(outs, dim=1)
    step_of = {t: f", {what} (tokens {a}..{b - 1})" for what, a, b in spans for t in range(a, b)}
    _, line = _compare("output", got[:, None], full[:, None], rtol, unit="token t", labels=("decoded", "forward"),
                       note=step_of.get, heads=False)
    parts = [f"{what} {rel_err(got[:, a:b], full[:, a:b]):.1e}" for what, a, b in
             (("prefill", 0, prompt), ("decode", prompt, T)) if b > a]
    _fail(f"decoding does not give {type(layer).__name__}'s forward (prompt {prompt}, steps {sizes}, {x.dtype}):",
          [line] if line else [], parts, "rel err")
