"""The KV cache of one NSA layer for inference: :class:`NSACache`, and its storage helpers.

:class:`NSACache` holds, per batch row, the raw keys and values of every token so far, the
compressed keys and values of every complete compressed block, and the row's length. The tail
of tokens not yet compressed is the raw K/V after the last complete block: a compressed block is
computed the moment its last token arrives, from the raw K/V (:func:`compress_new_blocks`), so
the tail needs no buffer of its own. Everything is allocated once, for ``max_len`` tokens;
nothing grows by concatenation.

Batch rows may hold different lengths (``cache.lengths``, a ``(B,)`` tensor): each row's tokens
sit at positions ``0 .. lengths[b] - 1``; :mod:`.prefill` fills them from right-padded prompts,
:mod:`.decode` appends to them.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .._validation import can_read_values, check_int, check_int_tensor
from ..compression import mean_compress
from ..config import NSAConfig, resolve_config

__all__ = ["NSACache"]


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

    Raises:
        TypeError, ValueError: naming the argument: a size that is not an int (`TypeError`) or
            below 1 (`ValueError`), a `config` that is not an `NSAConfig`, a `dtype` that is
            not a floating `torch.dtype`.

    Attributes:
        k, v: ``(B, Hkv, L, Dk)`` / ``(B, Hkv, L, Dv)``: token ``s`` of row ``b`` at
            ``[b, :, s]`` for ``s < lengths[b]`` (keys as given, i.e. already rotated by RoPE).
        k_cmp, v_cmp: ``(B, Hkv, Lc, Dk)`` / ``(B, Hkv, Lc, Dv)``, ``Lc =
            config.num_compressed(L)``: compressed block ``i`` (tokens ``i*d .. i*d + l - 1``)
            for ``i*d + l - 1 < lengths[b]``. In ``dtype``, as the compression returns them and
            as ``attend`` takes them (selection widens the scores it computes from them).
        lengths: ``(B,)`` int64 on ``device``, tokens held per row.

    `k`, `v`, `k_cmp`, `v_cmp` are views of the storage; `batch_size`, `kv_heads`,
    `dim_head`, `dim_head_v`, `dtype`, `device` and `max_len` its sizes. What lies past a row's length is never read as visible, so rolling a row back (rejected
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
        # The fused decode step's arrival counts (kernels.decode_batch): zero between steps.
        self._arrivals = _arrival_counts(B, H, device)
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
        new._arrivals = _arrival_counts(self.batch_size, self.kv_heads, self.device)
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


def _arrival_counts(B: int, H: int, device: torch.device) -> Tensor:
    """Zeros for the fused decode step's counts of finished programs (``kernels.decode_batch``):
    per row for its keys and for its selected blocks, per batch entry. Each step's last
    arrivals reset them."""
    return torch.zeros(2 * B * H + B, device=device, dtype=torch.int32)


# --------------------------------------------------------------------------- checks


def check_cache(cache) -> None:
    if not isinstance(cache, NSACache):
        raise TypeError(f"cache must be an NSACache, got {type(cache).__name__}")


def check_against_cache(cache: NSACache, q: Tensor, k: Tensor, v: Tensor) -> None:
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


def compressor_or_mean(fn, config: NSAConfig) -> Callable[[Tensor], Tensor]:
    """``fn``, or the block mean when ``None``."""
    return (lambda x: mean_compress(x, config)) if fn is None else fn


def call_compressor(name: str, fn, x: Tensor, blocks: int) -> Tensor:
    """``fn(x)`` for ``x (B, H, S, D)``, checked to be ``(B, H, blocks, D)``."""
    out = fn(x)
    expected = (*x.shape[:2], blocks, x.shape[-1])
    if not isinstance(out, Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"{name} must map (B, H, S, D) to (B, H, num_compressed(S), D) = {expected}, got {got}")
    return out


# ------------------------------------------------------------------------- storage


def gather_rows(store: Tensor, idx: Tensor) -> Tensor:
    """``store (B, H, S, D)`` gathered at per-(row, head) slots ``idx (B, H, ...)`` -> ``(B, H, ..., D)``.

    ``index_select`` on a flat view reads each index once, where ``gather`` would need it
    expanded over ``D``.
    """
    B, H, S, D = store.shape
    base = (torch.arange(B * H, device=store.device) * S).view(B, H, *([1] * (idx.dim() - 2)))
    flat = (idx + base).reshape(-1)
    return store.reshape(B * H * S, D).index_select(0, flat).view(*idx.shape, D)


def write_rows(store: Tensor, slots: Tensor, x: Tensor) -> None:
    """``store[b, :, slots[b, i]] = x[b, :, i]``; ``slots (B, m)``, ``x (B, H, m, D)``."""
    B, H, m, D = x.shape
    store.scatter_(2, slots[:, None, :, None].expand(B, H, m, D), x.to(store.dtype))


def compress_new_blocks(cache, start, m, compress_k, compress_v) -> None:
    """Compress the blocks completed by tokens ``start[b] .. start[b] + m - 1``: block ``i`` ends
    at token ``i*d + l - 1``, so at most ``ceil(m / d)`` of them, from the first not yet visible
    at ``start - 1``."""
    config, L = cache.config, cache.max_len
    l, d = config.compress_block, config.compress_stride
    tc = config.num_compressed(L)
    if tc == 0:
        return
    nb = (m - 1) // d + 1
    first = config.num_visible_compressed(start - 1)  # (B,)
    block = first[:, None] + torch.arange(nb, device=start.device)  # (B, nb)
    done = (config.compressed_last_token(block) <= start[:, None] + m - 1) & (block < tc)
    # The tokens of blocks first .. first + nb - 1, read past the end only for blocks not done.
    span = (first[:, None] * d + torch.arange((nb - 1) * d + l, device=start.device)).clamp(max=L - 1)
    H = cache.kv_heads
    span = span[:, None].expand(-1, H, -1)
    kc = call_compressor("compress_k", compress_k, gather_rows(cache._k, span), nb)
    vc = call_compressor("compress_v", compress_v, gather_rows(cache._v, span), nb)
    slots = torch.where(done, block, tc)  # not done: the spare slot
    write_rows(cache._k_cmp, slots, kc)
    write_rows(cache._v_cmp, slots, vc)
