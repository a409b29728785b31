"""Input checks shared by the public entry points.

Every check runs before any kernel and raises ``TypeError`` for a wrong type and ``ValueError``
for a wrong value, naming the argument. Checks that need tensor values (index ranges) read them
from the device, so they are skipped while tracing under ``torch.compile`` or capturing a CUDA
graph, where a host sync is not allowed; shapes, dtypes and devices are always checked.

The config's own checks (``check_config``, ``resolve_config``) live beside ``NSAConfig`` in
:mod:`nsa_flex.config`, which builds on this module.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .config import NSAConfig

BACKENDS = ("flex", "triton", "reference")

# The head dims the kernels take: up to 256 (docs/semantics.md), and on CUDA at least 16,
# FlexAttention's smallest (its kernels' tiles).
MAX_HEAD_DIM = 256
FLEX_MIN_HEAD_DIM_CUDA = 16


def check_int(name: str, value, minimum: int | None = None):
    """An ``int`` (a ``bool`` is refused) of at least ``minimum``; returned.

    A symbolic int (a size while tracing under ``torch.compile``) passes unchecked: it comes
    from a tensor's shape, and comparing it would add a guard to the graph.
    """
    if isinstance(value, torch.SymInt):
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_bool(name: str, value, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool{' or None' if allow_none else ''}, got {type(value).__name__}")


def check_real(name: str, value, greater_than: float) -> float:
    """A real number (a ``bool`` is refused), finite and ``> greater_than``; returned as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (value > greater_than and math.isfinite(value)):
        raise ValueError(f"{name} must be finite and > {greater_than:g}, got {value}")
    return float(value)


def check_backend(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_block_size(block_size, name: str = "block_size") -> tuple[int, int]:
    """A BlockMask tile ``(Q tile, KV tile)``: two positive ints; returned as a tuple."""
    if not isinstance(block_size, (tuple, list)) or len(block_size) != 2:
        raise TypeError(f"{name} must be a pair of ints (Q tile, KV tile), got {block_size!r}")
    for i, size in enumerate(block_size):
        check_int(f"{name}[{i}]", size, 1)
    return tuple(block_size)


def resolve_device(device, name: str = "device") -> torch.device:
    """``device`` as a ``torch.device``: a ``torch.device``, a string such as ``"cuda:0"``, or
    a CUDA index."""
    if isinstance(device, torch.device):
        return device
    if isinstance(device, bool) or not isinstance(device, (str, int)):
        raise TypeError(f"{name} must be a torch.device, a string or an int, got {type(device).__name__}")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"{name} {device!r} is not a device torch knows") from None


def resolve_scale(scale, q: Tensor) -> float:
    if scale is None:
        return q.shape[-1] ** -0.5
    if torch.compiler.is_compiling():
        # Dynamo may pass a float as a symbolic value; it was checked when first seen eagerly
        # or comes from our own code, and math.isfinite on it would break the graph.
        return scale
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")
    return float(scale)


def check_callable(name: str, fn) -> None:
    if fn is not None and not callable(fn):
        raise TypeError(f"{name} must be callable or None, got {type(fn).__name__}")


def check_tensor(name: str, x, ndim: int | None, floating: bool = True) -> Tensor:
    """A tensor of ``ndim`` dimensions (any when ``None``), of a floating dtype if ``floating``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension{'s' * (ndim != 1)}, got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    return x


def check_index_tensor(name: str, x, ndim: int | None) -> Tensor:
    """An int32 or int64 tensor of ``ndim`` dimensions (any when ``None``)."""
    check_tensor(name, x, ndim, floating=False)
    if x.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {x.dtype}")
    return x


def check_int_tensor(name: str, x) -> Tensor:
    """A tensor of an integer dtype (any width; ``bool`` refused), of any shape."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    return x


