"""The jobs tests/test_distributed.py runs on every rank of a :class:`cp_pool.Pool`.

Each takes ``(rank, world, group, ...)``: the whole sequence's tensors come from the test, each
rank shards them, runs its part, and the gathered results come back (from rank 0, or per rank
for the module's parameter gradients, which are per-rank parts).
"""

from __future__ import annotations

import torch

from nsa_flex.distributed import context_parallel_attend, local_positions, shard_sequence, unshard_sequence
from nsa_flex.module import SparseAttention


def attend_job(rank, world, group, full: dict, kwargs: dict, layout: str, backend: str):
    """``context_parallel_attend`` on this rank's shards of ``full``; rank 0 returns the
    gathered output and gradients (of ``(out * dout).sum()``)."""
    shard = lambda x: shard_sequence(x, group, 2, layout)  # noqa: E731
    q, k, v = (shard(full[n]).requires_grad_() for n in "qkv")
    gates = None if full["gates"] is None else shard(full["gates"]).requires_grad_()
    out = context_parallel_attend(q, k, v, gates, group=group, layout=layout, backend=backend, **kwargs)
    (out * shard(full["dout"])).sum().backward()
    T = full["q"].shape[2]
    got = {"out": unshard_sequence(out.detach(), group, 2, layout)}  # lengths exchanged
    for name, x in (("q", q), ("k", k), ("v", v), ("gates", gates)):
        if x is not None:
            got[name] = unshard_sequence(x.grad, group, 2, layout, total_len=T)
    return got if rank == 0 else None


def module_job(rank, world, group, args: dict, state: dict, x, dy, layout: str, cu_seqlens):
    """The layer over this rank's shard of ``x (B, T, dim)``; every rank returns its parameter
    gradients, rank 0 also the gathered output and ``x``'s gradient."""
    layer = SparseAttention(**args, group=group, layout=layout).to(x.dtype)
    layer.load_state_dict(state)
    assert f"layout={layout!r} over a group of {world}" in repr(layer)
    x_local = shard_sequence(x, group, 1, layout).requires_grad_()
    y = layer(x_local, cu_seqlens=cu_seqlens)
    (y * shard_sequence(dy, group, 1, layout)).sum().backward()
    grads = {n: (torch.zeros_like(p) if p.grad is None else p.grad) for n, p in layer.named_parameters()}
    y_all = unshard_sequence(y.detach(), group, 1, layout)
    dx_all = unshard_sequence(x_local.grad, group, 1, layout)
    return {"grads": grads, "y": y_all, "dx": dx_all} if rank == 0 else {"grads": grads}


def round_trip_job(rank, world, group, x, dim: int, layout: str):
    """``unshard(shard(x))``, the shard's length, the gradient of the round trip, and
    ``local_positions``."""
    x = x.clone().requires_grad_(x.is_floating_point())
    local = shard_sequence(x, group, dim, layout)
    back = unshard_sequence(local, group, dim, layout)
    if x.requires_grad:
        back.sum().backward()
    return back.detach(), local.shape[dim % x.dim()], x.grad, local_positions(x.shape[dim], group, layout)


class PerRank:
    """An argument that differs by rank: ``values[rank]``."""

    def __init__(self, *values) -> None:
        self.values = values


def errors_job(rank, world, group, calls: list):
    """Each ``(fn, args, kwargs)`` of ``calls`` on this rank (``group`` filled in where an
    argument is the string ``"GROUP"``, a :class:`PerRank` by this rank's value); the type and
    message of what each raised, or ``None``."""
    seen = []

    def fill(a):
        if isinstance(a, str) and a == "GROUP":
            return group
        return a.values[rank] if isinstance(a, PerRank) else a

    for fn, args, kwargs in calls:
        try:
            fn(*[fill(a) for a in args], **{n: fill(a) for n, a in kwargs.items()})
            seen.append(None)
        except (TypeError, ValueError) as e:
            seen.append((type(e).__name__, str(e)))
    return seen


def module_forward(group, layer: dict, extra: dict, **kwargs):
    """A sharded layer (``SparseAttention(**layer, **extra, group=group)``) over 3 local tokens."""
    x = torch.randn(1, 3, layer["dim"])
    return SparseAttention(**layer, **extra, group=group)(x, **kwargs)
