"""Inference: a preallocated KV cache, prefill from a prompt, and decode steps of one token (or a
few, for speculative decoding) whose outputs equal one full forward over the same tokens.

:class:`NSACache` holds, per batch row, the raw keys and values of every token so far, the
compressed keys and values of every complete compressed block, and the row's length. The tail
of tokens not yet compressed is the raw K/V after the last complete block: a compressed block is
computed the moment its last token arrives, from the raw K/V, so the tail needs no buffer of its
own. Everything is allocated once, for ``max_len`` tokens; nothing grows by concatenation.

Batch rows may hold different lengths (``cache.lengths``, a ``(B,)`` tensor): each row's tokens
sit at positions ``0 .. lengths[b] - 1``, and a decode step appends ``m`` tokens to every row at
that row's positions. Prefill takes right-padded prompts and their lengths.

A decode step (:func:`decode_step`) reads nothing from the device on the host and its shapes
depend only on ``m`` and the cache's sizes, so it can be captured in a CUDA graph and replayed:

1. write the new K/V at positions ``lengths[b] .. lengths[b] + m - 1``;
2. compress the blocks those tokens complete (at most ``ceil(m / d)`` per row);
3. the compressed branch: the new queries against every compressed slot, masked to the blocks
   whose last token is at or before the query; its probabilities are the selection scores;
4. selection: :func:`~nsa_flex.selection.block_importance` and
   :func:`~nsa_flex.selection.top_n_blocks` at the queries' positions;
5. the selected branch: the ``n * l'`` keys of the chosen blocks, gathered;
6. the window branch: the last ``w`` keys, gathered;
7. the gates mix the three, and ``lengths += m`` (stopping at ``max_len``).

A step runs either as plain PyTorch operations (matmuls over gathered keys, scores in float32
or wider), or, for one token per row (the default on CUDA), as four Triton kernels split over
the compressed blocks, the selected blocks and the window (``decode_kernels.py``, launched by
``_decode_fused``); the same for every backend: ``backend`` only picks how :func:`prefill`
attends.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ._validation import (
    can_read_values,
    check_backend,
    check_bool,
    check_callable,
    check_gates,
    check_int,
    check_int_tensor,
    check_qk_cmp,
    check_qkv,
    resolve_scale,
)
from .api import _gate, attend
from .compression import mean_compress
from .config import NSAConfig, resolve_config
from .triton_support import available, check_triton
from . import tuning
from .selection import block_importance, top_n_blocks

__all__ = ["NSACache", "prefill", "decode_step"]


class NSACache:
    """Preallocated decoding state of one NSA layer: raw K/V, compressed K/V, per-row lengths.

    Args:
        batch_size: ``B``.
        kv_heads: ``Hkv``.
        max_len: ``L``, the most tokens a row may hold (prompt and generated).
        dim_head: ``Dk``.
        dim_head_v: ``Dv`` (default ``dim_head``).
        config: the layer's ``NSAConfig`` (default the paper's).
        device, dtype: of the K/V (default CPU, float32); the queries and keys given to
            :func:`prefill`/:func:`decode_step` must match them.

    Attributes (views of the storage):
        k, v: ``(B, Hkv, L, Dk)`` / ``(B, Hkv, L, Dv)``: token ``s`` of row ``b`` at
            ``[b, :, s]`` for ``s < lengths[b]`` (keys as given, i.e. already rotated by RoPE).
        k_cmp, v_cmp: ``(B, Hkv, Lc, Dk)`` / ``(B, Hkv, Lc, Dv)``, ``Lc =
            config.num_compressed(L)``: compressed block ``i`` (tokens ``i*d .. i*d + l - 1``)
            for ``i*d + l - 1 < lengths[b]``. In ``dtype``, as the compression returns them and
            as ``attend`` takes them (selection widens the scores it computes from them).
        lengths: ``(B,)`` int64 on ``device``, tokens held per row.

    What lies past a row's length is never read as visible, so rolling a row back (rejected
    speculative tokens) is :meth:`rewind_`. ``lengths`` stays in ``[0, tokens held]`` whatever
    the calls: every method and step keeps it there (see :meth:`rewind_` for the counts it
    refuses or clamps).

    Each storage tensor has one spare slot past the end. Eager steps never pass ``max_len``
    (the host-side bound refuses them), but CUDA-graph replays skip that check: a replayed step
    past ``max_len`` writes its tokens past it into the spare slot instead of out of bounds
    (they are dropped), ``lengths`` stops at ``max_len``, and its outputs are not those of the
    full forward (they miss the dropped tokens). The spare slot of ``k_cmp``/``v_cmp`` also
    takes the blocks that a step computes but does not complete. No step within ``max_len``
    reads a spare slot.
    """

    def __init__(
        self,
        batch_size: int,
        kv_heads: int,
        max_len: int,
        dim_head: int,
        dim_head_v: int | None = None,
        *,
        config: NSAConfig | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        B = check_int("batch_size", batch_size, 1)
        H = check_int("kv_heads", kv_heads, 1)
        L = check_int("max_len", max_len, 1)
        Dk = check_int("dim_head", dim_head, 1)
        Dv = Dk if dim_head_v is None else check_int("dim_head_v", dim_head_v, 1)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.config = resolve_config(config)
        self.max_len = L
        device = torch.device("cpu" if device is None else device)
        tc = self.config.num_compressed(L)
        # Zeros, not empty: slots past a row's length are masked out of every softmax, but a
        # NaN there would still turn 0 * NaN into NaN in the value products.
        self._k = torch.zeros(B, H, L + 1, Dk, device=device, dtype=dtype)
        self._v = torch.zeros(B, H, L + 1, Dv, device=device, dtype=dtype)
        self._k_cmp = torch.zeros(B, H, tc + 1, Dk, device=device, dtype=dtype)
        self._v_cmp = torch.zeros(B, H, tc + 1, Dv, device=device, dtype=dtype)
        self.lengths = torch.zeros(B, device=device, dtype=torch.int64)
        # An upper bound on lengths, kept on the host so that a step can refuse to overflow
        # without reading the device: exact after prefill, eager steps and eager rewinds;
        # graph replays advance lengths past it (sync_bound).
        self._bound = 0

    # ------------------------------------------------------------------------- views

    @property
    def k(self) -> Tensor:
        return self._k[:, :, : self.max_len]

    @property
    def v(self) -> Tensor:
        return self._v[:, :, : self.max_len]

    @property
    def k_cmp(self) -> Tensor:
        return self._k_cmp[:, :, :-1]

    @property
    def v_cmp(self) -> Tensor:
        return self._v_cmp[:, :, :-1]

    @property
    def batch_size(self) -> int:
        return self._k.shape[0]

    @property
    def kv_heads(self) -> int:
        return self._k.shape[1]

    @property
    def dim_head(self) -> int:
        return self._k.shape[3]

    @property
    def dim_head_v(self) -> int:
        return self._v.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self._k.dtype

    @property
    def device(self) -> torch.device:
        return self._k.device

    def __repr__(self) -> str:
        return (
            f"NSACache(batch_size={self.batch_size}, kv_heads={self.kv_heads}, max_len={self.max_len}, "
            f"dim_head={self.dim_head}, dim_head_v={self.dim_head_v}, dtype={self.dtype}, "
            f"device={self.device}, config={self.config})"
        )

    # ----------------------------------------------------------------------- state

    def reset(self) -> NSACache:
        """Empty every row (lengths to 0); the storage is kept."""
        self.lengths.zero_()
        self._bound = 0
        return self

    def rewind_(self, num_tokens: int | Tensor) -> NSACache:
        """Drop the last ``num_tokens`` tokens of each row (an int, or a scalar or ``(B,)``
        integer tensor for a count per row), e.g. rejected speculative tokens; a row's length
        stops at 0. The cache stays usable: decode steps may follow at once.

        ``num_tokens`` must be non-negative. An int is checked on the host and lowers the
        host-side bound that guards ``max_len`` by as much. A tensor's values are read (one
        device read, which also re-reads the new lengths' maximum into that bound) and a
        negative one raises ``ValueError``. While compiling with ``torch.compile`` or capturing
        a CUDA graph nothing is read: a negative count is taken as 0 on the device, so that no
        input moves a row's length outside ``[0, tokens held]``, and the host-side bound stays
        as it was, for an int too (a captured rewind runs at each replay, not now); it is still
        an upper bound, and :meth:`sync_bound` lowers it.

        Nothing else changes: raw and compressed slots past a row's new length are never read
        as visible, and are overwritten when tokens arrive there again.
        """
        eager = can_read_values(self.lengths)  # not compiling or capturing
        if isinstance(num_tokens, Tensor):
            check_int_tensor("num_tokens", num_tokens)
            if num_tokens.shape not in ((), (self.batch_size,)):
                raise ValueError(f"num_tokens must be a scalar or (B,) = ({self.batch_size},), got {tuple(num_tokens.shape)}")
            if num_tokens.device != self.device:
                raise ValueError(f"num_tokens is on {num_tokens.device} but the cache is on {self.device}")
            if eager and self.device.type != "meta":  # values can be read
                after = (self.lengths - num_tokens).clamp_(min=0)
                lo, hi = torch.stack((num_tokens.min().long(), after.max())).tolist()  # one read
                if lo < 0:
                    raise ValueError(f"num_tokens must be >= 0, got a count of {lo}")
                self.lengths.copy_(after)
                self._bound = hi
            else:  # nothing may be read: clamp on the device, keep the (still valid) bound
                self.lengths.sub_(num_tokens.clamp(min=0)).clamp_(min=0)
        else:
            check_int("num_tokens", num_tokens, 0)
            self.lengths.sub_(num_tokens).clamp_(min=0)
            if eager:
                self._bound = max(self._bound - num_tokens, 0)
        return self

    def sync_bound(self) -> NSACache:
        """Re-read the lengths' maximum from the device (one sync) into the host-side bound that
        guards ``max_len``. Needed after replaying a captured decode step, since replays advance
        ``lengths`` on the device without the host knowing."""
        self._bound = int(self.lengths.max())
        return self

    def clone(self) -> NSACache:
        """A deep copy (new storage)."""
        new = object.__new__(NSACache)
        new.config, new.max_len, new._bound = self.config, self.max_len, self._bound
        for name in ("_k", "_v", "_k_cmp", "_v_cmp", "lengths"):
            setattr(new, name, getattr(self, name).clone())
        return new

    def copy_(self, other: NSACache) -> NSACache:
        """Copy ``other``'s state into this cache's storage in place (so that a captured CUDA
        graph keeps reading it). The two must have the same sizes, config, dtype and device."""
        if not isinstance(other, NSACache):
            raise TypeError(f"other must be an NSACache, got {type(other).__name__}")
        if other.config != self.config:
            raise ValueError("other has another config")
        for name in ("_k", "_v", "_k_cmp", "_v_cmp", "lengths"):
            a, b = getattr(self, name), getattr(other, name)
            if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
                raise ValueError(f"other's {name.lstrip('_')} is {tuple(b.shape)} {b.dtype} on {b.device}, "
                                 f"this cache's is {tuple(a.shape)} {a.dtype} on {a.device}")
            a.copy_(b)
        self._bound = other._bound
        return self


# --------------------------------------------------------------------------- checks


def _check_cache(cache) -> None:
    if not isinstance(cache, NSACache):
        raise TypeError(f"cache must be an NSACache, got {type(cache).__name__}")


def _check_against_cache(cache: NSACache, q: Tensor, k: Tensor, v: Tensor) -> None:
    B, Hq, T, Dk = q.shape
    if B != cache.batch_size:
        raise ValueError(f"q has batch {B} but the cache holds {cache.batch_size} rows")
    if k.shape[1] != cache.kv_heads:
        raise ValueError(f"k has {k.shape[1]} heads but the cache holds {cache.kv_heads}")
    if Dk != cache.dim_head or v.shape[-1] != cache.dim_head_v:
        raise ValueError(
            f"head dims (Dk={Dk}, Dv={v.shape[-1]}) differ from the cache's "
            f"(Dk={cache.dim_head}, Dv={cache.dim_head_v})"
        )
    if q.dtype != cache.dtype:
        raise TypeError(f"q has dtype {q.dtype} but the cache holds {cache.dtype}")
    if q.device != cache.device:
        raise ValueError(f"q is on {q.device} but the cache is on {cache.device}")


def _compressor(fn, config: NSAConfig) -> Callable[[Tensor], Tensor]:
    return (lambda x: mean_compress(x, config)) if fn is None else fn


def _compressed(name: str, fn, x: Tensor, blocks: int) -> Tensor:
    out = fn(x)
    expected = (*x.shape[:2], blocks, x.shape[-1])
    if not isinstance(out, Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"{name} must map (B, H, S, D) to (B, H, num_compressed(S), D) = {expected}, got {got}")
    return out


# --------------------------------------------------------------------------- prefill


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

    Returns:
        ``(B, Hq, T, Dv)`` in ``q``'s dtype.

    Raises:
        TypeError, ValueError: naming the argument (shapes, dtypes, devices against the cache,
            ``T > max_len``, lengths out of range), before any kernel runs.
    """
    _check_cache(cache)
    config = cache.config
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    check_callable("compress_k", compress_k)
    check_callable("compress_v", compress_v)
    check_backend(backend)
    T = q.shape[2] if q.dim() == 4 else -1
    if T == 0:  # an empty prompt: attend() takes none, so check the rest here
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape[2] != 0 or v.shape[2] != 0:
            raise ValueError("an empty prompt needs q, k, v of shape (B, H, 0, D)")
        _check_against_cache(cache, q, k, v)
        cache.reset()
        return q.new_zeros(q.shape[0], q.shape[1], 0, v.shape[-1])
    check_qkv(q, k, v)
    _check_against_cache(cache, q, k, v)
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
    complete = (torch.arange(tc, device=q.device) * config.compress_stride + config.compress_block - 1) < lengths[:, None]
    padded = lo < T
    if padded:
        # Zero the padding before anything reads it: whatever it holds (NaN, inf) then never
        # reaches a real position, not even as 0 * NaN in a masked value product.
        q, k, v = (torch.where(held[:, None, :, None], x, 0) for x in (q, k, v))
        if gates is not None:
            gates = torch.where(held[:, None, :, None], gates, 0)
    if k_cmp is None:
        k_cmp = _compressed("compress_k", _compressor(compress_k, config), k, tc)
    if v_cmp is None:
        v_cmp = _compressed("compress_v", _compressor(compress_v, config), v, tc)
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


