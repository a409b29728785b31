"""The selected branch's Triton kernels as custom operators, with their launch code.

Read top-down, as fla's ``ops/nsa/parallel.py``: what a packed row tells the kernels
(:class:`PackedRow`), the selection inverted for the dK/dV pass, the launchers
(:func:`launch_selected_forward`, :func:`launch_selected_backward`, :func:`launch_dkdv`), then
each operator with its named fake and its autograd:

- ``nsa_flex::selected_attention`` (:func:`selected_attention_op`): the forward kernel,
  ``(o, lse)``; differentiable (``o`` only) through ``selected_attention_backward``. The triton
  backend's selected branch, and the flex backend's in compiled CUDA graphs.
- ``nsa_flex::selected_attention_backward`` (:func:`selected_attention_backward_op`): the dQ
  and dK/dV kernels, from the forward's output and log-sum-exp (whichever kernel made them).
  Not differentiable itself.
- ``nsa_flex::attach_selected_backward`` (:func:`attach_selected_backward_op`): the flex
  backend's selected branch in eager CUDA training: takes a FlexAttention forward's output
  (folded rows) and log-sum-exp, computed outside autograd, returns the output unfolded, and
  differentiates it in ``q, k, v`` with the Triton backward.

The forward and dQ kernels run one program per (query position, batch row, KV head), the G
query heads of the group as the rows of every tile. The dK/dV pass inverts the selection with a
sort (for each block, the queries that selected it) and gathers over those lists, several
queries a step; a list longer than one segment (block 0 is in every query's list) is cut, its
later segments summed into a float32 scratch by one kernel and added in order by the kernel
that owns the block's keys (:func:`launch_dkdv`). Every key has one writer and every sum a
fixed order, so the gradients are deterministic without atomics. Nothing here reads device
values on the host, so forward and backward can be captured in a CUDA graph. The kernels are
``nsa_flex.kernels.selected``, imported when a launch first runs.
"""

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import tuning
from .._layout import unfold_rows
from .._validation import check_index_range, check_index_tensor, check_int
from ..config import num_select_blocks

__all__ = [
    "PackedRow",
    "invert_selection",
    "launch_selected_forward",
    "launch_selected_backward",
    "launch_dkdv",
    "selected_attention_op",
    "selected_attention_backward_op",
    "attach_selected_backward_op",
]


