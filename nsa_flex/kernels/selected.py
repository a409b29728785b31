"""Triton kernels of the selected branch: forward, dQ, and dK/dV (two kernels). ``@triton.jit``
functions only; the launch code, shapes and custom operators are ``nsa_flex.ops.selected``.

Layout: ``q (B, Hq, T, Dk)``, ``k (B, Hkv, T, Dk)``, ``v (B, Hkv, T, Dv)``, ``Hq = Hkv * G``,
``idx (B, Hkv, T, n)`` int32 (ascending, unique, ``-1`` last). The row tile of the forward and
dQ kernels is the ``G`` query heads of one KV group (padded to ``BLOCK_G``, at least 16 for
``tl.dot``): a selected K/V tile is loaded once for the whole group, as in the paper's kernel.
The dK/dV kernels hold one key tile and stream row tiles of several queries' groups past it
(``_dkdv_gather``); a long query list is cut into segments summed apart and added in a fixed
order (``selected_dkdv_partial_kernel``, ``selected_dkdv_kernel``).

Softmax statistics are kept in float32; ``lse`` is the natural log-sum-exp, ``-inf`` for a row
with nothing to attend, whose output is 0.
"""

import triton
import triton.language as tl

from .primitives import _batch_head, _dot, _load_rows


@triton.jit
def _kv_tile(k_base, v_base, skt, skd, svt, svd, doc0, j, off, t, n, dk, dv, dk_ok, dv_ok,
             SEL_BLOCK: tl.constexpr):
    """Keys and values ``off .. off + BLOCK_N - 1`` of selection block ``j`` counted from
    position ``doc0`` (the query's document start; 0 for one sequence), those after query ``t``
    or past the block masked: ``(k, v, visible)``."""
    s_pos = doc0 + j * SEL_BLOCK + off + n
    visible = (off + n < SEL_BLOCK) & (s_pos <= t)
    k = _load_rows(k_base, skt, skd, s_pos, dk, visible, dk_ok)
    v = _load_rows(v_base, svt, svd, s_pos, dv, visible, dv_ok)
    return k, v, visible


@triton.jit
def _doc_start(DOC_START, t, VARLEN: tl.constexpr):
    """Where query ``t``'s block indices count from: its document's start in a packed row."""
    if VARLEN:
        doc0 = tl.load(DOC_START + t)
    else:
        doc0 = 0
    return doc0


@triton.jit
def _row_lse(LSE, row, g_ok):
    """The forward's log-sum-exp of the group's rows, for recomputing ``p = exp(s - lse)``. An
    empty row (``lse = -inf``) reads as ``+inf``, so its ``p`` is 0."""
    lse = tl.load(LSE + row, mask=g_ok, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse)


@triton.jit
def _row_stats(LSE, DELTA, row, g_ok):
    """:func:`_row_lse` and ``rowsum(dO * O)`` of the group's rows."""
    return _row_lse(LSE, row, g_ok), tl.load(DELTA + row, mask=g_ok, other=0.0)