# ------------------------------------------------------------------------------ decode


def _flat_rows(store: Tensor, idx: Tensor) -> Tensor:
    """``store (B, H, S, D)`` gathered at per-(row, head) slots ``idx (B, H, ...)`` -> ``(B, H, ..., D)``.

    ``index_select`` on a flat view reads each index once, where ``gather`` would need it
    expanded over ``D``.
    """
    B, H, S, D = store.shape
    base = (torch.arange(B * H, device=store.device) * S).view(B, H, *([1] * (idx.dim() - 2)))
    flat = (idx + base).reshape(-1)
    return store.reshape(B * H * S, D).index_select(0, flat).view(*idx.shape, D)


def _write(store: Tensor, slots: Tensor, x: Tensor) -> None:
    """``store[b, :, slots[b, i]] = x[b, :, i]``; ``slots (B, m)``, ``x (B, H, m, D)``."""
    B, H, m, D = x.shape
    store.scatter_(2, slots[:, None, :, None].expand(B, H, m, D), x.to(store.dtype))


def _softmax_rows(scores: Tensor, allowed: Tensor) -> Tensor:
    """Softmax over the allowed keys. A row that allows none is 0 (softmax would give NaN); only
    such rows: a NaN or infinity that the scores a row sees hold stays, as in the forward."""
    p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.where(allowed.any(dim=-1, keepdim=True), p, 0.0)


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


