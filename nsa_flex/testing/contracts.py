"""NSA's contracts as checks: causality, documents kept apart, decoding equal to the forward.

Each raises ``AssertionError`` with a report (:mod:`nsa_flex.testing.checks` has the reporting
they share with :func:`~nsa_flex.testing.checks.assert_matches_reference`). The attention checks
take ``(fn, q, k, v, gates=None, **attend_kwargs)`` as that one does.
"""

from __future__ import annotations

import numbers
from typing import Callable, Sequence

import torch
from torch import Tensor

from nsa_flex import NSAConfig

from .checks import (
    _block_sets,
    _branch_pairs,
    _call,
    _check_fn,
    _compare,
    _config,
    _documents,
    _fail,
    _first_row,
    _name,
    _rtol,
    _takes_return_aux,
    _tensors,
    rel_err,
)

__all__ = ["assert_causal", "assert_documents_isolated", "assert_decode_matches_forward"]

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
