"""Length bucketing: run attention at a few fixed lengths, so that a compiled model sees few shapes.

A sequence of ``T`` tokens is padded at its end, with zeros, to its *bucket*: the smallest
bucket length ``>= T``. Every NSA branch is causal (a compressed block is visible only once its
last token is, selection ranks only blocks at or before the query, the window ends at the
query), so the appended tokens change no output at a position ``< T``, and outputs sliced back
to ``T`` get no gradient from them.

Under ``torch.compile`` with a symbolic ``T`` (``dynamic=True``, or Dynamo's automatic dynamic
shapes from the second length on), :func:`bucket_length` compares ``T`` with the bucket bounds
in Python: each comparison becomes a guard (``128 < T``, ``T <= 256``), and the padded length is
a plain int. The attention inside then sees static shapes, and the model compiles once per
bucket rather than once per length.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from ._validation import check_int
from .varlen import Documents, check_documents, documents

__all__ = ["check_length_buckets", "bucket_length", "pad_documents"]

def check_length_buckets(value, name: str = "length_buckets") -> str | tuple[int, ...] | None:
    """``length_buckets`` checked and normalised: ``None``, ``"pow2"``, or a tuple of
    increasing positive ints (a list or other sequence of ints is accepted and made a tuple).

    Raises:
        TypeError: not ``None``, a string, or a sequence of ints (bools are not ints here).
        ValueError: another string than ``"pow2"``, an empty sequence, an entry ``< 1``, or
            entries not strictly increasing.
    """
    if value is None:
        return None
    if isinstance(value, str):
        if value != "pow2":
            raise ValueError(f"{name} must be None, 'pow2' or a tuple of lengths, got {value!r}")
        return value
    if isinstance(value, Tensor) or not isinstance(value, (tuple, list, range)):
        raise TypeError(
            f"{name} must be None, 'pow2' or a tuple of ints, got {type(value).__name__}"
        )
    buckets = tuple(value)
    if not buckets:
        raise ValueError(f"{name} must hold at least one length, got an empty sequence")
    for b in buckets:
        if isinstance(b, bool) or not isinstance(b, int):
            raise TypeError(f"{name} must hold ints, got {type(b).__name__} ({b!r})")
        if b < 1:
            raise ValueError(f"{name} must hold positive lengths, got {b}")
    for a, b in zip(buckets, buckets[1:]):
        if b <= a:
            raise ValueError(f"{name} must be strictly increasing, got {a} then {b}")
    return buckets


def bucket_length(seq_len, buckets: str | tuple[int, ...]) -> int:
    """The bucket of a sequence of ``seq_len`` tokens: the smallest bucket length ``>= seq_len``.

    Args:
        seq_len: ``T >= 1``, an int or, while tracing, a symbolic int: every comparison made
            here then becomes a guard of the compiled graph, and the result is a plain int.
        buckets: ``"pow2"`` (the smallest power of two ``>= T``) or an increasing tuple.

    Raises:
        ValueError: ``T`` is above the largest bucket of a tuple (naming ``length_buckets``).
        TypeError, ValueError: ``seq_len`` not an int ``>= 1``; ``buckets`` not ``"pow2"`` or a
            strictly increasing sequence of positive ints (:func:`check_length_buckets`).
    """
    check_int("seq_len", seq_len, minimum=1)
    if buckets is None:
        raise TypeError("buckets must be 'pow2' or a tuple of lengths, got None")
    buckets = check_length_buckets(buckets, "buckets")
    if buckets == "pow2":
        b = 1
        while b < seq_len:
            b *= 2
        return b
    for b in buckets:
        if seq_len <= b:
            return b
    raise ValueError(
        f"sequence length {seq_len} is above the largest of length_buckets ({buckets[-1]}); "
        "add a larger bucket, or use length_buckets='pow2'"
    )


def pad_documents(docs: Documents, padded_len: int) -> Documents:
    """``docs`` with the tokens ``docs.seq_len .. padded_len - 1`` as one more document (none
    when there are no such tokens), so that the padding is attended apart from every real
    document and the real ones are unchanged.

    Raises:
        TypeError: ``docs`` not a :class:`~nsa_flex.varlen.Documents`, ``padded_len`` not an int.
        ValueError: ``padded_len`` shorter than ``docs.seq_len``.
    """
    check_documents(docs)
    check_int("padded_len", padded_len)
    pad = padded_len - docs.seq_len
    if pad < 0:
        raise ValueError(f"padded_len ({padded_len}) is shorter than the packed row ({docs.seq_len})")
    if pad == 0:
        return docs
    bounds = tuple(itertools.accumulate((*docs.lengths, pad), initial=0))
    return documents(torch.tensor(bounds, dtype=torch.int64), device=docs.device)