def check_floating(name: str, x, min_dim: int = 1) -> Tensor:
    """A floating tensor of at least ``min_dim`` dimensions."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimensions, got shape {tuple(x.shape)}")
    return x


def check_index_range(name: str, x: Tensor, low: int, high: int, seq_len=None) -> None:
    """Every value of ``x`` in ``[low, high)``; ``seq_len``, when given, is named in the message
    (``high`` being its ``Ns`` selection blocks). Reads the device once; skipped while tracing
    or capturing (:func:`can_read_values`)."""
    if x.numel() == 0 or not can_read_values(x):
        return
    lo, hi = (int(v) for v in torch.aminmax(x))  # one read of the device
    if lo < low or hi >= high:
        where = "" if seq_len is None else f" for T = {seq_len} (Ns blocks)"
        raise ValueError(f"{name} must lie in [{low}, {high}){where}; found values in [{lo}, {hi}]")


def check_same_device(name: str, x: Tensor, q: Tensor, q_name: str = "q") -> None:
    if x.device != q.device:
        raise ValueError(f"{name} is on {x.device} but {q_name} is on {q.device}")


def check_same_dtype(name: str, x: Tensor, q: Tensor) -> None:
    if x.dtype != q.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}")


def check_qkv(q, k, v, longer_kv: bool = False, allow_empty: bool = False) -> None:
    """q ``(B, Hq, T, Dk)``, k ``(B, Hkv, T, Dk)``, v ``(B, Hkv, T, Dv)``, Hkv dividing Hq.

    ``longer_kv``: k and v may hold more positions than q (queries at an offset, checked by
    :func:`resolve_q_offset`); they still hold the same number. ``allow_empty``: ``T = 0`` is
    allowed (a rank's empty shard, ``nsa_flex.distributed``)."""
    check_tensor("q", q, 4)
    check_tensor("k", k, 4)
    check_tensor("v", v, 4)
    for name, x in (("k", k), ("v", v)):
        check_same_device(name, x, q)
        check_same_dtype(name, x, q)
    B, Hq, T, Dk = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[2] != v.shape[2] or (not longer_kv and k.shape[2] != T):
        raise ValueError(f"sequence lengths differ: q {T}, k {k.shape[2]}, v {v.shape[2]}")
    if T < 1 and not allow_empty:
        raise ValueError("q must hold at least one token (T >= 1)")
    if B < 1:
        raise ValueError("q must hold at least one batch row (B >= 1)")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k has {k.shape[1]} heads but v has {v.shape[1]}")
    Hkv = k.shape[1]
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"q's heads ({Hq}) must be a multiple of k's heads ({Hkv})")
    if k.shape[3] != Dk:
        raise ValueError(f"q and k must share the head dim, got Dk={Dk} and {k.shape[3]}")
    if Dk < 1 or v.shape[3] < 1:
        raise ValueError("head dims must be at least 1")


def resolve_q_offset(q_offset, num_queries: int, num_keys: int):
    """The absolute position of the first query: ``q_offset``, or ``num_keys - num_queries``
    when ``None`` (the queries are the last ones). Queries at ``q_offset .. q_offset + Tq - 1``
    must lie within the ``Tk`` keys' positions ``0 .. Tk - 1``.

    A symbolic int (``torch.compile`` made the offset dynamic) passes unchecked, as in
    :func:`check_int`."""
    if q_offset is None:
        if num_queries > num_keys:
            raise ValueError(
                f"sequence lengths differ: q {num_queries}, k {num_keys} (q may hold fewer positions than k, "
                f"queries at an offset, q_offset; never more)"
            )
        return num_keys - num_queries
    if isinstance(q_offset, torch.SymInt):
        return q_offset
    if isinstance(q_offset, bool) or not isinstance(q_offset, int):
        raise TypeError(f"q_offset must be an int or None, got {type(q_offset).__name__}")
    if q_offset < 0:
        raise ValueError(f"q_offset must be >= 0, got {q_offset}")
    if q_offset + num_queries > num_keys:
        raise ValueError(
            f"q_offset + Tq must be <= Tk: queries at {q_offset} .. {q_offset + num_queries - 1} but k and v "
            f"hold positions 0 .. {num_keys - 1}"
        )
    return q_offset