@triton.jit
def _group_queries(Q, sqb, sqh, sqt, sqd, Hkv, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                   BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """The forward's and dQ's program: query position ``t`` of batch row ``b`` and KV head ``h``
    (program ids ``(t, b * Hkv + h)``), the tiles' index ranges and masks, and the group's ``G``
    query rows ``q (BLOCK_G, BLOCK_DK)``."""
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = _batch_head(bh, Hkv)
    g = tl.arange(0, BLOCK_G)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    n = tl.arange(0, BLOCK_N)
    g_ok, dk_ok, dv_ok = g < G, dk < DK, dv < DV

    q = _load_rows(Q + b * sqb + h * G * sqh + t * sqt, sqh, sqd, g, dk, g_ok, dk_ok)
    return t, b, h, g, dk, dv, n, g_ok, dk_ok, dv_ok, q


@triton.jit
def selected_fwd_kernel(
    Q, K, V, IDX, DOC_START, O, LSE,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    sib, sih, sit, sin,
    sob, soh, sot, sod,
    slb, slh, slt,
    T, Hkv, scale, q_pos0,
    G: tl.constexpr, N_SEL: tl.constexpr, SEL_BLOCK: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    IEEE: tl.constexpr, VARLEN: tl.constexpr,
):
    t, b, h, g, dk, dv, n, g_ok, dk_ok, dv_ok, q = _group_queries(
        Q, sqb, sqh, sqt, sqd, Hkv, G, DK, DV, BLOCK_G, BLOCK_N, BLOCK_DK, BLOCK_DV)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    doc0 = _doc_start(DOC_START, t, VARLEN)
    for slot in range(N_SEL):
        j = tl.load(IDX + b * sib + h * sih + t * sit + slot * sin)
        if j >= 0:
            for off in range(0, SEL_BLOCK, BLOCK_N):
                k, v, kv_ok = _kv_tile(k_base, v_base, skt, skd, svt, svd, doc0, j, off, q_pos0 + t, n, dk, dv,
                                       dk_ok, dv_ok, SEL_BLOCK)
                s = _dot(q, tl.trans(k), IEEE)
                s = tl.where(kv_ok[None, :], s * scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp(m_i - m_safe)
                p = tl.exp(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
                m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    o_ptr = O + b * sob + h * G * soh + t * sot
    tl.store(o_ptr + g[:, None] * soh + dv[None, :] * sod, out.to(O.dtype.element_ty),
             mask=g_ok[:, None] & dv_ok[None, :])
    tl.store(LSE + b * slb + (h * G + g) * slh + t * slt, lse, mask=g_ok)


@triton.jit
def selected_dq_kernel(
    Q, K, V, IDX, DOC_START, DO, O, LSE, DELTA, DQ,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    sib, sih, sit, sin,
    sdb, sdh, sdt, sdd,
    sob, soh, sot, sod,
    slb, slh, slt,
    T, Hkv, scale, q_pos0,
    G: tl.constexpr, N_SEL: tl.constexpr, SEL_BLOCK: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    IEEE: tl.constexpr, VARLEN: tl.constexpr,
):
    """dQ of one query position for the G heads of a group (``DQ`` is written with ``q``'s
    strides). Also writes ``DELTA = rowsum(dO * O)`` of its rows (float32, at ``LSE``'s offsets),
    which the dK/dV kernels read after it: no separate pass over ``dO`` and ``O``."""
    t, b, h, g, dk, dv, n, g_ok, dk_ok, dv_ok, q = _group_queries(
        Q, sqb, sqh, sqt, sqd, Hkv, G, DK, DV, BLOCK_G, BLOCK_N, BLOCK_DK, BLOCK_DV)
    do = _load_rows(DO + b * sdb + h * G * sdh + t * sdt, sdh, sdd, g, dv, g_ok, dv_ok)
    o = _load_rows(O + b * sob + h * G * soh + t * sot, soh, sod, g, dv, g_ok, dv_ok)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    stat = b * slb + (h * G + g) * slh + t * slt
    tl.store(DELTA + stat, delta, mask=g_ok)
    lse = _row_lse(LSE, stat, g_ok)
    dq = tl.zeros([BLOCK_G, BLOCK_DK], tl.float32)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    doc0 = _doc_start(DOC_START, t, VARLEN)
    for slot in range(N_SEL):
        j = tl.load(IDX + b * sib + h * sih + t * sit + slot * sin)
        if j >= 0:
            for off in range(0, SEL_BLOCK, BLOCK_N):
                k, v, kv_ok = _kv_tile(k_base, v_base, skt, skd, svt, svd, doc0, j, off, q_pos0 + t, n, dk, dv,
                                       dk_ok, dv_ok, SEL_BLOCK)
                s = _dot(q, tl.trans(k), IEEE)
                dp = _dot(do, tl.trans(v), IEEE)
                p = tl.where(kv_ok[None, :], tl.exp(s * scale - lse[:, None]), 0.0)
                ds = p * (dp - delta[:, None])
                dq += _dot(ds.to(k.dtype), k, IEEE)
    dq_ptr = DQ + b * sqb + h * G * sqh + t * sqt
    tl.store(dq_ptr + g[:, None] * sqh + dk[None, :] * sqd, (dq * scale).to(DQ.dtype.element_ty),
             mask=g_ok[:, None] & dk_ok[None, :])


@triton.jit
def _block_keys(K, V, BLK_START, BLK_END, j, off, used, skt, skd, svt, svd, n, dk, dv, dk_ok, dv_ok, T,
                SEL_BLOCK: tl.constexpr, VARLEN: tl.constexpr):
    """Keys ``off .. off + BLOCK_N - 1`` of selection block ``j`` (``K``/``V`` at the batch row
    and head): ``(s_pos, in_block, k, v)``, nothing in the block unless ``used``.

    With ``VARLEN`` (a packed row), ``j`` numbers every document's blocks one after another:
    block ``j`` covers keys ``BLK_START[j] ..`` up to its document's end ``BLK_END[j]``, so every
    key still has one owner."""
    if VARLEN:
        blk_start = tl.load(BLK_START + j)
        blk_end = tl.load(BLK_END + j)
    else:
        blk_start = j * SEL_BLOCK
        blk_end = T
    s_pos = blk_start + off + n
    # (a scalar & a block of int1 trips Triton's interpreter; compare against a length instead)
    in_block = (off + n < tl.where(used, SEL_BLOCK, 0)) & (s_pos < blk_end)
    k = _load_rows(K, skt, skd, s_pos, dk, in_block, dk_ok)
    v = _load_rows(V, svt, svd, s_pos, dv, in_block, dv_ok)
    return s_pos, in_block, k, v


@triton.jit
def _dkdv_gather(Q, DO, LSE, DELTA, QLIST, lo, hi, k, v, s_pos, in_block,
                 sqh, sqt, sqd, sdh, sdt, sdd, slh, slt, scale, q_pos0,
                 G: tl.constexpr, QUERIES: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
                 BLOCK_DV: tl.constexpr, IEEE: tl.constexpr):
    """dV and unscaled dK (``(BLOCK_N, BLOCK_DV)``, ``(BLOCK_N, BLOCK_DK)`` float32) of the keys
    ``s_pos`` (``k``, ``v`` loaded) from the queries ``QLIST[lo:hi]``, summed in list order.

    ``QUERIES`` queries a step: their ``G`` heads each are the ``QUERIES * G <= BLOCK_R`` rows
    of one tile (row ``r`` is query ``r // G``, head ``r % G``), each row masked causally against
    its own position and with its own ``lse``/``delta``, so the products are
    ``(BLOCK_N x BLOCK_R) @ (BLOCK_R x D)`` rather than a ``G``-row sliver per query.
    ``Q``/``DO``/``LSE``/``DELTA`` point at the group's first head, ``QLIST`` at the batch row
    and head's list."""
    r = tl.arange(0, BLOCK_R)
    m = r // G
    g = (r % G).to(tl.int64)
    r_used = r < QUERIES * G
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    dk_ok, dv_ok = dk < DK, dv < DV
    dk_acc = tl.zeros([BLOCK_N, BLOCK_DK], tl.float32)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for e0 in range(lo, hi, QUERIES):
        r_ok = r_used & (e0 + m < hi)
        t = tl.load(QLIST + e0 + m, mask=r_ok, other=0).to(tl.int64)
        q = tl.load(Q + (g * sqh + t * sqt)[:, None] + dk[None, :] * sqd,
                    mask=r_ok[:, None] & dk_ok[None, :], other=0.0)
        do = tl.load(DO + (g * sdh + t * sdt)[:, None] + dv[None, :] * sdd,
                     mask=r_ok[:, None] & dv_ok[None, :], other=0.0)
        lse, delta = _row_stats(LSE, DELTA, g * slh + t * slt, r_ok)
        # scores transposed, (BLOCK_N, BLOCK_R): K and V as the left operands are staged in
        # shared memory once, before the loop (on the right, Triton re-stored them every step,
        # seen in the sm_90 IR), and p, dS come out as the dV and dK products take them
        ok = in_block[:, None] & r_ok[None, :] & (s_pos[:, None] <= q_pos0 + t[None, :])
        s = _dot(k, tl.trans(q), IEEE)
        dp = _dot(v, tl.trans(do), IEEE)
        p = tl.where(ok, tl.exp(s * scale - lse[None, :]), 0.0)
        ds = p * (dp - delta[None, :])
        dv_acc += _dot(p.to(do.dtype), do, IEEE)
        dk_acc += _dot(ds.to(q.dtype), q, IEEE)
    return dk_acc, dv_acc


@triton.jit
def selected_dkdv_partial_kernel(
    Q, K, V, DO, LSE, DELTA, QLIST, QSTART, SLOTS, SLOT_BLOCK, BLK_START, BLK_END, PART_DK, PART_DV,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    sdb, sdh, sdt, sdd,
    slb, slh, slt,
    sxb, sxh,
    ssb, ssh,
    sob, soh,
    spb, sps, spr, spd,
    svpb, svps, svpr, svpd,
    T, Hkv, NS, scale, q_pos0,
    G: tl.constexpr, QUERIES: tl.constexpr, SEGMENT: tl.constexpr, SEL_BLOCK: tl.constexpr,
    CHUNKS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    IEEE: tl.constexpr, VARLEN: tl.constexpr,
):
    """float32 partial dK/dV of one key tile of a block from one *later* segment of its query
    list, into the scratch slot ``PART_*[b * Hkv + h, slot]``; ``selected_dkdv_kernel`` adds the
    slots up afterwards.

    Why: a block's queries are summed by one program, and a block can be chosen by every query
    (block 0 is forced): one program walking ``T`` queries would be the whole pass's tail. So a
    block's list is cut into segments of ``SEGMENT`` queries; the first belongs to
    ``selected_dkdv_kernel``, each later one is a slot here. ``SLOTS[b, h, j]`` is block ``j``'s
    first slot (an exclusive cumulative sum, ``Ns + 1`` entries) and ``SLOT_BLOCK[b, h, slot]``
    the block of a slot, ``NS`` past the last used slot: the grid is an upper bound known on the
    host (``T * n // SEGMENT`` slots), and surplus programs do nothing.
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = _batch_head(bh, Hkv)
    slot = pid // CHUNKS
    off = (pid % CHUNKS) * BLOCK_N
    n = tl.arange(0, BLOCK_N)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    dk_ok, dv_ok = dk < DK, dv < DV
    j = tl.load(SLOT_BLOCK + b * sob + h * soh + slot)
    used = j < NS
    j = tl.minimum(j, NS - 1)
    seg = slot - tl.load(SLOTS + b * ssb + h * ssh + j) + 1  # segment 0 is the block kernel's
    start = tl.load(QSTART + b * ssb + h * ssh + j)
    stop = tl.load(QSTART + b * ssb + h * ssh + j + 1)
    lo = start + seg * SEGMENT
    hi = tl.where(used, tl.minimum(stop, lo + SEGMENT), lo)
    s_pos, in_block, k, v = _block_keys(K + b * skb + h * skh, V + b * svb + h * svh, BLK_START, BLK_END, j, off,
                                        used, skt, skd, svt, svd, n, dk, dv, dk_ok, dv_ok, T, SEL_BLOCK, VARLEN)
    dk_acc, dv_acc = _dkdv_gather(
        Q + b * sqb + h * G * sqh, DO + b * sdb + h * G * sdh, LSE + b * slb + h * G * slh,
        DELTA + b * slb + h * G * slh, QLIST + b * sxb + h * sxh, lo, hi, k, v, s_pos, in_block,
        sqh, sqt, sqd, sdh, sdt, sdd, slh, slt, scale, q_pos0,
        G, QUERIES, DK, DV, BLOCK_R, BLOCK_N, BLOCK_DK, BLOCK_DV, IEEE,
    )
    row = off + n
    bh64 = b * Hkv + h
    s64 = slot.to(tl.int64)
    tl.store(PART_DK + bh64 * spb + s64 * sps + row[:, None] * spr + dk[None, :] * spd, dk_acc,
             mask=in_block[:, None] & dk_ok[None, :])
    tl.store(PART_DV + bh64 * svpb + s64 * svps + row[:, None] * svpr + dv[None, :] * svpd, dv_acc,
             mask=in_block[:, None] & dv_ok[None, :])


@triton.jit
def selected_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, QLIST, QSTART, SLOTS, BLK_START, BLK_END, PART_DK, PART_DV, DK_OUT, DV_OUT,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    sdb, sdh, sdt, sdd,
    slb, slh, slt,
    sxb, sxh,
    ssb, ssh,
    spb, sps, spr, spd,
    svpb, svps, svpr, svpd,
    T, Hkv, scale, q_pos0,
    G: tl.constexpr, QUERIES: tl.constexpr, SEGMENT: tl.constexpr, SPLIT: tl.constexpr,
    SEL_BLOCK: tl.constexpr, CHUNKS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    IEEE: tl.constexpr, VARLEN: tl.constexpr,
):
    """dK and dV of one key tile of one selection block, gathered from the queries that selected
    it; written with ``k``/``v``'s strides.

    ``QLIST[b, h, QSTART[b, h, j] : QSTART[b, h, j + 1]]`` are those queries, ascending: the
    selection inverted. This program sums the list's first ``SEGMENT`` queries itself
    (``_dkdv_gather``, several queries a step), then, with ``SPLIT``, adds the float32 partial
    sums that ``selected_dkdv_partial_kernel`` left for the rest of a long list, in slot order
    (``SLOTS[b, h, j] .. SLOTS[b, h, j + 1]``). Each key has one writer and every sum a fixed
    order, so no atomics and two runs give bitwise-equal gradients.
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = _batch_head(bh, Hkv)
    j = pid // CHUNKS
    off = (pid % CHUNKS) * BLOCK_N
    n = tl.arange(0, BLOCK_N)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    dk_ok, dv_ok = dk < DK, dv < DV
    s_pos, in_block, k, v = _block_keys(K + b * skb + h * skh, V + b * svb + h * svh, BLK_START, BLK_END, j, off,
                                        j >= 0, skt, skd, svt, svd, n, dk, dv, dk_ok, dv_ok, T, SEL_BLOCK, VARLEN)
    start = tl.load(QSTART + b * ssb + h * ssh + j)
    stop = tl.load(QSTART + b * ssb + h * ssh + j + 1)
    dk_acc, dv_acc = _dkdv_gather(
        Q + b * sqb + h * G * sqh, DO + b * sdb + h * G * sdh, LSE + b * slb + h * G * slh,
        DELTA + b * slb + h * G * slh, QLIST + b * sxb + h * sxh, start, tl.minimum(stop, start + SEGMENT),
        k, v, s_pos, in_block, sqh, sqt, sqd, sdh, sdt, sdd, slh, slt, scale, q_pos0,
        G, QUERIES, DK, DV, BLOCK_R, BLOCK_N, BLOCK_DK, BLOCK_DV, IEEE,
    )
    row = off + n
    if SPLIT:
        bh64 = b * Hkv + h
        slot_lo = tl.load(SLOTS + b * ssb + h * ssh + j)
        slot_hi = tl.load(SLOTS + b * ssb + h * ssh + j + 1)
        for i in range(0, slot_hi - slot_lo):
            s64 = slot_lo.to(tl.int64) + i
            dk_acc += tl.load(PART_DK + bh64 * spb + s64 * sps + row[:, None] * spr + dk[None, :] * spd,
                              mask=in_block[:, None] & dk_ok[None, :], other=0.0)
            dv_acc += tl.load(PART_DV + bh64 * svpb + s64 * svps + row[:, None] * svpr + dv[None, :] * svpd,
                              mask=in_block[:, None] & dv_ok[None, :], other=0.0)
    dk_ptr = DK_OUT + b * skb + h * skh
    dv_ptr = DV_OUT + b * svb + h * svh
    tl.store(dk_ptr + s_pos[:, None] * skt + dk[None, :] * skd, (dk_acc * scale).to(DK_OUT.dtype.element_ty),
             mask=in_block[:, None] & dk_ok[None, :])
    tl.store(dv_ptr + s_pos[:, None] * svt + dv[None, :] * svd, dv_acc.to(DV_OUT.dtype.element_ty),
             mask=in_block[:, None] & dv_ok[None, :])
