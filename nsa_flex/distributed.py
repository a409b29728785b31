"""Context parallelism: one NSA layer over a sequence sharded across a ``torch.distributed`` group.

Each of the ``R`` ranks holds ``T_local`` of the ``T`` tokens (:func:`shard_sequence`). The
keys and values are all-gathered (under GQA they are a small part of the layer's tensors), the
queries stay where they are, and each rank attends its own queries over the gathered keys: the
rows ``start .. stop - 1`` of one chunk are one call of ``attend`` over the keys ``0 .. stop - 1``
(in a packed row, one call per document the chunk meets, over that document's keys).
The backward reduce-scatters the keys' and values' gradients, so each rank gets its shard of the
sum over all ranks' queries. [distributed.md](distributed.md) has the layouts, the bytes moved
per layer and the memory per rank.

Layouts (``layout=``), with ``T`` cut into pieces of sizes as ``torch.tensor_split`` makes them
(the first ``T % P`` of the ``P`` pieces one token longer, so any ``T`` works; a piece may be
empty when ``T < P``):

- ``"zigzag"`` (default): ``P = 2R`` chunks; rank ``r`` holds chunks ``r`` and ``2R - 1 - r``,
  in that order. Under causal attention an early chunk is cheap and a late one dear, so each
  rank's work is about the same.
- ``"contiguous"``: ``P = R`` chunks, rank ``r`` holds chunk ``r`` (the last rank does the most).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ._validation import check_backend, check_gates, check_int, check_qkv, check_tensor
from .api import attend
from .compression import mean_compress
from .config import NSAConfig, resolve_config
from .varlen import Documents, resolve

__all__ = ["LAYOUTS", "shard_sequence", "unshard_sequence", "local_positions", "context_parallel_attend"]

LAYOUTS = ("zigzag", "contiguous")


def _pieces(total_len: int, parts: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of ``parts`` consecutive pieces of ``total_len`` tokens,
    ``torch.tensor_split``'s sizes: the first ``total_len % parts`` one token longer."""
    base, extra = divmod(total_len, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + base + (i < extra))
    return list(zip(bounds[:-1], bounds[1:]))


def _rank_chunks(total_len: int, world: int, layout: str) -> list[list[tuple[int, int]]]:
    """Per rank, the ``[start, stop)`` global ranges it holds, in its local order."""
    if layout == "contiguous":
        return [[p] for p in _pieces(total_len, world)]
    pieces = _pieces(total_len, 2 * world)
    return [[pieces[r], pieces[2 * world - 1 - r]] for r in range(world)]


@dataclass(frozen=True)
class _Plan:
    """Where the tokens of a sharded sequence lie: ``chunks[r]`` are rank ``r``'s global
    ``[start, stop)`` ranges in local order."""

    world: int
    rank: int
    total_len: int
    layout: str
    chunks: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(sum(b - a for a, b in c) for c in self.chunks)

    @property
    def local_len(self) -> int:
        return self.lengths[self.rank]

    def positions(self, device=None) -> Tensor:
        """``(T_local,)`` int64: the global position of each of this rank's tokens."""
        parts = [torch.arange(a, b, device=device) for a, b in self.chunks[self.rank]]
        return torch.cat(parts)


def _check_group(group) -> tuple[int, int]:
    """``(rank, world)`` of this process in ``group``."""
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup, got {type(group).__name__}")
    if not dist.is_initialized():
        raise ValueError("group: torch.distributed is not initialized (call torch.distributed.init_process_group)")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group: this process is not a member of the group")
    return rank, dist.get_world_size(group)


def _check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def _check_dim(dim, x: Tensor) -> int:
    check_int("dim", dim)
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must lie in [{-x.dim()}, {x.dim()}) for a {x.dim()}-D tensor, got {dim}")
    return dim % x.dim()


def _plan(total_len: int, group, layout: str) -> _Plan:
    rank, world = _check_group(group)
    chunks = _rank_chunks(total_len, world, layout)
    return _Plan(world, rank, total_len, layout, tuple(tuple(c) for c in chunks))


def _exchange(values: list[int], group, device) -> list[list[int]]:
    """Every rank's ``values`` (same count on each), by one small all-gather."""
    world = dist.get_world_size(group)
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    out = torch.empty(world * len(values), dtype=torch.int64, device=device)
    _all_gather(out, mine, group)
    return out.view(world, len(values)).tolist()


