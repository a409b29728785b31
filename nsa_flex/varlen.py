"""Packed variable-length batches: several documents in one row, FlashAttention's ``cu_seqlens``.

A packed row of ``T`` tokens holds ``N`` documents; document ``n`` is tokens
``cu_seqlens[n] .. cu_seqlens[n+1] - 1``. NSA then runs on each document as if it were alone
(docs/varlen.md): every block (compressed or selection) lies inside one document, block indices
and visibility count from the document's first token, and no query sees another document.

:func:`documents` reads ``cu_seqlens`` once on the host (the number of compressed blocks, and
so the shape of ``k_cmp``, depends on the lengths) and returns a :class:`Documents` that
every varlen entry point also accepts in place of ``cu_seqlens``, so a model can pay for that
read once per batch rather than once per layer.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import torch
from torch import Tensor

from ._validation import can_read_values, check_int, resolve_device
from .config import NSAConfig, check_config, num_select_blocks

__all__ = ["Documents", "documents", "compressed_cu_seqlens"]

_T = TypeVar("_T")


@dataclass(frozen=True, eq=False)
class Documents:
    """The documents of one packed row, made by :func:`documents`.

    Attributes:
        lengths: each document's length, on the host (empty documents allowed).
        doc_id: ``(T,)`` int32, the document of each token.
        pos: ``(T,)`` int32, each token's position within its document.
        start: ``(T,)`` int32, the packed position of each token's document start (``t - pos``).

    What the branches derive from the documents (block tables, the varlen BlockMasks without a
    ``mask_mod``) is built on first use and kept with them (:meth:`memo`), so every layer that
    is given the same ``Documents`` shares it: make one per batch.
    """

    lengths: tuple[int, ...]
    doc_id: Tensor
    pos: Tensor
    start: Tensor
    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.lengths, tuple) or not self.lengths:
            raise TypeError(f"Documents.lengths must be a non-empty tuple of ints, got {self.lengths!r}")
        for n in self.lengths:
            check_int("Documents.lengths", n, minimum=0)
        T = sum(self.lengths)
        for name in ("doc_id", "pos", "start"):
            x = getattr(self, name)
            if not isinstance(x, Tensor) or x.dtype != torch.int32:
                raise TypeError(f"Documents.{name} must be an int32 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
            if tuple(x.shape) != (T,):
                raise ValueError(f"Documents.{name} must have shape (T,) = ({T},), got {tuple(x.shape)}")
            if x.device != self.doc_id.device:
                raise ValueError(f"Documents.{name} is on {x.device} but doc_id is on {self.doc_id.device}")

    def memo(self, key, build: Callable[[], _T]) -> _T:
        """``build()``, computed once per ``key`` for these documents and then kept with them:
        the tables and BlockMasks that every layer of a batch derives from the same documents
        (each takes a few small kernels and host-to-device copies). Eager only: under
        ``torch.compile`` it builds every time, inside the graph. What is built under
        ``torch.inference_mode`` is kept apart (inference tensors cannot serve autograd)."""
        if torch.compiler.is_compiling():
            return build()
        key = (key, torch.is_inference_mode_enabled())
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    @property
    def seq_len(self) -> int:
        """``T``, the packed length."""
        return sum(self.lengths)

    @property
    def starts(self) -> tuple[int, ...]:
        """Each document's first packed position (``cu_seqlens[:-1]``)."""
        return tuple(itertools.accumulate(self.lengths, initial=0))[:-1]

    @property
    def device(self) -> torch.device:
        return self.doc_id.device

    def num_compressed(self, config: NSAConfig) -> int:
        """``Tc``: compressed blocks of all documents together (the length of ``k_cmp``)."""
        check_config(config)
        return sum(config.num_compressed(n) for n in self.lengths)

    def compressed_offsets(self, config: NSAConfig) -> tuple[int, ...]:
        """``(N+1,)``: document ``n``'s compressed blocks are ``k_cmp[:, :, off[n]:off[n+1]]``."""
        check_config(config)
        return tuple(itertools.accumulate((config.num_compressed(n) for n in self.lengths), initial=0))

    def num_select_blocks(self, config: NSAConfig) -> int:
        """Selection blocks of the longest document: doc-local block indices lie below it."""
        check_config(config)
        return max([config.num_select_blocks(n) for n in self.lengths])  # lengths is never empty

    def scoring_tables(self, config: NSAConfig) -> tuple[Tensor, Tensor, Tensor]:
        """``(doc_id (T,), cu (N+1,), cmp_cu (N+1,))`` int32 on the documents' device, what the
        scoring kernels read: each token's document, the documents' token offsets
        (``cu_seqlens``) and their compressed blocks' offsets in ``k_cmp``
        (:meth:`compressed_offsets`)."""
        check_config(config)

        def build():
            cu = (0, *itertools.accumulate(self.lengths))
            both = torch.tensor([cu, self.compressed_offsets(config)], dtype=torch.int32, device=self.device)
            return self.doc_id, both[0], both[1]

        return self.memo(("scoring_tables", config), build)

    def compressed_blocks(self, config: NSAConfig) -> tuple[Tensor, Tensor]:
        """``(first, doc)``, each ``(Tc,)`` int64: the packed position of each compressed block's
        first token and its document, in ``k_cmp``'s order."""
        start, local, doc = self._compressed_block_index(config)
        return start + local * config.compress_stride, doc

    def compressed_last_tokens(self, config: NSAConfig, num_blocks: int | None = None) -> Tensor:
        """``(Tc,)`` int32: the packed position of each compressed block's last token, where it
        becomes visible and where a user's mods see it, in ``k_cmp``'s order; padded to
        ``num_blocks`` (``>= Tc``) with ``T - 1``, a valid position."""
        start, local, _ = self._compressed_block_index(config)
        last = (start + config.compressed_last_token(local)).to(torch.int32)
        if num_blocks is not None and num_blocks != last.numel():
            last = torch.nn.functional.pad(last, (0, num_blocks - last.numel()), value=self.seq_len - 1)
        return last

    def _compressed_block_index(self, config: NSAConfig) -> tuple[Tensor, Tensor, Tensor]:
        """Each compressed block's document start, doc-local index and document, ``(Tc,)`` int64
        on the documents' device.

        Built there from the host lengths with a handful of small kernels and no host sync: the
        same steps on host tensors took 30-100 ms per call, torch's CPU thread pool waking for
        each tiny op on a busy machine (``repeat_interleave`` of 8 counts took 30-50 ms on two
        loaded cores, 0.03 ms in one thread)."""
        check_config(config)
        counts = [config.num_compressed(n) for n in self.lengths]
        return self.memo(("compressed_blocks", tuple(counts)), lambda: self._blocks_of_documents(counts))

    def _blocks_of_documents(self, counts: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        """For ``counts[i]`` blocks of document ``i``, numbered one after another: each block's
        document start, doc-local index and document, ``(sum(counts),)`` int64 on the device."""
        dev = self.device
        total = sum(counts)
        doc = torch.repeat_interleave(torch.arange(len(counts), device=dev),
                                      torch.tensor(counts, dtype=torch.int64, device=dev), output_size=total)
        first_of_doc = torch.tensor(list(itertools.accumulate(counts, initial=0))[:-1], dtype=torch.int64, device=dev)
        local = torch.arange(total, device=dev) - first_of_doc[doc]
        starts = torch.tensor(self.starts, dtype=torch.int64, device=dev)
        return starts[doc], local, doc

    def selection_blocks(self, select_block: int) -> tuple[Tensor, Tensor, Tensor]:
        """Every document's selection blocks, numbered one after another across documents.

        Returns:
            ``(first_block, block_start, block_end)``: ``first_block (T,)`` int64, the number of
            the first block of each token's document (so doc-local block ``j`` of token ``t`` is
            ``first_block[t] + j``); ``block_start``, ``block_end`` ``(Nb,)`` int32, the packed
            tokens ``[start, end)`` block ``b`` may cover (``end`` is its document's end). All
            on the documents' device, built there (see :meth:`_compressed_block_index`).
        """
        check_int("select_block", select_block, 1)
        return self.memo(("selection_blocks", select_block), lambda: self._selection_blocks(select_block))

    def _selection_blocks(self, ls: int) -> tuple[Tensor, Tensor, Tensor]:
        counts = [num_select_blocks(n, ls) for n in self.lengths]
        start, local, doc = self._blocks_of_documents(counts)
        dev = self.device
        ends = torch.tensor([a + n for a, n in zip(self.starts, self.lengths)], dtype=torch.int64, device=dev)
        first_of_doc = torch.tensor(list(itertools.accumulate(counts, initial=0))[:-1], dtype=torch.int64, device=dev)
        first_block = first_of_doc[self.doc_id.long()]
        return first_block, (start + local * ls).to(torch.int32), ends[doc].to(torch.int32)


def documents(cu_seqlens, *, device=None) -> Documents:
    """Read ``cu_seqlens`` into a :class:`Documents`.

    Args:
        cu_seqlens: ``(N+1,)`` int32 or int64 tensor (FlashAttention's convention): starts at 0,
            never decreases (empty documents are allowed), and ends at the packed length ``T``.
            On any device; it is read on the host once (a CPU tensor avoids a device sync).
        device: where the per-token tensors go (default: ``cu_seqlens``' device).

    Raises:
        TypeError: not a tensor, or not int32/int64; a ``device`` of another type.
        ValueError: not 1-D with at least 2 entries, not starting at 0, decreasing; a
            ``device`` string torch does not know.
    """
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with N+1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    bounds = [int(x) for x in cu_seqlens.tolist()]  # the one host read
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}")
    lengths = tuple(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    if min(lengths) < 0:
        n = next(i for i, x in enumerate(lengths) if x < 0)
        raise ValueError(f"cu_seqlens must not decrease, got {bounds[n]} then {bounds[n + 1]} at entry {n + 1}")
    device = cu_seqlens.device if device is None else resolve_device(device)
    T = bounds[-1]
    counts = torch.tensor(lengths, dtype=torch.int64, device=device)
    doc_id = torch.repeat_interleave(torch.arange(len(lengths), device=device), counts, output_size=T)
    start = torch.tensor(bounds[:-1], dtype=torch.int64, device=device)[doc_id]
    pos = torch.arange(T, device=device) - start
    return Documents(lengths, doc_id.to(torch.int32), pos.to(torch.int32), start.to(torch.int32))


def check_documents(docs, name: str = "docs") -> Documents:
    """``docs`` itself: a :class:`Documents` (``TypeError`` otherwise; make one with
    :func:`documents`)."""
    if not isinstance(docs, Documents):
        raise TypeError(f"{name} must be an nsa_flex.varlen.Documents (from documents(cu_seqlens)), got {type(docs).__name__}")
    return docs


def resolve(cu_seqlens, seq_len: int, device: torch.device, batch: int = 1) -> Documents:
    """``cu_seqlens`` (a tensor or :class:`Documents`) for a packed row of ``seq_len`` tokens on
    ``device``, checked: one batch row, ending at ``seq_len``."""
    check_int("seq_len", seq_len, minimum=0)
    check_int("batch", batch)
    device = resolve_device(device)
    if batch != 1:
        raise ValueError(f"cu_seqlens needs a batch of one packed row (B = 1), got B = {batch}")
    if isinstance(cu_seqlens, Documents):
        docs = cu_seqlens
        if docs.device != device:
            raise ValueError(f"cu_seqlens (Documents) is on {docs.device} but q is on {device}")
    else:
        docs = documents(cu_seqlens, device=device)
    if docs.seq_len != seq_len:
        raise ValueError(f"cu_seqlens must end at the packed length T = {seq_len}, got {docs.seq_len}")
    return docs


def check_block_indices(block_indices: Tensor, docs: Documents, select_block: int, q_offset: int = 0) -> None:
    """Doc-local ``block_indices (B, Hkv, T, n)`` (shape already checked): each below its
    token's document's number of selection blocks (``q_offset``: the rows are the tokens
    ``q_offset ..`` of the packed row). Reads the device (skipped while tracing or capturing a
    CUDA graph)."""
    if not can_read_values(block_indices):
        return
    doc_id = docs.doc_id[q_offset : q_offset + block_indices.shape[2]].long()
    ns = torch.tensor([num_select_blocks(n, select_block) for n in docs.lengths], device=docs.device)[doc_id]
    bad = block_indices >= ns.view(1, 1, -1, 1).to(block_indices.dtype)
    if bool(bad.any()):
        r = int(bad.nonzero()[0, 2])
        t = q_offset + r
        raise ValueError(
            f"block_indices are doc-local under cu_seqlens: token {t} lies in a document of "
            f"{docs.lengths[int(docs.doc_id[t])]} tokens, so its blocks must lie in [-1, {int(ns[r])}), "
            f"got {int(block_indices[..., r, :].max())}"
        )


def compressed_cu_seqlens(cu_seqlens, config: NSAConfig) -> Tensor:
    """``(N+1,)`` offsets of each document's compressed blocks in ``k_cmp``/``v_cmp``, the
    compressed twin of ``cu_seqlens`` (on the host, int64)."""
    check_config(config)
    docs = cu_seqlens if isinstance(cu_seqlens, Documents) else documents(cu_seqlens, device="cpu")
    return torch.tensor(docs.compressed_offsets(config), dtype=torch.int64)


def shift_score_mod(score_mod, offset: int):
    """A ``score_mod`` written for packed positions, called with positions of a document
    starting at ``offset``."""
    if score_mod is None or offset == 0:
        return score_mod
    return lambda score, b, h, q_idx, kv_idx: score_mod(score, b, h, q_idx + offset, kv_idx + offset)


def shift_mask_mod(mask_mod, offset: int):
    """Like :func:`shift_score_mod`, for a ``mask_mod``."""
    if mask_mod is None or offset == 0:
        return mask_mod
    return lambda b, h, q_idx, kv_idx: mask_mod(b, h, q_idx + offset, kv_idx + offset)
