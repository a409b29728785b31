"""Top-n block selection (paper eq. 11): each query's ``n`` blocks from their importance.

Blocks ``0 .. num_initial - 1`` and the ``num_local`` most recent are always taken (forced);
the rest by importance, an exact tie going to the lower block (:func:`_ranking_key`), so that a
selection does not depend on how many blocks a row holds (a decode step, rows as long as the
cache, picks what the full forward picks). The Triton top-n (``nsa_flex.kernels.top_n``) keeps
the same rule.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._validation import check_floating, check_int, check_int_tensor
from .config import NSAConfig, num_select_blocks, resolve_config

__all__ = ["top_n_blocks"]


def _ranking_key(scores: Tensor, j: Tensor, ns: int) -> tuple[Tensor, bool]:
    """Scores made free of exact ties: equal scores rank the lower block first.

    Returns ``(key, needs_stable_sort)``. Ties are common and structural (blocks that no visible
    compressed block overlaps all score 0; one visible compressed block spreads equal weights
    over several selection blocks), and ``torch.topk`` breaks them by its own internals, which
    differ with the row length. A fixed rule makes a selection independent of how many blocks a
    row holds, so a decode step (rows as long as the cache) picks what the full forward picks.

    Scores below float64 are widened to float64 and nudged up by less than half a spacing of
    their own precision, more for lower blocks; that orders exact ties and keeps every other
    order. Float64 scores (or more than 2**16 blocks) cannot be widened: the caller sorts them
    stably instead, which gives the same order.
    """
    key = scores.to(torch.promote_types(scores.dtype, torch.float32))
    if key.dtype != torch.float32 or ns >= 2**16:
        return key, True
    # float32's spacing at x is at least |x| * 2**-24; the nudge stays below |x| * ns * 2**-40.
    # Zero (and subnormals) are nudged from float32's smallest normal, below the smallest subnormal.
    nudge = (ns - 1 - j).to(torch.float64) * 2.0**-40
    wide = key.to(torch.float64)
    nudged = wide + wide.abs().clamp_min(torch.finfo(torch.float32).tiny) * nudge
    return torch.where(torch.isfinite(wide), nudged, wide), False


def top_n_blocks(
    scores: Tensor, config: NSAConfig, q_start: int = 0, *, positions: Tensor | None = None
) -> Tensor:
    """Pick ``n`` blocks per query: forced initial and local blocks, then the best candidates.

    Equal scores rank the lower block first, so the result does not depend on how many
    (non-candidate) blocks a row holds.

    Args:
        scores: ``(B, Hkv, C, Ns)`` importance of each block for queries ``q_start ..
            q_start + C - 1``.
        positions: instead of ``q_start``, each query's position as an integer tensor
            broadcastable to ``(B, Hkv, C)``, e.g. ``(B, 1, C)`` for batch rows at different
            offsets (a decode step). Nothing is read from it on the host (no sync, capturable
            in a CUDA graph), so it is not checked against ``Ns``: the caller makes ``scores``
            cover every candidate block.

    Returns:
        ``(B, Hkv, C, n)`` int32, valid indices ascending, then ``-1``.

    Raises:
        TypeError, ValueError: if ``scores`` is not floating or has fewer blocks than the
            queries can select from, or ``positions`` is not an integer tensor on ``scores``'
            device.
    """
    config = resolve_config(config)
    check_int("q_start", q_start, minimum=0)
    check_floating("scores", scores, min_dim=2)
    *lead, C, ns = scores.shape
    n, ls = config.num_selected, config.select_block
    if positions is None:
        if ns < num_select_blocks(q_start + C, ls):
            raise ValueError(
                f"scores must cover the {num_select_blocks(q_start + C, ls)} blocks up to query {q_start + C - 1}, "
                f"got {ns}"
            )
        pos = torch.arange(q_start, q_start + C, device=scores.device, dtype=torch.int64)
    else:
        check_int_tensor("positions", positions)
        if positions.device != scores.device:
            raise ValueError(f"positions is on {positions.device} but scores is on {scores.device}")
        if positions.dim() < 1 or positions.shape[-1] not in (1, C):
            raise ValueError(f"positions must end in C = {C} queries, got shape {tuple(positions.shape)}")
        pos = positions.long()
    j = torch.arange(ns, device=scores.device)
    current = (pos // ls)[..., None]
    candidate = j <= current
    forced = candidate & ((j < config.num_initial) | (j > current - config.num_local))
    key, stable = _ranking_key(scores, j, ns)
    key = key.masked_fill(~candidate, float("-inf")).masked_fill(forced, float("inf"))
    return _top_n_of_keys(key, n, stable)


def _top_n_of_keys(key: Tensor, n: int, stable: bool) -> Tensor:
    """``n`` best of ``key (..., Ns)`` (forced blocks ``+inf``, non-candidates ``-inf``, from
    :func:`_ranking_key`) as ascending int32 indices, ``-1`` padded."""
    ns = key.shape[-1]
    if stable:
        vals, idx = torch.sort(key, dim=-1, descending=True, stable=True)
        vals, idx = vals[..., : min(n, ns)], idx[..., : min(n, ns)]
    else:
        vals, idx = torch.topk(key, min(n, ns), dim=-1)
    # Non-candidates sort last (sentinel ns), then become -1.
    idx = torch.where(vals == float("-inf"), ns, idx)
    idx = torch.sort(idx, dim=-1).values
    idx = torch.where(idx == ns, -1, idx).to(torch.int32)
    if ns < n:
        idx = torch.nn.functional.pad(idx, (0, n - ns), value=-1)
    return idx