class PackedRow(NamedTuple):
    """What the kernels need to know of a packed row's documents."""

    doc_start: Tensor  # (T,) int32: each token's document start
    first_block: Tensor  # (T,) int64: number of the first block of each token's document
    block_start: Tensor  # (Nb,) int32: first key of each block, all documents' blocks in a row
    block_end: Tensor  # (Nb,) int32: end of each block's document
    num_blocks: int  # Nb

    @classmethod
    def from_documents(cls, docs, select_block: int) -> "PackedRow":
        """The row of a :class:`~nsa_flex.varlen.Documents`, for ``select_block``-token blocks."""
        T = docs.seq_len
        first_block, block_start, block_end = docs.selection_blocks(select_block)
        return cls(docs.start.contiguous(), first_block.view(1, 1, T, 1), block_start, block_end, block_start.numel())

    @classmethod
    def from_op_args(cls, doc_start, first_block, block_start, block_end) -> "PackedRow | None":
        """The row from an operator's four tensor arguments (``None`` when not packed)."""
        if doc_start is None:
            return None
        return cls(doc_start, first_block, block_start, block_end, block_start.numel())

    def op_args(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The four tensors an operator takes."""
        return self.doc_start, self.first_block, self.block_start, self.block_end

def _strides(x: Tensor) -> tuple[int, ...]:
    return tuple(x.stride())


def invert_selection(idx: Tensor, num_blocks: int) -> tuple[Tensor, Tensor]:
    """For each block, the queries that selected it.

    Args:
        idx: ``(B, Hkv, T, n)`` int, each row ascending and unique with ``-1`` last.

    Returns:
        ``(qlist (B, Hkv, T*n) int32, qstart (B, Hkv, Ns+1) int32)``: the queries that selected
        block ``j`` are ``qlist[b, h, qstart[b, h, j] : qstart[b, h, j+1]]``, ascending.

    Raises:
        TypeError, ValueError: ``idx`` not a 4-D int32/int64 tensor with values in
            ``[-1, num_blocks)`` (a device read, skipped while tracing or capturing);
            ``num_blocks`` not an int ``>= 0``.
    """
    check_index_tensor("idx", idx, 4)
    check_int("num_blocks", num_blocks, minimum=0)
    check_index_range("idx", idx, -1, num_blocks)
    return _invert_selection(idx, num_blocks)


def _invert_selection(idx: Tensor, num_blocks: int) -> tuple[Tensor, Tensor]:
    """:func:`invert_selection` after validation (the backward's: its selection was checked
    before the forward)."""
    B, H, T, n = idx.shape
    valid = idx >= 0
    t = torch.arange(T, device=idx.device).view(1, 1, T, 1)
    block = torch.where(valid, idx.long(), num_blocks)
    key = (block * T + t).view(B, H, T * n)  # padding sorts after every real block
    qlist = (torch.sort(key, dim=-1).values % T).to(torch.int32)
    counts = torch.zeros(B, H, num_blocks + 1, dtype=torch.int64, device=idx.device)
    counts.scatter_add_(-1, block.view(B, H, T * n), torch.ones_like(key))
    qstart = torch.zeros_like(counts)
    qstart[..., 1:] = torch.cumsum(counts[..., :num_blocks], dim=-1)
    return qlist.contiguous(), qstart.to(torch.int32).contiguous()


# ------------------------------------------------------------------------ launches


def launch_selected_forward(q, k, v, idx, select_block: int, scale: float, packed=None,
                            q_offset: int = 0) -> tuple[Tensor, Tensor]:
    """``(o (B, Hq, T, Dv), lse (B, Hq, T) float32)`` of the forward kernel; ``q, k, v``
    contiguous, ``idx`` as :func:`~nsa_flex.block_indices.kernel_indices` makes it, ``packed``
    a :class:`PackedRow` for a packed row; ``q_offset``: ``q``'s rows are the positions
    ``q_offset ..`` (``k``, ``v`` hold ``0 ..``). Autograd and ``torch.compile`` reach it through
    ``nsa_flex::selected_attention`` (:func:`selected_attention_op`)."""
    from ..kernels.selected import selected_fwd_kernel

    B, Hq, T, Dk = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    meta = tuning.selected_kernel_meta(Hq // Hkv, Dk, Dv, select_block, q.dtype)
    o = torch.empty(B, Hq, T, Dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)
    doc_start = idx if packed is None else packed.doc_start  # idx: a placeholder, never read
    selected_fwd_kernel[(T, B * Hkv)](
        q, k, v, idx, doc_start, o, lse,
        *_strides(q), *_strides(k), *_strides(v), *_strides(idx), *_strides(o), *_strides(lse),
        T, Hkv, scale, q_offset, N_SEL=idx.shape[-1], VARLEN=packed is not None, **meta,
    )
    return o, lse


def launch_selected_backward(q, k, v, idx, o, lse, do, select_block: int, scale: float, packed=None,
                             q_offset: int = 0):
    """``(dq, dk, dv)`` of selected attention from the forward's output ``o (B, Hq, T, Dv)`` and
    natural log-sum-exp ``lse (B, Hq, T)`` float32 (``-inf`` for empty rows), whichever kernel
    produced them. ``idx`` as the forward kernel takes it: ascending, unique, ``-1`` last.
    ``dq, dk, dv`` take the strides of ``q, k, v``. Autograd and ``torch.compile`` reach it
    through ``nsa_flex::selected_attention_backward`` (:func:`selected_attention_backward_op`)."""
    from ..kernels.selected import selected_dq_kernel

    B, Hq, T, Dk = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    meta = tuning.selected_kernel_meta(Hq // Hkv, Dk, Dv, select_block, q.dtype, "dq")
    do = do.to(q.dtype).contiguous()
    # the kernels read lse and delta at the same offsets: both contiguous (B, Hq, T)
    lse = lse.float().contiguous()
    delta = torch.empty_like(lse)  # rowsum(dO * O), written by the dQ kernel
    dq = torch.empty_like(q)
    selected_dq_kernel[(T, B * Hkv)](
        q, k, v, idx, idx if packed is None else packed.doc_start, do, o, lse, delta, dq,
        *_strides(q), *_strides(k), *_strides(v), *_strides(idx), *_strides(do), *_strides(o), *_strides(lse),
        T, Hkv, scale, q_offset, N_SEL=idx.shape[-1], VARLEN=packed is not None, **meta,
    )
    qlist, qstart = _inverted(idx, select_block, k.shape[2], packed)
    dk, dv = launch_dkdv(q, k, v, do, lse, delta, qlist, qstart, select_block, scale, packed, q_offset=q_offset)
    return dq, dk, dv


def _inverted(idx: Tensor, select_block: int, T: int, packed=None) -> tuple[Tensor, Tensor]:
    """``invert_selection`` over the blocks the dK/dV kernels number: ``ceil(T / select_block)``,
    or, packed, every document's blocks one after another (so each key has one owner)."""
    if packed is None:
        return _invert_selection(idx, num_select_blocks(T, select_block))
    return _invert_selection(torch.where(idx >= 0, idx + packed.first_block, -1), packed.num_blocks)


def _segments(qstart: Tensor, list_len: int, segment: int) -> tuple[Tensor, Tensor]:
    """Scratch slots of the lists' later segments, built on the device without a sync.

    Block ``j`` with ``c`` queries has ``ceil(c / segment)`` segments, the first summed by
    ``selected_dkdv_kernel``, the ``(c - 1) // segment`` others one slot each. Their number is
    at most ``list_len // segment`` per (batch row, head), a bound known on the host.

    Returns:
        ``(slots (B, H, Ns+1) int32, slot_block (B, H, list_len // segment) int32)``: block
        ``j``'s slots are ``slots[b, h, j] .. slots[b, h, j+1] - 1``; ``slot_block`` the block of
        each slot, ``Ns`` for a slot past the last.
    """
    counts = (qstart[..., 1:] - qstart[..., :-1]).long()
    later = (counts - 1).clamp_min(0) // segment
    B, H, ns1 = qstart.shape
    slots = torch.zeros(B, H, ns1, device=qstart.device, dtype=torch.int64)
    slots[..., 1:] = torch.cumsum(later, dim=-1)
    each = torch.arange(list_len // segment, device=qstart.device).expand(B, H, -1).contiguous()
    slot_block = torch.searchsorted(slots[..., 1:].contiguous(), each, right=True, out_int32=True)
    return slots.to(torch.int32), slot_block


def launch_dkdv(q, k, v, do, lse, delta, qlist, qstart, select_block: int, scale: float, packed=None,
                meta: dict | None = None, segment: int | None = None, q_offset: int = 0):
    """``(dk, dv)`` from the inverted selection (``invert_selection``'s ``qlist``, ``qstart``)
    and the backward's ``do``, ``lse`` and ``delta = rowsum(dO * O)`` (contiguous
    ``(B, Hq, T)``).

    Two launches. ``selected_dkdv_partial_kernel`` first: one program per (later segment of a
    long list, key tile, batch row and KV head), into a float32 scratch; then
    ``selected_dkdv_kernel``: one program per (block, key tile, batch row and KV head), summing
    the list's first segment and adding the block's slots in order. Without the split, a block
    every query selects (block 0, forced) would be one program walking all ``T`` queries.

    Scratch: ``B * Hkv * (T * n // segment)`` slots of ``select_block`` (rounded up to the key
    tile) rows by ``Dk + Dv`` float32, at most ``tuning.MAX_SLOTS`` slots per (batch row, head):
    at the reference shape (``B=1, Hkv=4, T=65536, n=16``, 64-key blocks, ``D=128``) the segment is
    2048 queries, 512 slots, and the scratch 4 * 512 * 64 * 256 * 4 bytes = 128 MiB.

    ``meta`` (``tuning.selected_kernel_meta(..., "dkdv")``'s keys) and ``segment`` (a power of
    two) override the defaults, for tuning; the result is deterministic for any fixed choice.
    ``q_offset``: ``q``'s rows are the positions ``q_offset ..`` (``qlist`` holds rows), ``k``,
    ``v`` hold ``0 ..``.
    """
    from ..kernels.selected import selected_dkdv_kernel, selected_dkdv_partial_kernel

    B, Hq, _, Dk = q.shape
    Hkv, Dv, T = k.shape[1], v.shape[-1], k.shape[2]  # T: the keys (the kernels' end of a block)
    G = Hq // Hkv
    meta = dict(meta or tuning.selected_kernel_meta(G, Dk, Dv, select_block, q.dtype, "dkdv"))
    if meta["BLOCK_R"] < G:
        raise ValueError(f"BLOCK_R={meta['BLOCK_R']} holds fewer rows than one query's {G} heads")
    meta["QUERIES"] = meta["BLOCK_R"] // G
    list_len = qlist.shape[-1]
    segment = segment or tuning.dkdv_segment(list_len)
    if segment & (segment - 1):
        raise ValueError(f"segment must be a power of two, got {segment}")
    # the kernels read qstart and slots at the same offsets, lists with unit stride
    qlist, qstart = qlist.contiguous(), qstart.contiguous()
    ns = qstart.shape[-1] - 1
    chunks = -(-select_block // meta["BLOCK_N"])
    slots, slot_block = _segments(qstart, list_len, segment)
    n_slots = slot_block.shape[-1]
    blk_start, blk_end = (qstart, qstart) if packed is None else (packed.block_start, packed.block_end)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    if n_slots:
        part_dk = torch.empty(B * Hkv, n_slots, chunks * meta["BLOCK_N"], Dk, device=q.device, dtype=torch.float32)
        part_dv = torch.empty(B * Hkv, n_slots, chunks * meta["BLOCK_N"], Dv, device=q.device, dtype=torch.float32)
    else:
        part_dk, part_dv = dk, dv  # placeholders, never read
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(lse),
              *_strides(qlist)[:2], *_strides(qstart)[:2])
    if n_slots:
        selected_dkdv_partial_kernel[(n_slots * chunks, B * Hkv)](
            q, k, v, do, lse, delta, qlist, qstart, slots, slot_block, blk_start, blk_end, part_dk, part_dv,
            *common, *_strides(slot_block)[:2], *_strides(part_dk), *_strides(part_dv),
            T, Hkv, ns, scale, q_offset, SEGMENT=segment, CHUNKS=chunks, VARLEN=packed is not None, **meta,
        )
    selected_dkdv_kernel[(ns * chunks, B * Hkv)](
        q, k, v, do, lse, delta, qlist, qstart, slots, blk_start, blk_end, part_dk, part_dv, dk, dv,
        *common, *_strides(part_dk), *_strides(part_dv),
        T, Hkv, scale, q_offset, SEGMENT=segment, SPLIT=n_slots > 0, CHUNKS=chunks, VARLEN=packed is not None, **meta,
    )
    return dk, dv


# ---------------------------------------------------------------- custom operators


@torch.library.custom_op("nsa_flex::selected_attention", mutates_args=())
def selected_attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    idx: Tensor,
    select_block: int,
    scale: float,
    doc_start: Optional[Tensor] = None,
    first_block: Optional[Tensor] = None,
    block_start: Optional[Tensor] = None,
    block_end: Optional[Tensor] = None,
    q_offset: int = 0,
) -> tuple[Tensor, Tensor]:
    """``(o (B, Hq, T, Dv), lse (B, Hq, T) float32)`` of the Triton forward kernel.

    ``idx (B, Hkv, T, n)`` int32 as ``block_indices.kernel_indices`` makes it. A packed row
    (``B = 1``) passes the four tensors of a :class:`PackedRow`; otherwise all four are
    ``None``. ``q_offset``: ``q``'s rows are the positions ``q_offset ..`` over the keys of
    ``k``, ``v`` (not packed)."""
    packed = PackedRow.from_op_args(doc_start, first_block, block_start, block_end)
    return launch_selected_forward(q.contiguous(), k.contiguous(), v.contiguous(), idx, select_block, scale, packed,
                                   q_offset)


@selected_attention_op.register_fake
def _selected_attention_fake(q, k, v, idx, select_block, scale, doc_start=None, first_block=None, block_start=None,
                             block_end=None, q_offset=0):
    B, Hq, T, _ = q.shape
    return q.new_empty(B, Hq, T, v.shape[-1]), q.new_empty(B, Hq, T, dtype=torch.float32)


def _selected_attention_setup(ctx, inputs, output):
    q, k, v, idx, select_block, scale, *packed, q_offset = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, idx, o, lse, *packed)
    ctx.select_block, ctx.scale, ctx.q_offset = select_block, scale, q_offset


