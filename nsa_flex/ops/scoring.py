"""Block selection's Triton kernels as a custom operator, with their launch code.

- :func:`launch_scoring`: the scores of every selection block for a chunk of queries
  (``kernels.scoring``), then their top-n (:func:`launch_top_n`, ``kernels.top_n``), chunk by
  chunk, so that the only large buffer is one chunk's ``(B, Hkv, chunk, Ns)`` float32 scores.
- ``nsa_flex::select_blocks_fused`` (:func:`select_blocks_fused_op`, its fake
  :func:`_select_blocks_fused_fake` beside it): the launch as an operator that
  ``torch.compile`` keeps opaque; int32 indices, no gradient. The config travels as its fields.
"""

from typing import Optional

import torch
from torch import Tensor

from .. import tuning
from ..config import NSAConfig

__all__ = ["launch_scoring", "launch_top_n", "select_blocks_fused_op"]


@torch.no_grad()
def launch_scoring(q, k_cmp, config, scale, chunk_size=None, lse=None, q_offset=0, packed=None) -> Tensor:
    """``select_blocks`` with Triton kernels: ``kernels.scoring.block_scores_kernel`` writes
    the ``(B, Hkv, chunk, Ns)`` float32 block scores, the only large buffer, and
    ``kernels.top_n.top_n_kernel`` ranks them (the tie rule of ``top_n.top_n_blocks``).
    ``lse``: the compressed branch's ``(B, Hq, T)`` log-sum-exp, when the caller has it, saves
    the scoring kernel one of its two passes. Called through the custom op
    ``nsa_flex::select_blocks_fused`` (:func:`select_blocks_fused_op`), which ``torch.compile``
    keeps opaque; returns contiguous ``(B, Hkv, T, n)`` int32. ``q_offset``: ``q``'s (and
    ``lse``'s) rows are the positions ``q_offset ..``, ``k_cmp`` the blocks up to the last.

    ``packed``: a packed row's ``(doc_id (T,), cu (N+1,), cmp_cu (N+1,), ns)``, the first three
    int32 on ``q``'s device (:meth:`nsa_flex.varlen.Documents.scoring_tables`), ``ns`` the
    longest document's selection blocks; every document is then selected alone in the same
    launches (doc-local indices, ``q_offset`` 0)."""
    from ..kernels.scoring import block_scores_kernel

    B, Hq, T, Dk = q.shape
    Hkv, tc = k_cmp.shape[1], k_cmp.shape[2]
    G, n = Hq // Hkv, config.num_selected
    ns = config.num_select_blocks(q_offset + T) if packed is None else packed[3]
    doc_id, cu, cmp_cu = (q, q, q) if packed is None else packed[:3]
    tiles = tuning.scoring_launch(G, Dk, config)
    if chunk_size is None:
        chunk_size = tuning.scoring_chunk(B, Hkv, ns, tiles["BLOCK_T"])
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_cmp = k_cmp.to(q.dtype)
    lse_strides = (0, 0, 0) if lse is None else lse.stride()
    out = torch.empty(B, Hkv, T, n, device=q.device, dtype=torch.int32)
    for start in range(0, T, chunk_size):
        C = min(T, start + chunk_size) - start
        # the kernel writes every block up to each query's own; the top-n reads no further
        scores = torch.empty((B, Hkv, C, ns), device=q.device, dtype=torch.float32)
        block_scores_kernel[(-(-C // tiles["BLOCK_T"]), B * Hkv)](
            q, k_cmp, scores, q if lse is None else lse, doc_id, cu, cmp_cu,
            *q.stride(), *k_cmp.stride(), *scores.stride(), *lse_strides,
            tc, ns, Hkv, q_offset + start, C, scale * tuning.LOG2E, q_offset,
            G=G, CMP_BLOCK=config.compress_block, CMP_STRIDE=config.compress_stride,
            SEL_BLOCK=config.select_block, N_INITIAL=config.num_initial, N_LOCAL=config.num_local,
            DK=Dk, IEEE=q.dtype == torch.float32, HAS_LSE=lse is not None, VARLEN=packed is not None, **tiles,
        )
        launch_top_n(scores, config, q_offset + start, out=out[:, :, start : start + C],
                     packed=None if packed is None else packed[:2])
    return out


def launch_top_n(scores: Tensor, config: NSAConfig, q_start: int, out: Optional[Tensor] = None,
                 packed: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    """``top_n.top_n_blocks`` of ``scores (B, Hkv, C, Ns)`` float32 (contiguous along the blocks,
    ``-inf``/``+inf`` for non-candidates/forced blocks as the scoring kernel writes them, but
    only blocks up to each query's own are read) by ``kernels.top_n.top_n_kernel``, into
    ``out (B, Hkv, C, n)`` int32. ``packed``: a packed row's ``(doc_id, cu)`` (as
    :func:`launch_scoring`'s), so that each query's own block counts from its document's start."""
    from ..kernels.top_n import top_n_kernel

    B, Hkv, C, ns = scores.shape
    n = config.num_selected
    if out is None:
        out = torch.empty(B, Hkv, C, n, device=scores.device, dtype=torch.int32)
    tiles = tuning.top_n_tiles(ns, n)
    top_n_kernel[(C, B * Hkv)](
        scores, out, *((scores, scores) if packed is None else packed), *scores.stride(), *out.stride(), ns, Hkv,
        q_start, SEL_BLOCK=config.select_block, N_SEL=n, VARLEN=packed is not None,
        num_warps=tuning.top_n_warps(tiles["BLOCK_NS"]), **tiles,
    )
    return out


# ---------------------------------------------------------------- custom operator


@torch.library.custom_op("nsa_flex::select_blocks_fused", mutates_args=())
def select_blocks_fused_op(
    q: Tensor,
    k_cmp: Tensor,
    compress_block: int,
    compress_stride: int,
    select_block: int,
    num_selected: int,
    num_initial: int,
    num_local: int,
    scale: float,
    chunk_size: Optional[int] = None,
    lse: Optional[Tensor] = None,
    q_offset: int = 0,
    doc_id: Optional[Tensor] = None,
    cu: Optional[Tensor] = None,
    cmp_cu: Optional[Tensor] = None,
    num_select: int = 0,
) -> Tensor:
    """``select_blocks(q (B, Hq, T, Dk), k_cmp (B, Hkv, Tc, Dk))`` with the Triton scoring
    kernels (:func:`launch_scoring`), no modifiers: ``(B, Hkv, T, n)`` int32. The config
    travels as its fields (the window plays no part). ``lse``: the compressed branch's
    ``(B, Hq, T)`` natural log-sum-exp, if the caller has it. ``q_offset``: the queries are the
    positions ``q_offset ..`` and ``k_cmp`` holds the blocks up to the last. A packed row:
    ``doc_id``, ``cu``, ``cmp_cu`` and ``num_select`` as :func:`launch_scoring`'s ``packed``."""
    config = NSAConfig(
        compress_block=compress_block, compress_stride=compress_stride, select_block=select_block,
        num_selected=num_selected, num_initial=num_initial, num_local=num_local,
    )
    packed = None if doc_id is None else (doc_id, cu, cmp_cu, num_select)
    return launch_scoring(q, k_cmp, config, scale, chunk_size, lse, q_offset, packed)


@select_blocks_fused_op.register_fake
def _select_blocks_fused_fake(q, k_cmp, compress_block, compress_stride, select_block, num_selected, num_initial, num_local, scale,
                              chunk_size=None, lse=None, q_offset=0, doc_id=None, cu=None, cmp_cu=None,
                              num_select=0):
    B, _, T, _ = q.shape
    return q.new_empty(B, k_cmp.shape[1], T, num_selected, dtype=torch.int32)