def _make_plan(local_len: int, group, layout: str, device, facts: dict[str, int]) -> _Plan:
    """The plan of a sequence whose shards are ``local_len`` long on each rank, checked against
    the layout, with ``facts`` (shapes, settings) that must agree across ranks. One all-gather
    of ``1 + len(facts)`` ints; every rank sees the same answer, so every rank raises alike."""
    _check_group(group)
    rows = _exchange([local_len, *facts.values()], group, device)
    for i, name in enumerate(facts, start=1):
        seen = [row[i] for row in rows]
        if len(set(seen)) > 1:
            raise ValueError(f"{name} differs across the ranks of group: {seen}")
    lengths = tuple(row[0] for row in rows)
    plan = _plan(sum(lengths), group, layout)
    if plan.lengths != lengths:
        raise ValueError(
            f"the ranks' shards hold {list(lengths)} tokens, but layout={layout!r} of T = {plan.total_len} "
            f"tokens over {plan.world} ranks gives {list(plan.lengths)} (shard with shard_sequence)"
        )
    return plan


# ---------------------------------------------------------------------------- collectives

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _slots(plan: _Plan):
    """``(rank, local start, global start, length)`` of every chunk, empty ones left out."""
    for r, chunks in enumerate(plan.chunks):
        local = 0
        for a, b in chunks:
            if b > a:
                yield r, local, a, b - a
            local += b - a


class _GatherSequence(torch.autograd.Function):
    """All-gather of a sharded sequence along ``dim``; backward: reduce-scatter (sum)."""

    @staticmethod
    def forward(ctx, x: Tensor, plan: _Plan, group, dim: int) -> Tensor:
        ctx.plan, ctx.group, ctx.dim = plan, group, dim
        lmax = max(plan.lengths)
        mine = F.pad(x, _pad_spec(x, dim, lmax - x.shape[dim])).unsqueeze(0).contiguous()
        buf = x.new_empty((plan.world, *mine.shape[1:]))
        _all_gather(buf, mine, group)
        shape = list(x.shape)
        shape[dim] = plan.total_len
        out = x.new_empty(shape)
        for r, local, start, n in _slots(plan):
            out.narrow(dim, start, n).copy_(buf[r].narrow(dim, local, n))
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        plan, dim = ctx.plan, ctx.dim
        lmax = max(plan.lengths)
        shape = list(grad.shape)
        shape[dim] = lmax
        buf = grad.new_zeros((plan.world, *shape))
        for r, local, start, n in _slots(plan):
            buf[r].narrow(dim, local, n).copy_(grad.narrow(dim, start, n))
        out = grad.new_empty((1, *shape))
        _reduce_scatter(out, buf, group=ctx.group)
        return out[0].narrow(dim, 0, plan.local_len), None, None, None


def _pad_spec(x: Tensor, dim: int, amount: int) -> tuple[int, ...]:
    """``F.pad``'s argument appending ``amount`` entries along ``dim``."""
    return (0, 0) * (x.dim() - 1 - dim) + (0, amount)


# ------------------------------------------------------------------------------ public API


def local_positions(total_len: int, group, layout: str = "zigzag", *, device=None) -> Tensor:
    """``(T_local,)`` int64: the global positions of this rank's tokens of a ``total_len``-token
    sequence, in local order (what :func:`shard_sequence` keeps).

    Raises:
        TypeError: ``total_len`` not an int; ``group`` not a ``ProcessGroup``.
        ValueError: ``total_len`` negative; an unknown ``layout``; ``torch.distributed`` not
            initialized or this process not in ``group``.
    """
    check_int("total_len", total_len, 0)
    return _plan(total_len, group, _check_layout(layout)).positions(device)


def shard_sequence(x: Tensor, group, dim: int = 2, layout: str = "zigzag") -> Tensor:
    """This rank's shard of the whole sequence ``x`` (the same ``x`` on every rank).

    Args:
        x: any tensor; ``dim`` is its sequence dimension (2 for ``(B, H, T, D)``, 1 for
            ``(B, T, dim)`` activations).
        group: the ``torch.distributed`` process group the sequence is sharded over.
        layout: ``"zigzag"`` or ``"contiguous"`` (module docstring).

    Returns:
        ``x`` with ``T_local`` entries along ``dim`` (a copy, differentiable). No communication.

    Raises:
        TypeError: ``x`` not a tensor, ``dim`` not an int, ``group`` not a ``ProcessGroup``.
        ValueError: ``dim`` out of range, an unknown ``layout``, ``torch.distributed`` not
            initialized or this process not in ``group``.
    """
    check_tensor("x", x, None, floating=False)
    dim = _check_dim(dim, x)
    plan = _plan(x.shape[dim], group, _check_layout(layout))
    return x.index_select(dim, plan.positions(x.device))