def _selected_attention_grad(ctx, do, dlse):
    q, k, v, idx, o, lse, *packed = ctx.saved_tensors
    dq, dk, dv = selected_attention_backward_op(q, k, v, idx, o, lse, do, ctx.select_block, ctx.scale, *packed,
                                                q_offset=ctx.q_offset)
    return dq, dk, dv, None, None, None, None, None, None, None, None


selected_attention_op.register_autograd(_selected_attention_grad, setup_context=_selected_attention_setup)


@torch.library.custom_op("nsa_flex::selected_attention_backward", mutates_args=())
def selected_attention_backward_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    idx: Tensor,
    o: Tensor,
    lse: Tensor,
    do: Tensor,
    select_block: int,
    scale: float,
    doc_start: Optional[Tensor] = None,
    first_block: Optional[Tensor] = None,
    block_start: Optional[Tensor] = None,
    block_end: Optional[Tensor] = None,
    q_offset: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)``, contiguous, of selected attention: :func:`launch_selected_backward`."""
    packed = PackedRow.from_op_args(doc_start, first_block, block_start, block_end)
    # the kernels write dQ/dK/dV with the strides of q/k/v: keep those dense
    return launch_selected_backward(
        q.contiguous(), k.contiguous(), v.contiguous(), idx, o, lse, do, select_block, scale, packed, q_offset
    )


@selected_attention_backward_op.register_fake
def _selected_attention_backward_fake(q, k, v, idx, o, lse, do, select_block, scale, doc_start=None, first_block=None,
                                      block_start=None, block_end=None, q_offset=0):
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(
        k, memory_format=torch.contiguous_format
    ), torch.empty_like(v, memory_format=torch.contiguous_format)


@torch.library.custom_op("nsa_flex::attach_selected_backward", mutates_args=())
def attach_selected_backward_op(
    q: Tensor, k: Tensor, v: Tensor, idx: Tensor, out_rows: Tensor, lse: Tensor, select_block: int, scale: float,
    q_offset: int = 0,
) -> Tensor:
    """``out_rows (B, Hkv, T*G, Dv)``, the selected branch's output over folded rows (row
    ``t*G + g`` of KV head ``h`` is query head ``h*G + g``), unfolded to ``(B, Hq, T, Dv)``.

    The value is only the unfold (a copy): the point is the gradient. ``out_rows`` and
    ``lse (B, Hq, T)`` float32 come from a forward run outside autograd (FlexAttention's, in
    ``nsa_flex.flex.branches``); the op differentiates its output in ``q, k, v`` with the Triton
    backward kernels, which need nothing else. ``idx`` as ``block_indices.kernel_indices``
    makes it. ``q_offset``: ``q``'s rows are the positions ``q_offset ..`` over ``k``, ``v``."""
    B, Hq, T, _ = q.shape
    G = Hq // k.shape[1]
    o = out_rows.new_empty(B, Hq, T, out_rows.shape[-1])  # fresh even when G = 1 (an op's output may not alias)
    return unfold_rows(out_rows, G, out=o)


@attach_selected_backward_op.register_fake
def _attach_selected_backward_fake(q, k, v, idx, out_rows, lse, select_block, scale, q_offset=0):
    B, Hq, T, _ = q.shape
    return out_rows.new_empty(B, Hq, T, out_rows.shape[-1])


def _attach_selected_backward_setup(ctx, inputs, output):
    q, k, v, idx, _, lse, select_block, scale, q_offset = inputs
    ctx.save_for_backward(q, k, v, idx, output, lse)
    ctx.select_block, ctx.scale, ctx.q_offset = select_block, scale, q_offset


def _attach_selected_backward_grad(ctx, do):
    q, k, v, idx, o, lse = ctx.saved_tensors
    dq, dk, dv = selected_attention_backward_op(q, k, v, idx, o, lse, do, ctx.select_block, ctx.scale,
                                                q_offset=ctx.q_offset)
    return dq, dk, dv, None, None, None, None, None, None


attach_selected_backward_op.register_autograd(
    _attach_selected_backward_grad, setup_context=_attach_selected_backward_setup
)