def check_kernel_head_dims(q: Tensor, v: Tensor, backend: str) -> None:
    """The kernels take head dims from ``FLEX_MIN_HEAD_DIM_CUDA`` (on CUDA) to ``MAX_HEAD_DIM``."""
    Dk, Dv = q.shape[-1], v.shape[-1]
    if max(Dk, Dv) > MAX_HEAD_DIM:
        raise ValueError(f"the {backend} backend takes head dims up to {MAX_HEAD_DIM}; got Dk={Dk}, Dv={Dv}")
    if q.is_cuda and min(Dk, Dv) < FLEX_MIN_HEAD_DIM_CUDA:
        raise ValueError(
            f"the {backend} backend on CUDA needs head dims of at least {FLEX_MIN_HEAD_DIM_CUDA} (FlexAttention's "
            f"kernels); got Dk={Dk}, Dv={Dv}"
        )


def check_qk_cmp(
    q, k_cmp, config: NSAConfig, name: str = "k_cmp", head_dim: int | None = None, num_blocks: int | None = None,
    seq_len: int | None = None,
) -> None:
    """``k_cmp``/``v_cmp``: ``(B, Hkv, Tc, D)`` with ``Tc = config.num_compressed(T)``, or
    ``num_blocks`` when given (a packed row: the documents' blocks together). ``seq_len``: the
    keys' length ``T`` when it is not ``q``'s (queries at an offset)."""
    check_tensor("q", q, 4)
    check_tensor(name, k_cmp, 4)
    check_same_device(name, k_cmp, q)
    check_same_dtype(name, k_cmp, q)
    B, Hq, T, Dk = q.shape
    T = T if seq_len is None else seq_len
    if k_cmp.shape[0] != B:
        raise ValueError(f"{name} has batch {k_cmp.shape[0]} but q has {B}")
    Hkv = k_cmp.shape[1]
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"q's heads ({Hq}) must be a multiple of {name}'s heads ({Hkv})")
    if num_blocks is not None:
        if k_cmp.shape[2] != num_blocks:
            raise ValueError(
                f"{name} must hold Tc = {num_blocks} compressed blocks, each document's of cu_seqlens "
                f"concatenated, got {k_cmp.shape[2]}"
            )
    tc = config.num_compressed(T) if num_blocks is None else num_blocks
    if k_cmp.shape[2] != tc:
        raise ValueError(
            f"{name} must hold Tc = {tc} compressed blocks for T = {T} "
            f"(compress_block={config.compress_block}, compress_stride={config.compress_stride}), "
            f"got {k_cmp.shape[2]}"
        )
    expected = Dk if head_dim is None else head_dim
    if k_cmp.shape[3] != expected:
        raise ValueError(f"{name} must have head dim {expected}, got {k_cmp.shape[3]}")


def check_gates(gates, q: Tensor) -> None:
    check_tensor("gates", gates, 4)
    check_same_device("gates", gates, q)
    B, Hq, T, _ = q.shape
    if tuple(gates.shape) != (B, Hq, T, 3):
        raise ValueError(f"gates must have shape (B, Hq, T, 3) = {(B, Hq, T, 3)}, got {tuple(gates.shape)}")


def can_read_values(x: Tensor) -> bool:
    """Whether ``x``'s values may be read on the host now: not while compiling or capturing."""
    if torch.compiler.is_compiling():
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def check_block_indices(
    block_indices, q: Tensor, num_kv_heads: int, num_blocks: int, num_selected: int | None = None
) -> None:
    """``(B, Hkv, T, n)`` integers in ``[-1, num_blocks)``; ``n`` is ``num_selected`` if given."""
    check_index_tensor("block_indices", block_indices, 4)
    check_same_device("block_indices", block_indices, q)
    B, _, T, _ = q.shape
    n = block_indices.shape[-1] if num_selected is None else num_selected
    expected = (B, num_kv_heads, T, n)
    if tuple(block_indices.shape) != expected or n < 1:
        raise ValueError(f"block_indices must have shape (B, Hkv, T, n) = {expected}, got {tuple(block_indices.shape)}")
    check_index_range("block_indices", block_indices, -1, num_blocks, seq_len=T)
