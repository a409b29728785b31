"""Decode steps of one token (or a few, for speculative decoding) whose outputs equal one full
forward over the same tokens.

A decode step (:func:`decode_step`) reads nothing from the device on the host and its shapes
depend only on ``m`` and the cache's sizes, so it can be captured in a CUDA graph and replayed:

1. write the new K/V at positions ``lengths[b] .. lengths[b] + m - 1``;
2. compress the blocks those tokens complete (at most ``ceil(m / d)`` per row);
3. the compressed branch: the new queries against every compressed slot, masked to the blocks
   whose last token is at or before the query; its probabilities are the selection scores;
4. selection: :func:`~nsa_flex.scoring.block_importance` and
   :func:`~nsa_flex.top_n.top_n_blocks` at the queries' positions;
5. the selected branch: the ``n * l'`` keys of the chosen blocks, gathered;
6. the window branch: the last ``w`` keys, gathered;
7. the gates mix the three, and ``lengths += m`` (stopping at ``max_len``).

A step runs either as plain PyTorch operations (:func:`_decode_torch`: matmuls over gathered
keys, scores in float32 or wider), or, for one token per row (the default on CUDA), as four
Triton kernels split over the compressed blocks, the selected blocks and the window
(:mod:`.decode_fused`); :func:`nsa_flex.dispatch.decode_path` picks. The same for every backend:
``backend`` only picks how :func:`~nsa_flex.inference.prompt.prefill` attends.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .. import dispatch
from .._validation import MAX_HEAD_DIM, check_bool, check_callable, check_gates, check_qkv, resolve_scale
from ..gating import gate
from ..scoring import block_importance, masked_softmax
from ..top_n import top_n_blocks
from ..triton_support import check_triton
from .cache import NSACache, check_against_cache, check_cache, compress_new_blocks, compressor_or_mean, gather_rows, write_rows
from .decode_fused import launch_decode

__all__ = ["decode_step"]


def decode_step(
    cache: NSACache,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gates: Tensor | None = None,
    *,
    compress_k: Callable[[Tensor], Tensor] | None = None,
    compress_v: Callable[[Tensor], Tensor] | None = None,
    scale: float | None = None,
    fused: bool | None = None,
) -> Tensor:
    """Append ``m`` tokens to every row of the cache and attend them over all it holds.

    Row ``b``'s new tokens take positions ``p_b .. p_b + m - 1`` with ``p_b = cache.lengths[b]``;
    query ``t`` attends causally (to the cached tokens and the new ones up to itself) through
    the three NSA branches, exactly as ``attend`` over the whole row would. ``m = 1`` is
    ordinary decoding; ``m > 1`` verifies speculative tokens (roll rejected ones back with
    :meth:`NSACache.rewind_`).

    No host-device sync, and shapes that depend only on ``m`` and the cache's sizes: a step
    can be captured in a CUDA graph. It reads the row's compressed blocks, ``n * l'`` keys in
    the selected branch and ``w + m - 1`` in the window branch; the PyTorch step scores all
    ``Lc`` compressed slots (masked), so its cost follows ``max_len``.

    Args:
        cache: the :class:`NSACache`, updated in place.
        q: ``(B, Hq, m, Dk)``; k: ``(B, Hkv, m, Dk)``; v: ``(B, Hkv, m, Dv)``: the new tokens'
            queries, keys (rotated at their absolute positions, if the model uses RoPE) and values.
        gates: ``(B, Hq, m, 3)`` or ``None`` (each branch weighed 1).
        compress_k, compress_v: the compression used at prefill (default the block mean); each
            is called on ``(B, Hkv, S, D)`` spans of raw tokens with ``S = (ceil(m/d) - 1) * d + l``.
        scale: score scale (default ``Dk ** -0.5``).
        fused: ``True``: run the step's attention and selection as Triton kernels
            (``nsa_flex.kernels.decode``: four launches, split over the compressed blocks, the
            selected blocks and the window so that even one row fills the GPU; for many rows
            of long contexts ``nsa_flex.kernels.decode_batch``'s three; ``m = 1`` only;
            CUDA, or the CPU under ``TRITON_INTERPRET=1``). ``False``: plain PyTorch operations.
            ``None`` (default): the kernels for one token per row on CUDA (outside
            ``torch.compile``), PyTorch otherwise. With the default compression, the kernels
            also write the new token and compress the block it completes.

    Returns:
        ``(B, Hq, m, Dv)`` in ``q``'s dtype. Not differentiable (inference).

    Raises:
        TypeError, ValueError: naming the argument, before any kernel runs: shapes, dtypes or
            devices that do not match the cache, or a step that would pass ``max_len`` (checked
            against a host-side bound; see :meth:`NSACache.sync_bound` after graph replays). A
            replay past ``max_len`` is not refused: its tokens past it are dropped and the
            lengths stop at ``max_len`` (see :class:`NSACache`).
    """
    check_cache(cache)
    check_qkv(q, k, v)
    check_against_cache(cache, q, k, v)
    if gates is not None:
        check_gates(gates, q)
    check_callable("compress_k", compress_k)
    check_callable("compress_v", compress_v)
    scale = resolve_scale(scale, q)
    m = q.shape[2]
    check_bool("fused", fused, allow_none=True)
    if fused:
        if m != 1:
            raise ValueError(f"fused decoding takes one token per row, got q with {m}")
        check_triton(q)
        if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
            raise ValueError(f"fused decoding takes head sizes up to {MAX_HEAD_DIM}")
    path = dispatch.decode_path(q, v, fused)
    if cache._bound + m > cache.max_len:
        raise ValueError(
            f"q adds {m} token{'' if m == 1 else 's'} to rows holding up to {cache._bound}: past the "
            f"cache's max_len ({cache.max_len})"
        )
    config = cache.config
    with torch.no_grad():
        if path == "fused":
            out, _ = launch_decode(cache, q, k, v, gates, config, scale, compress_k, compress_v)
        else:
            out, _ = _decode_torch(cache, q, k, v, gates, config, scale, compressor_or_mean(compress_k, config),
                                   compressor_or_mean(compress_v, config))
    cache._bound += m
    return out


def _decode_torch(cache, q, k, v, gates, config, scale, compress_k, compress_v) -> tuple[Tensor, Tensor]:
    """The step in PyTorch operations: the output and the chosen blocks ``(B, Hkv, m, n)``."""
    B, Hq, m, Dk = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G = Hq // Hkv
    L = cache.max_len
    l, d, ls, w = config.compress_block, config.compress_stride, config.select_block, config.window
    dev = q.device
    cdt = torch.promote_types(q.dtype, torch.float32)  # scores in at least float32, as select_blocks

    start = cache.lengths  # (B,)
    t = start[:, None] + torch.arange(m, device=dev)  # (B, m) the new tokens' positions
    # Past max_len (replays that outran the host check) go to the spare slot, never out of bounds.
    write_rows(cache._k, torch.where(t < L, t, L), k)
    write_rows(cache._v, torch.where(t < L, t, L), v)
    compress_new_blocks(cache, start, m, compress_k, compress_v)

    # Query rows grouped by KV head: (B, Hkv, m, G, Dk), head h*G + g -> [b, h, :, g].
    qg = q.unflatten(1, (Hkv, G)).transpose(2, 3).to(cdt)
    t_q = t[:, None, :, None, None]  # broadcasts against (B, Hkv, m, G, S)

    # Compressed branch; its probabilities are the selection scores (paper eq. 8).
    tc = config.num_compressed(L)
    if tc:
        kc = cache._k_cmp[:, :, :tc].to(cdt)  # (B, Hkv, tc, Dk)
        s = (qg.flatten(2, 3) @ kc.transpose(-1, -2)).mul_(scale).unflatten(2, (m, G))  # (B, Hkv, m, G, tc)
        kv_pos = config.compressed_last_token(torch.arange(tc, device=dev))
        p = masked_softmax(s, kv_pos <= t_q)
        o_cmp = _weighted(p, kv_pos <= t[:, None, :, None], cache._v_cmp[:, :, :tc])  # (B, Hkv, m, G, Dv)
        # eq. 10: the group shares a selection; a NaN probability scores 0, as in select_blocks
        scores = block_importance(p.nan_to_num(0.0).sum(dim=3), config, L)
    else:
        o_cmp = q.new_zeros(B, Hkv, m, G, Dv)
        scores = torch.zeros(B, Hkv, m, config.num_select_blocks(L), device=dev, dtype=cdt)
    blocks = top_n_blocks(scores, config, positions=t[:, None, :])  # (B, Hkv, m, n)

    # Selected branch: the l' tokens of each chosen block, those after the query masked.
    tok = blocks.long().clamp_min(0)[..., None] * ls + torch.arange(ls, device=dev)  # (B, Hkv, m, n, l')
    allowed = (blocks >= 0)[..., None] & (tok <= t[:, None, :, None, None])
    tok, allowed = tok.flatten(3), allowed.flatten(3)[:, :, :, None]  # (B, Hkv, m, n*l'), (..., 1, n*l')
    tok = tok.clamp(max=L - 1)  # a last block past max_len: those tokens are after the query anyway
    ks = gather_rows(cache._k, tok).to(cdt)  # (B, Hkv, m, n*l', Dk)
    vs = gather_rows(cache._v, tok)
    p = masked_softmax((qg @ ks.transpose(-1, -2)).mul_(scale), allowed)  # (B, Hkv, m, G, n*l')
    o_slc = _weighted(p, allowed[:, :, :, 0], vs)

    # Window branch: the w + m - 1 positions that any of the m queries may see.
    span = min(w + m - 1, L)
    if span == L:
        pos = torch.arange(L, device=dev).expand(B, L)
    else:
        pos = start[:, None] - (w - 1) + torch.arange(span, device=dev)  # (B, span)
    seen = (pos[:, None, :] <= t[:, :, None]) & (pos[:, None, :] > t[:, :, None] - w) & (pos[:, None, :] >= 0)
    pos = pos.clamp(0, L - 1)[:, None].expand(B, Hkv, span)
    kw = gather_rows(cache._k, pos).to(cdt)  # (B, Hkv, span, Dk)
    vw = gather_rows(cache._v, pos)
    s = (qg.flatten(2, 3) @ kw.transpose(-1, -2)).mul_(scale).unflatten(2, (m, G))
    p = masked_softmax(s, seen[:, None, :, None, :])
    o_swa = _weighted(p, seen[:, None], vw)

    # A replay past max_len kept none of its tokens past it (they went to the spare slot): the
    # lengths stop at max_len, so that they never claim more than the cache holds.
    cache.lengths.add_(m).clamp_(max=L)

    def heads(o):  # (B, Hkv, m, G, Dv) -> (B, Hq, m, Dv)
        return o.transpose(2, 3).reshape(B, Hq, m, Dv).to(q.dtype)

    return gate(heads(o_cmp), heads(o_slc), heads(o_swa), gates), blocks


def _weighted(p: Tensor, allowed: Tensor, values: Tensor) -> Tensor:
    """``p @ values`` in which a key that a query may not see adds exactly 0, whatever it holds.

    A masked probability is 0, but ``0 * NaN`` is NaN, and masked slots can hold anything: a
    rewound token, a later token of the same step, the positions the window gathers twice.

    Args:
        p: ``(B, Hkv, m, G, S)``; allowed: bool, broadcastable to ``(B, Hkv, m, S)``;
        values: ``(B, Hkv, S, Dv)`` shared by the ``m`` queries, or ``(B, Hkv, m, S, Dv)``.

    Returns:
        ``(B, Hkv, m, G, Dv)`` in ``values``' dtype.
    """
    if values.dim() == 4:
        values = values[:, :, None]
    return p.to(values.dtype) @ torch.where(allowed[..., None], values, 0)
