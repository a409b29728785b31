"""Hypothesis strategies for NSA problems: configs, shapes, inputs, selections, documents, mods.

Every strategy draws only what ``nsa_flex.attend`` accepts, so a failing example is a bug in the
code under test, never in the data. Tensors are made by ``torch`` from a drawn integer seed
(drawing each element through Hypothesis would be slow and shrink badly); what is drawn
directly (sizes, counts, modes) shrinks as usual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from hypothesis import strategies as st
from torch import Tensor

import nsa_flex
from nsa_flex import NSAConfig

__all__ = [
    "configs",
    "Shape",
    "shapes",
    "Inputs",
    "make_inputs",
    "inputs",
    "block_indices",
    "cu_seqlens",
    "score_mods",
    "mask_mods",
]

STRIDES = (1, 2, 4, 8, 16)
# T at and around block sizes, where off-by-one errors live
EDGE_LENGTHS = (1, 2, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257)


def _int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _bounds(name: str, spec, default: tuple[int, int], minimum: int) -> tuple[int, int]:
    """``(lo, hi)`` from ``None`` (``default``), an int (exactly it) or a ``(lo, hi)`` pair."""
    if spec is None:
        return default
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = (spec, spec)
    if not (isinstance(spec, (tuple, list)) and len(spec) == 2):
        raise TypeError(f"{name} must be an int or a (min, max) pair of ints, got {spec!r}")
    lo, hi = (_int(f"{name}[{i}]", x, minimum) for i, x in enumerate(spec))
    if lo > hi:
        raise ValueError(f"{name}: min {lo} exceeds max {hi}")
    return lo, hi


def configs(
    *,
    max_block: int = 96,
    max_selected: int = 8,
    max_window: int = 80,
    compress_stride=None,
    compress_block=None,
    select_block=None,
    num_selected=None,
    num_initial=None,
    num_local=None,
    window=None,
) -> st.SearchStrategy[NSAConfig]:
    """Valid :class:`~nsa_flex.NSAConfig` s.

    By default: ``compress_stride`` ``d`` in ``{1, 2, 4, 8, 16}``, ``compress_block = d * (1..4)``
    and ``select_block = d * (1..6)``, both at most ``max_block``; ``num_selected`` in
    ``1..max_selected``, ``num_initial`` in ``0..2``, ``num_local`` in ``0..3`` (their sum at
    most ``num_selected``); ``window`` in ``1..max_window``.

    Each field may be narrowed: an int fixes it, a ``(min, max)`` pair bounds it (then any
    multiple of ``d`` in range for the block sizes, any int for the stride).

    Raises:
        TypeError, ValueError: a bound that is not an int or pair, or bounds no valid config
            satisfies (e.g. ``compress_block=6, select_block=4`` with ``compress_stride=4``).
    """
    max_block = _int("max_block", max_block, 1)
    n_lo, n_hi = _bounds("num_selected", num_selected, (1, _int("max_selected", max_selected, 1)), 1)
    i_lo, i_hi = _bounds("num_initial", num_initial, (0, 2), 0)
    r_lo, r_hi = _bounds("num_local", num_local, (0, 3), 0)
    w_lo, w_hi = _bounds("window", window, (1, _int("max_window", max_window, 1)), 1)
    if compress_stride is None:
        strides = [d for d in STRIDES if d <= max_block]
    else:
        lo, hi = _bounds("compress_stride", compress_stride, (1, 1), 1)
        strides = list(range(lo, hi + 1))

    def multiples(spec, name, d, most):
        if spec is None:
            return [d * m for m in range(1, most + 1) if d * m <= max_block]
        lo, hi = _bounds(name, spec, (1, 1), 1)
        return [x for x in range(-(-lo // d) * d, hi + 1, d)]

    blocks = {}
    for d in strides:
        ls, lss = multiples(compress_block, "compress_block", d, 4), multiples(select_block, "select_block", d, 6)
        if ls and lss:
            blocks[d] = (ls, lss)
    if not blocks:
        raise ValueError("no compress_stride in range divides a compress_block and a select_block in range")
    n_lo = max(n_lo, i_lo + r_lo)
    if n_lo > n_hi:
        raise ValueError(f"num_initial + num_local (at least {i_lo + r_lo}) exceeds num_selected (at most {n_hi})")

    @st.composite
    def draw_config(draw) -> NSAConfig:
        d = draw(st.sampled_from(sorted(blocks)))
        ls, lss = blocks[d]
        n = draw(st.integers(n_lo, n_hi))
        initial = draw(st.integers(i_lo, min(i_hi, n - r_lo)))
        return NSAConfig(
            compress_block=draw(st.sampled_from(ls)),
            compress_stride=d,
            select_block=draw(st.sampled_from(lss)),
            num_selected=n,
            num_initial=initial,
            num_local=draw(st.integers(r_lo, min(r_hi, n - initial))),
            window=draw(st.integers(w_lo, w_hi)),
        )

    return draw_config()


@dataclass(frozen=True)
class Shape:
    """The sizes of one attention problem: ``q (B, Hq, T, Dk)``, ``k (B, Hkv, T, Dk)``,
    ``v (B, Hkv, T, Dv)``, ``gates (B, Hq, T, 3)``; ``G = Hq // Hkv`` query heads per KV head.

    Raises:
        TypeError, ValueError: a field that is not a positive int, or ``Hkv`` not dividing ``Hq``.
    """

    B: int
    Hq: int
    Hkv: int
    T: int
    Dk: int
    Dv: int

    def __post_init__(self) -> None:
        for name in ("B", "Hq", "Hkv", "T", "Dk", "Dv"):
            _int(f"Shape.{name}", getattr(self, name), 1)
        if self.Hq % self.Hkv:
            raise ValueError(f"Shape.Hkv ({self.Hkv}) must divide Shape.Hq ({self.Hq})")

    @property
    def G(self) -> int:
        """Query heads per KV head."""
        return self.Hq // self.Hkv


def shapes(
    *,
    max_t: int = 600,
    min_t: int = 1,
    max_work: int = 2_000_000,
    max_batch: int = 3,
    max_kv_heads: int = 3,
    groups: Sequence[int] = (1, 2, 3, 4, 6, 8),
    head_dims: Sequence[int] = (16, 24, 32, 64, 128),
    value_dims: Sequence[int] = (16, 32, 48, 64),
) -> st.SearchStrategy[Shape]:
    """:class:`Shape` s with ``T`` in ``min_t..max_t`` (lengths at and around block sizes drawn
    often), ``G`` from ``groups``, ``Dk`` from ``head_dims``, ``Dv`` from ``value_dims`` (so
    ``Dk != Dv`` too), up to ``max_batch`` rows and ``max_kv_heads`` KV heads, and the dense work
    ``B * Hq * T * T`` at most ``max_work`` (``T`` is capped so that the smallest group fits;
    then ``G``, ``Hkv`` and ``B`` are drawn within what is left).

    The default head dims suit every backend on every device (the kernels take 16 to 256).
    """
    max_t, min_t = _int("max_t", max_t, 1), _int("min_t", min_t, 1)
    max_work = _int("max_work", max_work, 1)
    max_batch, max_kv_heads = _int("max_batch", max_batch, 1), _int("max_kv_heads", max_kv_heads, 1)
    groups, head_dims, value_dims = (
        sorted({_int(f"{name} entry", x, 1) for x in xs}) for name, xs in
        (("groups", groups), ("head_dims", head_dims), ("value_dims", value_dims))
    )
    if not (groups and head_dims and value_dims):
        raise ValueError("groups, head_dims and value_dims must not be empty")
    top = min(max_t, math.isqrt(max_work // groups[0]))
    if top < min_t:
        raise ValueError(f"max_work={max_work} leaves no T >= min_t={min_t} (G = {groups[0]})")
    edges = [t for t in EDGE_LENGTHS if min_t <= t <= top]
    length = st.integers(min_t, top) if not edges else st.one_of(st.integers(min_t, top), st.sampled_from(edges))

    @st.composite
    def draw_shape(draw) -> Shape:
        T = draw(length)
        G = draw(st.sampled_from([g for g in groups if g * T * T <= max_work]))
        Hkv = draw(st.integers(1, max(1, min(max_kv_heads, max_work // (G * T * T)))))
        B = draw(st.integers(1, max(1, min(max_batch, max_work // (Hkv * G * T * T)))))
        return Shape(B, Hkv * G, Hkv, T, draw(st.sampled_from(head_dims)), draw(st.sampled_from(value_dims)))

    return draw_shape()


@dataclass(frozen=True, eq=False, repr=False)
class Inputs:
    """``q, k, v, gates`` of one :class:`Shape`, made by :func:`make_inputs`; unpacks as
    ``q, k, v, gates = inputs``. Its repr is the call that makes it again."""

    q: Tensor
    k: Tensor
    v: Tensor
    gates: Tensor
    shape: Shape
    seed: int

    def __iter__(self) -> Iterator[Tensor]:
        return iter((self.q, self.k, self.v, self.gates))

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.q.requires_grad else ""
        return (f"make_inputs({self.shape}, seed={self.seed}, dtype={self.q.dtype}, "
                f"device={str(self.q.device)!r}{grad})")


def make_inputs(shape: Shape, seed: int, *, dtype: torch.dtype = torch.float64, device="cpu",
                requires_grad: bool = False) -> Inputs:
    """Standard-normal ``q (B, Hq, T, Dk)``, ``k (B, Hkv, T, Dk)``, ``v (B, Hkv, T, Dv)`` and
    uniform ``gates (B, Hq, T, 3)`` in ``(0, 1)``, drawn on the CPU in float64 from ``seed``
    (the same values on every device), then cast to ``dtype`` on ``device``; each a leaf that
    requires grad if ``requires_grad``."""
    if not isinstance(shape, Shape):
        raise TypeError(f"shape must be an nsa_flex.testing.Shape, got {type(shape).__name__}")
    _int("seed", seed, 0)
    g = torch.Generator().manual_seed(seed)

    def make(draw, *size):
        x = draw(*size, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
        return x.requires_grad_(requires_grad)

    s = shape
    q = make(torch.randn, s.B, s.Hq, s.T, s.Dk)
    k = make(torch.randn, s.B, s.Hkv, s.T, s.Dk)
    v = make(torch.randn, s.B, s.Hkv, s.T, s.Dv)
    gates = make(torch.rand, s.B, s.Hq, s.T, 3)
    return Inputs(q, k, v, gates, s, seed)


def inputs(shape: Shape, dtype: torch.dtype = torch.float64, device="cpu",
           requires_grad: bool = False) -> st.SearchStrategy[Inputs]:
    """:class:`Inputs` for ``shape`` (:func:`make_inputs` from a drawn seed). With a drawn shape:
    ``shapes().flatmap(inputs)`` or ``data.draw(inputs(shape))``."""
    if not isinstance(shape, Shape):
        raise TypeError(f"shape must be an nsa_flex.testing.Shape, got {type(shape).__name__}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    return st.integers(0, 2**32 - 1).map(
        lambda seed: make_inputs(shape, seed, dtype=dtype, device=device, requires_grad=requires_grad))


def block_indices(shape: Shape, config: NSAConfig, causal: bool = True, *, cu_seqlens=None,
                  allow_repeats: bool = False, device="cpu") -> st.SearchStrategy[Tensor]:
    """Selections ``(B, Hkv, T, n)`` int32, ``n = config.num_selected``, as ``attend`` takes
    them in ``block_indices``.

    Each row (batch, KV head, token ``t``) holds distinct block numbers in ascending order, then
    ``-1`` padding. Its candidates are blocks ``0 .. t // select_block`` when ``causal`` (the
    library's own selections), every block when not (blocks past the query's add no key: the
    selected branch is causal anyway). Every forced block is present: the first ``num_initial``
    and the last ``num_local`` blocks up to the query's own, as far as they exist. The number of
    blocks per row is drawn for the whole tensor as one of: forced blocks only, as many as fit
    (``min(n, candidates)``, the library's count), or random in between. With
    ``allow_repeats`` some padding slots may instead repeat a chosen block (the order then
    non-decreasing); the library counts a repeat once.

    ``cu_seqlens`` (``(N+1,)`` offsets, ``shape.B == 1``): block numbers and ``t`` count from
    each token's document start, as ``attend`` takes them with ``cu_seqlens``.
    """
    if not isinstance(shape, Shape):
        raise TypeError(f"shape must be an nsa_flex.testing.Shape, got {type(shape).__name__}")
    if not isinstance(config, NSAConfig):
        raise TypeError(f"config must be an NSAConfig, got {type(config).__name__}")
    if cu_seqlens is None:
        pos, ns = torch.arange(shape.T), torch.full((shape.T,), config.num_select_blocks(shape.T))
    else:
        if shape.B != 1:
            raise ValueError(f"cu_seqlens needs shape.B == 1, got {shape.B}")
        docs = nsa_flex.varlen.documents(cu_seqlens, device="cpu")
        if docs.seq_len != shape.T:
            raise ValueError(f"cu_seqlens must end at shape.T = {shape.T}, got {docs.seq_len}")
        pos = docs.pos.long()
        ns = torch.tensor([config.num_select_blocks(n) for n in docs.lengths])[docs.doc_id.long()]
    n, ls = config.num_selected, config.select_block
    width = max(int(ns.max()), n)
    j = torch.arange(width)
    current = (pos // ls)[:, None]
    candidate = j < ns[:, None]
    if causal:
        candidate &= j <= current
    forced = candidate & (j <= current) & ((j < config.num_initial) | (j > current - config.num_local))
    most = candidate.sum(-1).clamp(max=n)  # (T,)
    fewest = forced.sum(-1)

    def make(seed: int, mode: str, repeats: bool) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        size = (shape.B, shape.Hkv, shape.T)
        key = torch.where(forced, 2.0, torch.where(candidate, torch.rand(*size, width, generator=g), -1.0))
        count = {"forced": fewest, "full": most}.get(mode)
        if count is None:
            count = fewest + (torch.rand(size, generator=g) * (most - fewest + 1)).long().clamp(max=most - fewest)
        ranked = key.argsort(dim=-1, descending=True, stable=True)[..., :n]
        slot = torch.arange(n)
        chosen = torch.where(slot < count[..., None], ranked, width)  # `width` sorts last: padding
        if repeats:
            pick = (torch.rand(*size, n, generator=g) * count[..., None]).long()
            copy = chosen.gather(-1, pick.clamp(max=n - 1))
            extra = (slot >= count[..., None]) & (count[..., None] > 0) & (torch.rand(*size, n, generator=g) < 0.5)
            chosen = torch.where(extra, copy, chosen)
        chosen = chosen.sort(dim=-1).values
        return torch.where(chosen == width, -1, chosen).to(device=device, dtype=torch.int32)

    repeats = st.booleans() if allow_repeats else st.just(False)
    return st.builds(make, st.integers(0, 2**32 - 1), st.sampled_from(["random", "full", "forced"]), repeats)


def cu_seqlens(T: int, *, max_documents: int = 4, allow_empty: bool = True,
               dtype: torch.dtype = torch.int32) -> st.SearchStrategy[Tensor]:
    """Splits of a packed row of ``T`` tokens into 1 to ``max_documents`` documents:
    ``(N+1,)`` CPU tensors of ``dtype`` (int32 or int64), nondecreasing from 0 to ``T``, as
    ``attend(..., cu_seqlens=)`` takes them. With ``allow_empty`` documents may be empty
    anywhere (first, last, between); without, every document holds at least one token (and
    ``N <= T``)."""
    _int("T", T, 0)
    _int("max_documents", max_documents, 1)
    if dtype not in (torch.int32, torch.int64):
        raise TypeError(f"dtype must be torch.int32 or torch.int64, got {dtype}")
    if not allow_empty and T == 0:
        raise ValueError("T = 0 holds only empty documents: pass allow_empty=True")
    if allow_empty:
        cuts = st.lists(st.integers(0, T), max_size=max_documents - 1)
    else:
        cuts = st.lists(st.integers(1, T - 1), max_size=min(max_documents, T) - 1, unique=True) if T > 1 else st.just([])
    return cuts.map(lambda c: torch.tensor([0, *sorted(c), T], dtype=dtype))


def _named(fn: Callable, name: str) -> Callable:
    fn.__name__ = fn.__qualname__ = name
    return fn


def _softcap(cap: float) -> Callable:
    return _named(lambda score, b, h, q_idx, kv_idx: cap * torch.tanh(score / cap), f"softcap({cap})")


def _alibi(slope: float) -> Callable:
    return _named(lambda score, b, h, q_idx, kv_idx: score - slope * ((h + 1) * (q_idx - kv_idx)), f"alibi({slope})")


def _batch_scale(step: float) -> Callable:
    return _named(lambda score, b, h, q_idx, kv_idx: score * (1.0 + step * b), f"batch_scale({step})")


def score_mods() -> st.SearchStrategy[Callable]:
    """FlexAttention ``score_mod(score, b, h, q_idx, kv_idx)`` s from a small family, written
    with elementwise tensor operations only (valid for FlexAttention and for the reference,
    which calls them on broadcast index tensors): ``softcap(c)``, ``c * tanh(score / c)``;
    ``alibi(m)``, a per-head linear distance penalty ``m * (h + 1) * (q_idx - kv_idx)``;
    ``batch_scale(s)``, scores scaled by ``1 + s * b``. Each is named after its parameters."""
    return st.one_of(
        st.sampled_from([1.0, 5.0, 30.0]).map(_softcap),
        st.sampled_from([0.01, 0.1, 0.5]).map(_alibi),
        st.sampled_from([0.25, 1.0]).map(_batch_scale),
    )


def _limit(span: int) -> Callable:
    return _named(lambda b, h, q_idx, kv_idx: q_idx - kv_idx < span, f"sliding_limit({span})")


def _head_limit(span: int) -> Callable:
    return _named(lambda b, h, q_idx, kv_idx: q_idx - kv_idx < span * (h + 1), f"head_limit({span})")


def _prefix_or_local(prefix: int, span: int) -> Callable:
    return _named(lambda b, h, q_idx, kv_idx: (kv_idx < prefix) | (q_idx - kv_idx < span),
                  f"prefix_or_local({prefix}, {span})")


def _documents(doc: Tensor, bounds: list[int]) -> Callable:
    return _named(lambda b, h, q_idx, kv_idx: doc[q_idx] == doc[kv_idx], f"document_mask({bounds})")


def mask_mods(T: int | None = None, *, device="cpu") -> st.SearchStrategy[Callable]:
    """FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` s from a small family (elementwise tensor
    operations only, as :func:`score_mods`); ``attend`` ANDs them into every branch:
    ``sliding_limit(s)``, keys less than ``s`` tokens back; ``head_limit(s)``, less than
    ``s * (h + 1)``; ``prefix_or_local(p, s)``, prefix-LM style: the first ``p`` tokens for every
    query, the rest within ``s``; and, when ``T`` is given, ``document_mask(bounds)``, keys in
    the query's own document of a random split of ``T`` tokens (a ``(T,)`` tensor on
    ``device``, captured). A query may so see no key of a branch (it then gets 0 from it)."""
    family = [
        st.integers(1, 64).map(_limit),
        st.integers(1, 16).map(_head_limit),
        st.builds(_prefix_or_local, st.integers(0, 16), st.integers(1, 32)),
    ]
    if T is not None:
        def split(cu: Tensor) -> Callable:
            lengths = (cu[1:] - cu[:-1]).long()
            doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths).to(device)
            return _documents(doc, cu.tolist())

        family.append(cu_seqlens(_int("T", T, 1), allow_empty=False).map(split))
    return st.one_of(family)