def unshard_sequence(x: Tensor, group, dim: int = 2, layout: str = "zigzag", total_len: int | None = None) -> Tensor:
    """The whole sequence from every rank's shard: the inverse of :func:`shard_sequence`.

    Args:
        x: this rank's shard, ``T_local`` entries along ``dim``; the other dimensions equal
            on every rank.
        group, layout: as for :func:`shard_sequence`.
        total_len: ``T``; when ``None``, the ranks exchange their shard lengths first (one small
            all-gather) and check them against the layout. When given, only this rank's length
            is checked.

    Returns:
        ``x`` with ``T`` entries along ``dim``, the same on every rank. Differentiable: the
        backward sums the ranks' gradients and hands each rank its shard (a reduce-scatter),
        so every rank must run it.

    Raises:
        TypeError, ValueError: as :func:`shard_sequence`; a ``total_len`` that is not a
            non-negative int or disagrees with the shards; shard lengths that do not fit the
            layout, or other dimensions that differ across ranks (``total_len=None``).
    """
    check_tensor("x", x, None, floating=False)
    dim = _check_dim(dim, x)
    _check_layout(layout)
    if total_len is None:
        others = tuple(s for i, s in enumerate(x.shape) if i != dim)
        facts = {"x's number of dimensions": x.dim(), "x's other dimensions": _key(others), "x's dtype": _key(x.dtype)}
        plan = _make_plan(x.shape[dim], group, layout, x.device, facts)
    else:
        check_int("total_len", total_len, 0)
        plan = _plan(total_len, group, layout)
        if plan.local_len != x.shape[dim]:
            raise ValueError(
                f"total_len={total_len} gives rank {plan.rank} {plan.local_len} tokens under layout={layout!r}, "
                f"but x holds {x.shape[dim]} along dim {dim}"
            )
    return _GatherSequence.apply(x, plan, group, dim)


def _check_local(q, k, v, gates) -> None:
    """``attend``'s shape rules for one rank's shards, which may be empty (``T < 2R``)."""
    check_qkv(q, k, v, allow_empty=True)
    if gates is not None:
        check_gates(gates, q)


def context_parallel_attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gates: Tensor | None = None,
    *,
    group,
    config: NSAConfig | None = None,
    backend: str = "flex",
    layout: str = "zigzag",
    scale: float | None = None,
    cu_seqlens: Tensor | Documents | None = None,
    compress_k=None,
    compress_v=None,
    selection_grad: bool = False,
) -> Tensor:
    """``attend`` over a sequence sharded across ``group``: this rank's shard of the output.

    Equal, forward and backward, to ``shard_sequence(attend(Q, K, V, GATES, ...), group, 2,
    layout)`` where ``Q, K, V, GATES`` are the whole sequence's tensors.

    Args:
        q: ``(B, Hq, T_local, Dk)``, this rank's queries (:func:`shard_sequence` of ``Q``).
        k: ``(B, Hkv, T_local, Dk)``; v: ``(B, Hkv, T_local, Dv)``: this rank's keys and values.
        gates: ``(B, Hq, T_local, 3)`` or ``None``, as for ``attend``.
        group: the process group the sequence is sharded over (every rank of it calls this).
        config, backend, scale, selection_grad: as for ``attend``.
        layout: how the sequence was sharded, ``"zigzag"`` or ``"contiguous"``.
        cu_seqlens: packed documents of the **whole** row (``B = 1``): ``(N+1,)`` offsets from 0
            to ``T``, the same on every rank, or a ``Documents`` of them.
        compress_k, compress_v: callables ``(B, Hkv, T, D) -> (B, Hkv, Tc, D)`` taking a
            ``cu_seqlens=`` keyword (a ``BlockCompressor``), applied to the gathered keys and
            values; default the block mean.

    Returns:
        ``(B, Hq, T_local, Dv)``: this rank's rows of the output.

    Raises:
        TypeError, ValueError: as ``attend``, for this rank's shards; ``group`` as for
            :func:`shard_sequence`; an unknown ``layout``; shard lengths that do not fit the
            layout, or batch size, heads, head dims, dtype, gates, config, backend or documents
            that differ across ranks (found by one all-gather of a few ints, so every rank
            raises). An error in this rank's own arguments is raised before any communication,
            on this rank only (the others then wait in the all-gather until the group's timeout,
            as for any collective); `selection_grad` with `cu_seqlens` (as `attend`).

    Communication: the all-gather of a few ints above; one all-gather of ``K`` and ``V``
    together (``T * Hkv * (Dk + Dv)`` elements per batch row), and in the backward one
    reduce-scatter of their gradients. Every rank must run the backward.
    """
    _check_local(q, k, v, gates)
    config = resolve_config(config)
    check_backend(backend)
    _check_layout(layout)
    if selection_grad and cu_seqlens is not None:
        raise ValueError("selection_grad is not supported with cu_seqlens yet (as in attend)")
    facts = _facts(q, k, v, gates, config, backend, cu_seqlens)
    plan = _make_plan(q.shape[2], group, layout, q.device, facts)
    docs = None if cu_seqlens is None else resolve(cu_seqlens, plan.total_len, q.device, q.shape[0])
    k_full, v_full = _gather_kv(k, v, plan, group)
    return _attend_local(plan, q, k_full, v_full, gates, config=config, backend=backend, scale=scale, docs=docs,
                         compress_k=compress_k, compress_v=compress_v, selection_grad=selection_grad)


