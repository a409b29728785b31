"""Triton top-n of block scores: ``n`` best blocks per query, an exact tie to the lower block,
chosen blocks ascending. Shared by the full forward's selection (:func:`top_n_kernel`) and the
decode steps (``kernels.decode.sparse_split_kernel``, ``kernels.decode_batch.select_kernel``).
``@triton.jit`` functions only; the launch code is ``nsa_flex.ops.scoring``.
"""

import triton
import triton.language as tl

from .primitives import _batch_head


@triton.jit
def _sort_key(vals, j, ok, Ns):
    """Keys as int64 that order like (value, then lower block first); the smallest int64 where
    not ``ok``.

    The float's bits are made monotonic as a signed int32 (negative floats flip their magnitude
    bits) and fill the high half; the block index, reversed, fills the low half, so that one
    integer maximum finds the best block and breaks an exact tie to the lower one.
    """
    bits = vals.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = (ordered.to(tl.int64) << 32) | (Ns - 1 - j).to(tl.int64)
    return tl.where(ok, key, -9223372036854775807 - 1)


@triton.jit
def _top_n(KEYS, cur, Ns, N_SEL: tl.constexpr, BLOCK_SEL: tl.constexpr, BLOCK_NS: tl.constexpr,
           ONE_TILE: tl.constexpr, CACHE: tl.constexpr):
    """The ``N_SEL`` best of ``keys[0 .. cur]`` (distinct integers from :func:`_sort_key`) as
    block indices, ``-1`` for empty slots: round ``r`` takes the largest key below round
    ``r - 1``'s. With ``ONE_TILE`` the keys stay in registers; otherwise every round reads
    them again. ``CACHE``: the loads' cache modifier (``".cg"`` for keys that other programs
    of the same launch wrote)."""
    NONE: tl.constexpr = -9223372036854775807 - 1
    slot = tl.arange(0, BLOCK_SEL)
    chosen = tl.full([BLOCK_SEL], -1, tl.int32)
    jn = tl.arange(0, BLOCK_NS)
    below = tl.full([], 9223372036854775807, tl.int64)
    if ONE_TILE:
        key = _sort_key(tl.load(KEYS + jn, mask=jn <= cur, other=0.0, cache_modifier=CACHE), jn, jn <= cur, Ns)
        for r in range(N_SEL):
            best = tl.max(tl.where(key < below, key, NONE), 0)
            j = tl.where(best > NONE, Ns - 1 - (best & 0xFFFFFFFF), -1).to(tl.int32)
            chosen = tl.where(slot == r, j, chosen)
            below = best
    else:
        for r in range(N_SEL):
            best = tl.full([], NONE, tl.int64)
            for j0 in range(0, cur + 1, BLOCK_NS):
                jj = j0 + jn
                key = _sort_key(tl.load(KEYS + jj, mask=jj <= cur, other=0.0, cache_modifier=CACHE), jj, jj <= cur, Ns)
                best = tl.maximum(best, tl.max(tl.where(key < below, key, NONE), 0))
            j = tl.where(best > NONE, Ns - 1 - (best & 0xFFFFFFFF), -1).to(tl.int32)
            chosen = tl.where(slot == r, j, chosen)
            below = best
    return chosen


@triton.jit
def _ascending_rank(chosen, Ns, N_SEL: tl.constexpr, BLOCK_SEL: tl.constexpr):
    """Each slot's place when ``chosen`` (block indices of ``_top_n``, ``-1`` for empty slots)
    is put in ascending order with the empty slots last, in slot order."""
    slot = tl.arange(0, BLOCK_SEL)
    order = tl.where(chosen >= 0, chosen, Ns + slot)
    order = tl.where(slot < N_SEL, order, 2 * Ns + BLOCK_SEL + slot)
    return tl.sum((order[None, :] < order[:, None]).to(tl.int32), 1)


@triton.jit
def top_n_kernel(
    S, IDX, DOC, CU,
    ssb, ssh, sst, ssn,
    sib, sih, sit, sin,
    Ns, Hkv, t_start, SEL_BLOCK: tl.constexpr, N_SEL: tl.constexpr, BLOCK_SEL: tl.constexpr,
    BLOCK_NS: tl.constexpr, ONE_TILE: tl.constexpr, VARLEN: tl.constexpr,
):
    """Top-n of the scores of :func:`block_scores_kernel`: program ``(c, b*Hkv + h)`` ranks the
    candidate blocks ``0 .. t // l'`` of query ``t = t_start + c`` (an exact tie to the lower
    block, ``+inf`` forced blocks first) and writes the chosen ones to ``IDX[b, h, c]``,
    ascending, then ``-1``. ``S`` must be ``ssn``-contiguous along the blocks (``ssn == 1``).
    ``VARLEN``: ``t`` counts from the start of its document, ``CU[DOC[t]]`` (a packed row)."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = _batch_head(bh, Hkv)
    t = t_start + c
    if VARLEN:
        t -= tl.load(CU + tl.load(DOC + t))
    cur = tl.minimum(t // SEL_BLOCK, Ns - 1)
    row = S + b * ssb + h * ssh + c.to(tl.int64) * sst
    chosen = _top_n(row, cur, Ns, N_SEL, BLOCK_SEL, BLOCK_NS, ONE_TILE, "")
    slot = tl.arange(0, BLOCK_SEL)
    rank = _ascending_rank(chosen, Ns, N_SEL, BLOCK_SEL)
    tl.store(IDX + b * sib + h * sih + c.to(tl.int64) * sit + rank * sin, chosen, mask=slot < N_SEL)