def _compress_new_blocks(cache, start, m, compress_k, compress_v) -> None:
    """Compress the blocks completed by tokens ``start[b] .. start[b] + m - 1``: block ``i`` ends
    at token ``i*d + l - 1``, so at most ``ceil(m / d)`` of them, from ``ceil((start - l + 1) / d)``."""
    config, L = cache.config, cache.max_len
    l, d = config.compress_block, config.compress_stride
    tc = config.num_compressed(L)
    if tc == 0:
        return
    nb = (m - 1) // d + 1
    first = (-torch.div(-(start - (l - 1)), d, rounding_mode="floor")).clamp_min(0)  # (B,)
    block = first[:, None] + torch.arange(nb, device=start.device)  # (B, nb)
    done = (block * d + l - 1 <= start[:, None] + m - 1) & (block < tc)
    # The tokens of blocks first .. first + nb - 1, read past the end only for blocks not done.
    span = (first[:, None] * d + torch.arange((nb - 1) * d + l, device=start.device)).clamp(max=L - 1)
    H = cache.kv_heads
    span = span[:, None].expand(-1, H, -1)
    kc = _compressed("compress_k", compress_k, _flat_rows(cache._k, span), nb)
    vc = _compressed("compress_v", compress_v, _flat_rows(cache._v, span), nb)
    slots = torch.where(done, block, tc)  # not done: the spare slot
    _write(cache._k_cmp, slots, kc)
    _write(cache._v_cmp, slots, vc)


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
            (``decode_kernels.py``: four launches, split over the compressed blocks, the
            selected blocks and the window so that even one row fills the GPU; ``m = 1`` only;
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
    _check_cache(cache)
    check_qkv(q, k, v)
    _check_against_cache(cache, q, k, v)
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
        if max(q.shape[-1], v.shape[-1]) > 256:
            raise ValueError("fused decoding takes head sizes up to 256")
    elif fused is None:
        fused = m == 1 and q.is_cuda and not torch.compiler.is_compiling() and not _fused_runnable(q, v)
    if cache._bound + m > cache.max_len:
        raise ValueError(
            f"q adds {m} token{'' if m == 1 else 's'} to rows holding up to {cache._bound}: past the "
            f"cache's max_len ({cache.max_len})"
        )
    config = cache.config
    with torch.no_grad():
        if fused:
            out, _ = _decode_fused(cache, q, k, v, gates, config, scale, compress_k, compress_v)
        else:
            out, _ = _decode(cache, q, k, v, gates, config, scale, _compressor(compress_k, config),
                             _compressor(compress_v, config))
    cache._bound += m
    return out


def _decode(cache, q, k, v, gates, config, scale, compress_k, compress_v) -> tuple[Tensor, Tensor]:
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
    _write(cache._k, torch.where(t < L, t, L), k)
    _write(cache._v, torch.where(t < L, t, L), v)
    _compress_new_blocks(cache, start, m, compress_k, compress_v)

    # Query rows grouped by KV head: (B, Hkv, m, G, Dk), head h*G + g -> [b, h, :, g].
    qg = q.unflatten(1, (Hkv, G)).transpose(2, 3).to(cdt)
    t_q = t[:, None, :, None, None]  # broadcasts against (B, Hkv, m, G, S)

    # Compressed branch; its probabilities are the selection scores (paper eq. 8).
    tc = config.num_compressed(L)
    if tc:
        kc = cache._k_cmp[:, :, :tc].to(cdt)  # (B, Hkv, tc, Dk)
        s = (qg.flatten(2, 3) @ kc.transpose(-1, -2)).mul_(scale).unflatten(2, (m, G))  # (B, Hkv, m, G, tc)
        kv_pos = torch.arange(tc, device=dev) * d + (l - 1)
        p = _softmax_rows(s, kv_pos <= t_q)
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
    ks = _flat_rows(cache._k, tok).to(cdt)  # (B, Hkv, m, n*l', Dk)
    vs = _flat_rows(cache._v, tok)
    p = _softmax_rows((qg @ ks.transpose(-1, -2)).mul_(scale), allowed)  # (B, Hkv, m, G, n*l')
    o_slc = _weighted(p, allowed[:, :, :, 0], vs)

    # Window branch: the w + m - 1 positions that any of the m queries may see.
    span = min(w + m - 1, L)
    if span == L:
        pos = torch.arange(L, device=dev).expand(B, L)
    else:
        pos = start[:, None] - (w - 1) + torch.arange(span, device=dev)  # (B, span)
    seen = (pos[:, None, :] <= t[:, :, None]) & (pos[:, None, :] > t[:, :, None] - w) & (pos[:, None, :] >= 0)
    pos = pos.clamp(0, L - 1)[:, None].expand(B, Hkv, span)
    kw = _flat_rows(cache._k, pos).to(cdt)  # (B, Hkv, span, Dk)
    vw = _flat_rows(cache._v, pos)
    s = (qg.flatten(2, 3) @ kw.transpose(-1, -2)).mul_(scale).unflatten(2, (m, G))
    p = _softmax_rows(s, seen[:, None, :, None, :])
    o_swa = _weighted(p, seen[:, None], vw)

    # A replay past max_len kept none of its tokens past it (they went to the spare slot): the
    # lengths stop at max_len, so that they never claim more than the cache holds.
    cache.lengths.add_(m).clamp_(max=L)

    def heads(o):  # (B, Hkv, m, G, Dv) -> (B, Hq, m, Dv)
        return o.transpose(2, 3).reshape(B, Hq, m, Dv).to(q.dtype)

    return _gate(heads(o_cmp), heads(o_slc), heads(o_swa), gates), blocks


def _fused_runnable(q: Tensor, v: Tensor) -> str:
    """Why the fused step cannot take ``q`` (empty if it can)."""
    ok, why = available(q.device)
    if not ok:
        return why
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"fused decoding takes float16, bfloat16 or float32, got {q.dtype}"
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        return "fused decoding under Triton's CPU interpreter takes float16 or float32, not bfloat16"
    if max(q.shape[-1], v.shape[-1]) > 256:
        return "fused decoding takes head sizes up to 256"
    return ""



def _decode_fused(cache, q, k, v, gates, config, scale, compress_k, compress_v, splits=None) -> tuple[Tensor, Tensor]:
    """``_decode`` for one token per row, in four Triton launches (``decode_kernels.py``).

    ``compress_k``/``compress_v`` as given to :func:`decode_step`: both ``None`` (the block mean)
    lets the first kernel write the new token and compress the block it completes; otherwise
    those two stay PyTorch operations. ``splits``: ``(S1, S2)`` instead of
    :func:`nsa_flex.tuning.decode_splits` (tests). Returns the output and the chosen blocks ``(B, Hkv, 1, n)``.
    """
    from .decode_kernels import block_keys_kernel, combine_kernel, compressed_split_kernel, sparse_split_kernel

    B, Hq, _, Dk = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G = Hq // Hkv
    L = cache.max_len
    l, d, ls, w = config.compress_block, config.compress_stride, config.select_block, config.window
    mean = compress_k is None and compress_v is None
    if not mean:
        start = cache.lengths
        t = start[:, None]
        _write(cache._k, torch.where(t < L, t, L), k)
        _write(cache._v, torch.where(t < L, t, L), v)
        _compress_new_blocks(cache, start, 1, _compressor(compress_k, config), _compressor(compress_v, config))

    tc, ns, n = config.num_compressed(L), config.num_select_blocks(L), config.num_selected
    block_c, step = tuning.score_tiles(config)
    rows = B * Hkv
    s1, s2 = splits if splits is not None else tuning.decode_splits(q.device, rows, tc, ns, step)
    tiles = tuning.decode_tiles(G, Dk, Dv, config, tc, s1)
    nw = tiles.n_window  # a selected block, or a window tile, per program
    P = s1 + n + nw
    # one float32 scratch buffer: logits, keys, partial states (m, l, acc), chosen blocks
    sizes = (rows * G * max(tc, 1), rows * ns, rows * P * G, rows * P * G, rows * P * G * Dv, rows * n)
    buf = torch.empty(sum(sizes), device=q.device, dtype=torch.float32)
    logits, keys, pm, pl, pacc, idx = buf.split(sizes)
    idx = idx.view(torch.int32)
    out = torch.empty(B, Hq, 1, Dv, device=q.device, dtype=q.dtype)
    kc, vc = cache._k_cmp, cache._v_cmp
    scale_log2 = scale * tuning.LOG2E
    ieee = q.dtype == torch.float32
    dims = dict(G=G, BLOCK_G=tiles.block_g, BLOCK_DV=tiles.block_dv, num_warps=4)

    compressed_split_kernel[(rows, s1)](
        q, cache._k, cache._v, k, v, kc, vc, cache.lengths, logits, pm, pl, pacc,
        q.stride(0), q.stride(1), q.stride(3), *cache._k.stride(), *cache._v.stride(),
        k.stride(0), k.stride(1), k.stride(3), v.stride(0), v.stride(1), v.stride(3),
        *kc.stride(), *vc.stride(), Hkv, L, tc, P, scale_log2,
        CMP_BLOCK=l, CMP_STRIDE=d, DK=Dk, DV=Dv, BLOCK_C=tiles.block_c_split, BLOCK_DK=tiles.block_dk,
        BLOCK_L=tiles.block_l, WRITE_NEW=mean, MEAN=mean, IEEE=ieee, **dims,
    )
    block_keys_kernel[(rows, s2)](
        cache.lengths, logits, pm, pl, keys, Hkv, L, tc, ns, P, s1,
        G=G, CMP_BLOCK=l, CMP_STRIDE=d, SEL_BLOCK=ls, N_INITIAL=config.num_initial, N_LOCAL=config.num_local,
        BLOCK_G=tiles.block_g, BLOCK_S1=tiles.block_s1, BLOCK_C=block_c, BLOCK_S=tuning.pow2(step), SEL_STEP=step,
        num_warps=4,
    )
    sparse_split_kernel[(rows, n + nw)](
        q, cache._k, cache._v, cache.lengths, keys, idx, pm, pl, pacc,
        q.stride(0), q.stride(1), q.stride(3), *cache._k.stride(), *cache._v.stride(),
        Hkv, L, ns, P, s1, scale_log2,
        SEL_BLOCK=ls, N_SEL=n, WINDOW=w, DK=Dk, DV=Dv, TILE=tiles.tile, BLOCK_N=tiles.block_n,
        BLOCK_DK=tiles.block_dk, IEEE=ieee, **tuning.top_n_tiles(ns, n), **dims,
    )
    g_strides = gates.stride() if gates is not None else (0, 0, 0, 0)
    combine_kernel[(B * Hq,)](
        pm, pl, pacc, gates if gates is not None else out, out, cache.lengths,
        g_strides[0], g_strides[1], g_strides[3], out.stride(0), out.stride(1), out.stride(3),
        Hq, L, P, s1, G=G, N_SEL=n, DV=Dv, BLOCK_DV=tiles.block_dv, BLOCK_P=tiles.block_p,
        GATED=gates is not None, num_warps=4,
    )
    return out, idx.view(B, Hkv, 1, n)
