"""Prefill (:func:`prefill`): attend over a prompt with ``attend()`` and fill an :class:`~nsa_flex.NSACache` with it,
at once or in chunks (each chunk's queries at their offset over the cache's keys so far)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .._validation import check_backend, check_callable, check_gates, check_int, check_int_tensor, check_qk_cmp, check_qkv
from ..api import attend
from .cache import NSACache, call_compressor, check_against_cache, check_cache, compressor_or_mean

__all__ = ["prefill"]


def prefill(
    cache: NSACache,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gates: Tensor | None = None,
    *,
    lengths: Tensor | None = None,
    k_cmp: Tensor | None = None,
    v_cmp: Tensor | None = None,
    compress_k: Callable[[Tensor], Tensor] | None = None,
    compress_v: Callable[[Tensor], Tensor] | None = None,
    scale: float | None = None,
    backend: str = "flex",
    chunk_size: int | None = None,
) -> Tensor:
    """Attend over a prompt with ``attend()`` and fill the cache with it, from position 0.

    Whatever the cache held is replaced. Rows may be right-padded: row ``b`` holds
    ``lengths[b]`` tokens; its outputs at those positions are exactly what ``attend`` gives for
    the row alone, and its outputs at padded positions are 0. The padding may hold anything,
    NaN and inf included: its positions of ``q``, ``k``, ``v``, ``gates`` and the compressed
    blocks that reach into it (given or computed) are zeroed before ``attend`` runs, so it
    never reaches a real output or the cache.

    Args:
        cache: an :class:`NSACache` with ``max_len >= T``.
        q: ``(B, Hq, T, Dk)``; k: ``(B, Hkv, T, Dk)``; v: ``(B, Hkv, T, Dv)``. ``T`` may be 0
            (the cache is emptied and an empty output returned).
        gates: ``(B, Hq, T, 3)`` or ``None``, as for ``attend``.
        lengths: ``(B,)`` integer tensor with values in ``[0, T]`` (default ``T`` for every row).
            Its values are read on the host (prefill is not meant for CUDA graphs).
        k_cmp, v_cmp: ``(B, Hkv, Tc, D)`` compressed K/V of the prompt, ``Tc =
            config.num_compressed(T)``; default ``compress_k(k)``/``compress_v(v)``.
        compress_k, compress_v: the compression ``phi``, ``(B, H, S, D) -> (B, H,
            num_compressed(S), D)`` (a ``BlockCompressor``, say); default the block mean.
            :func:`decode_step` must be given the same ones.
        scale: score scale (default ``Dk ** -0.5``).
        backend: the ``attend`` backend for the prompt.
        chunk_size: ``None`` (default): one ``attend`` over the whole prompt. An int ``C >= 1``:
            the prompt in chunks of ``C`` tokens (the last one shorter), each written to the
            cache and attended there, its queries at their offset over every key so far
            (``attend(..., q_offset=)``), so that the attention's memory follows ``C``, not
            ``T``. Outputs and cache equal one prefill of the whole prompt (to rounding). The
            compression is then called on each chunk's new blocks (spans of cached tokens, as
            in a decode step), so it must work block by block, as a ``BlockCompressor`` and
            the mean do; and the result is not differentiable (the chunks read the cache).

    Returns:
        ``(B, Hq, T, Dv)`` in ``q``'s dtype.

    Raises:
        TypeError, ValueError: naming the argument (shapes, dtypes, devices against the cache,
            ``T > max_len``, lengths out of range, a ``chunk_size`` that is not an int or
            below 1), before any kernel runs.
    """
    check_cache(cache)
    config = cache.config
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    check_callable("compress_k", compress_k)
    check_callable("compress_v", compress_v)
    check_backend(backend)
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, 1)
    T = q.shape[2] if q.dim() == 4 else -1
    if T == 0:  # an empty prompt: attend() takes none, so check the rest here
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape[2] != 0 or v.shape[2] != 0:
            raise ValueError("an empty prompt needs q, k, v of shape (B, H, 0, D)")
        check_against_cache(cache, q, k, v)
        cache.reset()
        return q.new_zeros(q.shape[0], q.shape[1], 0, v.shape[-1])
    check_qkv(q, k, v)
    check_against_cache(cache, q, k, v)
    B = q.shape[0]
    if T > cache.max_len:
        raise ValueError(f"the prompt (T = {T}) is longer than the cache's max_len ({cache.max_len})")
    if lengths is None:
        lengths = torch.full((B,), T, device=q.device, dtype=torch.int64)
        lo = bound = T
    else:
        check_int_tensor("lengths", lengths)
        if tuple(lengths.shape) != (B,):
            raise ValueError(f"lengths must be (B,) = ({B},), got {tuple(lengths.shape)}")
        if lengths.device != q.device:
            raise ValueError(f"lengths is on {lengths.device} but q is on {q.device}")
        lo, bound = (int(x) for x in torch.aminmax(lengths))
        if lo < 0 or bound > T:
            raise ValueError(f"lengths must lie in [0, T = {T}], found values in [{lo}, {bound}]")
        lengths = lengths.long()
    tc = config.num_compressed(T)
    # checked here too, since the padding is zeroed before attend() sees them
    if gates is not None:
        check_gates(gates, q)
    if k_cmp is not None:
        check_qk_cmp(q, k_cmp, config, "k_cmp")
    if v_cmp is not None:
        check_qk_cmp(q, v_cmp, config, "v_cmp", head_dim=v.shape[-1])
    held = torch.arange(T, device=q.device) < lengths[:, None]  # (B, T)
    complete = config.compressed_last_token(torch.arange(tc, device=q.device)) < lengths[:, None]
    padded = lo < T
    if chunk_size is not None and chunk_size < T:
        with torch.no_grad():
            out = _prefill_chunks(cache, q, k, v, gates, lengths, held, complete, padded, k_cmp, v_cmp,
                                  compressor_or_mean(compress_k, config), compressor_or_mean(compress_v, config),
                                  scale, backend, chunk_size)
        cache._bound = bound
        return out
    if padded:
        # Zero the padding before anything reads it: whatever it holds (NaN, inf) then never
        # reaches a real position, not even as 0 * NaN in a masked value product.
        q, k, v = (torch.where(held[:, None, :, None], x, 0) for x in (q, k, v))
        if gates is not None:
            gates = torch.where(held[:, None, :, None], gates, 0)
    if k_cmp is None:
        k_cmp = call_compressor("compress_k", compressor_or_mean(compress_k, config), k, tc)
    if v_cmp is None:
        v_cmp = call_compressor("compress_v", compressor_or_mean(compress_v, config), v, tc)
    if padded:  # the blocks that reach into a row's padding: no real query sees them
        k_cmp, v_cmp = (torch.where(complete[:, None, :, None], x, 0) for x in (k_cmp, v_cmp))

    out = attend(q, k, v, gates, config=config, k_cmp=k_cmp, v_cmp=v_cmp, scale=scale, backend=backend)

    with torch.no_grad():
        cache._k[:, :, :T] = k.detach()
        cache._v[:, :, :T] = v.detach()
        cache._k_cmp[:, :, :tc] = k_cmp.detach()
        cache._v_cmp[:, :, :tc] = v_cmp.detach()
        cache.lengths.copy_(lengths)
    cache._bound = bound
    return torch.where(held[:, None, :, None], out, 0) if padded else out


def _prefill_chunks(cache, q, k, v, gates, lengths, held, complete, padded, k_cmp, v_cmp, compress_k, compress_v,
                    scale, backend, chunk_size) -> Tensor:
    """:func:`prefill` in chunks of ``chunk_size`` tokens (validated): chunk ``[s, e)`` is
    written to the cache (padding zeroed, as the whole prefill zeroes it), the compressed blocks
    it completes (``num_compressed(s) .. num_compressed(e) - 1``) are compressed from the cached
    tokens, and its queries attend at offset ``s`` over the cache's ``e`` keys and their blocks."""
    config = cache.config
    B, Hq, T, _ = q.shape
    d, l = config.compress_stride, config.compress_block
    out = q.new_empty(B, Hq, T, v.shape[-1])
    for s in range(0, T, chunk_size):
        e = min(T, s + chunk_size)
        rows = slice(s, e)
        qc, kc, vc = q[:, :, rows], k[:, :, rows], v[:, :, rows]
        gc = None if gates is None else gates[:, :, rows]
        if padded:
            keep = held[:, None, rows, None]
            qc, kc, vc = (torch.where(keep, x, 0) for x in (qc, kc, vc))
            gc = None if gc is None else torch.where(keep, gc, 0)
        cache._k[:, :, rows] = kc
        cache._v[:, :, rows] = vc
        first, end = config.num_compressed(s), config.num_compressed(e)
        if end > first:
            blocks = slice(first, end)
            span = slice(first * d, (end - 1) * d + l)  # the tokens of the new blocks, all cached
            if k_cmp is None:
                new_k = call_compressor("compress_k", compress_k, cache._k[:, :, span], end - first)
            else:
                new_k = k_cmp[:, :, blocks]
            if v_cmp is None:
                new_v = call_compressor("compress_v", compress_v, cache._v[:, :, span], end - first)
            else:
                new_v = v_cmp[:, :, blocks]
            if padded:  # the blocks that reach into a row's padding: no real query sees them
                done = complete[:, None, blocks, None]
                new_k, new_v = torch.where(done, new_k, 0), torch.where(done, new_v, 0)
            cache._k_cmp[:, :, blocks] = new_k
            cache._v_cmp[:, :, blocks] = new_v
        o = attend(qc, cache._k[:, :, :e], cache._v[:, :, :e], gc, config=config, k_cmp=cache._k_cmp[:, :, :end],
                   v_cmp=cache._v_cmp[:, :, :end], scale=scale, backend=backend, q_offset=s)
        out[:, :, rows] = torch.where(held[:, None, rows, None], o, 0) if padded else o
    cache.lengths.copy_(lengths)
    return out