def _key(value) -> int:
    """A number for ``value`` that is the same in every process (``hash`` of a string is not)."""
    return zlib.crc32(repr(value).encode())


def _facts(q, k, v, gates, config, backend, cu_seqlens) -> dict[str, int]:
    """The shapes and settings that must agree across ranks, as ints (the same keys on every
    rank, so that every rank sends as many)."""
    docs = None
    if isinstance(cu_seqlens, Documents):
        docs = cu_seqlens.lengths
    elif isinstance(cu_seqlens, Tensor):
        docs = tuple(int(c) for c in cu_seqlens.tolist())
    return {
        "the batch size": q.shape[0], "q's heads": q.shape[1], "k's heads": k.shape[1], "Dk": q.shape[3],
        "Dv": v.shape[3], "the dtype": _key(q.dtype), "whether gates are given": int(gates is not None),
        "config": _key(config), "backend": _key(backend), "cu_seqlens": _key(docs),
    }


def _gather_kv(k: Tensor, v: Tensor, plan: _Plan, group) -> tuple[Tensor, Tensor]:
    """``(B, Hkv, T, Dk)``, ``(B, Hkv, T, Dv)``: the whole sequence's keys and values, in one
    all-gather (and one reduce-scatter of their gradients) when ``Dk == Dv``, two otherwise.
    Both come back contiguous."""
    if k.shape[-1] == v.shape[-1]:
        kv = _GatherSequence.apply(torch.stack((k, v)), plan, group, 3)
        return kv[0], kv[1]
    return _GatherSequence.apply(k, plan, group, 2), _GatherSequence.apply(v, plan, group, 2)


def _runs(start: int, stop: int, docs: Documents | None, config: NSAConfig):
    """The calls of one piece ``[start, stop)``: ``(lo, hi, first, c0)`` for the queries
    ``[lo, hi)`` over the keys ``[first, hi)``, whose compressed blocks start at ``c0``. Without
    documents one call; in a packed row one per document the piece meets, each attended alone
    (which is what packing means), so no call needs ``cu_seqlens``."""
    if docs is None:
        if start < stop:
            yield start, stop, 0, 0
        return
    for first, n, c0 in zip(docs.starts, docs.lengths, docs.compressed_offsets(config)):
        lo, hi = max(start, first), min(stop, first + n)
        if lo < hi:
            yield lo, hi, first, c0


def _attend_local(plan: _Plan, q, k_full, v_full, gates, *, config, backend, scale, docs, compress_k=None,
                  compress_v=None, selection_grad=False) -> Tensor:
    """This rank's output rows: each local piece (in a packed row, each document's part of it) is
    one call over the keys up to its end."""
    k_cmp = (compress_k or (lambda x, cu_seqlens: mean_compress(x, config, cu_seqlens)))(k_full, cu_seqlens=docs)
    v_cmp = (compress_v or (lambda x, cu_seqlens: mean_compress(x, config, cu_seqlens)))(v_full, cu_seqlens=docs)
    outs, local = [], 0
    for start, stop in plan.chunks[plan.rank]:
        for lo, hi, first, c0 in _runs(start, stop, docs, config):
            rows, tc = slice(local + lo - start, local + hi - start), config.num_compressed(hi - first)
            outs.append(_attend_rows(
                q[:, :, rows], k_full[:, :, first:hi], v_full[:, :, first:hi],
                None if gates is None else gates[:, :, rows], lo - first,
                config=config, k_cmp=k_cmp[:, :, c0:c0 + tc], v_cmp=v_cmp[:, :, c0:c0 + tc], backend=backend,
                scale=scale, selection_grad=selection_grad,
            ))
        local += stop - start
    if not outs:
        # An empty shard: its output still depends on the gathered keys, so that this rank,
        # too, enters the reduce-scatter of the backward (and on q and gates, whose gradients
        # are then empty tensors rather than None).
        B, Hq, _, _ = q.shape
        tie = (k_cmp.sum() + v_cmp.sum() + k_full.sum() + v_full.sum() + q.sum()) * 0
        tie = tie if gates is None else tie + gates.sum() * 0
        return q.new_zeros(B, Hq, 0, v_full.shape[-1]) + tie
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]


def _attend_rows(q: Tensor, k: Tensor, v: Tensor, gates: Tensor | None, offset: int, **kwargs) -> Tensor:
    """Rows ``offset .. offset + Tq - 1`` of ``attend`` over ``k, v`` (``Tk = offset + Tq``): one
    ``attend(..., q_offset=offset)`` call, whose work follows ``Tq``."""
    return attend(q, k, v, gates, q_offset=offset, **kwargs)
