"""Triton kernels of the selected branch: forward, dQ, and dK/dV. Kernels only; the launch
code, shapes and autograd live in ``triton_backend.py``.

Layout: ``q (B, Hq, T, Dk)``, ``k (B, Hkv, T, Dk)``, ``v (B, Hkv, T, Dv)``, ``Hq = Hkv * G``,
``idx (B, Hkv, T, n)`` int32 (ascending, unique, ``-1`` last). The row tile of every kernel is
the ``G`` query heads of one KV group (padded to ``BLOCK_G``, at least 16 for ``tl.dot``): a
selected K/V tile is loaded once for the whole group, as in the paper's kernel.

Softmax statistics are kept in float32; ``lse`` is the natural log-sum-exp, ``-inf`` for a row
with nothing to attend, whose output is 0.
"""

import triton
import triton.language as tl


@triton.jit
def _load_rows(ptr, stride_row, stride_col, rows, cols, row_mask, col_mask):
    return tl.load(ptr + rows[:, None] * stride_row + cols[None, :] * stride_col,
                   mask=row_mask[:, None] & col_mask[None, :], other=0.0)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # float32 inputs get true float32 products; Triton's default would be TF32
    if IEEE:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


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
def _row_stats(LSE, DELTA, row, g_ok):
    """The forward's log-sum-exp and ``rowsum(dO * O)`` of the group's rows, for recomputing
    ``p = exp(s - lse)``. An empty row (``lse = -inf``) reads as ``+inf``, so its ``p`` is 0."""
    lse = tl.load(LSE + row, mask=g_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA + row, mask=g_ok, other=0.0)
    return lse, delta


@triton.jit
def selected_fwd_kernel(
    Q, K, V, IDX, DOC_START, O, LSE,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    sib, sih, sit, sin,
    sob, soh, sot, sod,
    slb, slh, slt,
    T, Hkv, scale,
    G: tl.constexpr, N_SEL: tl.constexpr, SEL_BLOCK: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    IEEE: tl.constexpr, VARLEN: tl.constexpr,
):
    t = tl.program_id(0)
    bh = tl.program_id(1)
    # 64-bit offsets: B * Hq * T * D passes 2**31 at the reference shape once B >= 4
    b = (bh // Hkv).to(tl.int64)
    h = (bh % Hkv).to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    n = tl.arange(0, BLOCK_N)
    g_ok, dk_ok, dv_ok = g < G, dk < DK, dv < DV

    q = _load_rows(Q + b * sqb + h * G * sqh + t * sqt, sqh, sqd, g, dk, g_ok, dk_ok)
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
                k, v, kv_ok = _kv_tile(k_base, v_base, skt, skd, svt, svd, doc0, j, off, t, n, dk, dv,
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
    Q, K, V, IDX, DOC_START, DO, LSE, DELTA, DQ,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    sib, sih, sit, sin,
    sdb, sdh, sdt, sdd,
    slb, slh, slt,
    T, Hkv, scale,
    G: tl.constexpr, N_SEL: tl.constexpr, SEL_BLOCK: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    IEEE: tl.constexpr, VARLEN: tl.constexpr,
):
    """dQ of one query position for the G heads of a group; ``DO``/``DQ`` share ``sd*`` strides
    with ``q``'s layout (``DQ`` is written with ``q``'s strides)."""
    t = tl.program_id(0)
    bh = tl.program_id(1)
    # 64-bit offsets: B * Hq * T * D passes 2**31 at the reference shape once B >= 4
    b = (bh // Hkv).to(tl.int64)
    h = (bh % Hkv).to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    n = tl.arange(0, BLOCK_N)
    g_ok, dk_ok, dv_ok = g < G, dk < DK, dv < DV

    q = _load_rows(Q + b * sqb + h * G * sqh + t * sqt, sqh, sqd, g, dk, g_ok, dk_ok)
    do = _load_rows(DO + b * sdb + h * G * sdh + t * sdt, sdh, sdd, g, dv, g_ok, dv_ok)
    lse, delta = _row_stats(LSE, DELTA, b * slb + (h * G + g) * slh + t * slt, g_ok)
    dq = tl.zeros([BLOCK_G, BLOCK_DK], tl.float32)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    doc0 = _doc_start(DOC_START, t, VARLEN)
    for slot in range(N_SEL):
        j = tl.load(IDX + b * sib + h * sih + t * sit + slot * sin)
        if j >= 0:
            for off in range(0, SEL_BLOCK, BLOCK_N):
                k, v, kv_ok = _kv_tile(k_base, v_base, skt, skd, svt, svd, doc0, j, off, t, n, dk, dv,
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
def selected_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, QLIST, QSTART, BLK_START, BLK_END, DK_OUT, DV_OUT,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    sdb, sdh, sdt, sdd,
    slb, slh, slt,
    sxb, sxh,
    ssb, ssh,
    T, Hkv, scale,
    G: tl.constexpr, SEL_BLOCK: tl.constexpr, CHUNKS: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    IEEE: tl.constexpr, VARLEN: tl.constexpr,
):
    """dK and dV of one tile of one selection block, gathered from the queries that selected it.

    ``QLIST[b, h, QSTART[b, h, j] : QSTART[b, h, j + 1]]`` are those queries, ascending: the
    selection inverted. Each key has one owner program, so no atomics and the sum's order is
    fixed: two runs give bitwise-equal gradients. ``dK``/``dV`` are written with ``k``/``v``'s
    strides.

    With ``VARLEN`` (a packed row), ``j`` numbers every document's blocks one after another:
    block ``j`` covers keys ``BLK_START[j] ..`` up to its document's end ``BLK_END[j]``, so every
    key still has one owner.
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    # 64-bit offsets: B * Hq * T * D passes 2**31 at the reference shape once B >= 4
    b = (bh // Hkv).to(tl.int64)
    h = (bh % Hkv).to(tl.int64)
    j = pid // CHUNKS
    off = (pid % CHUNKS) * BLOCK_N
    g = tl.arange(0, BLOCK_G)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    n = tl.arange(0, BLOCK_N)
    g_ok, dk_ok, dv_ok = g < G, dk < DK, dv < DV
    if VARLEN:
        blk_start = tl.load(BLK_START + j)
        blk_end = tl.load(BLK_END + j)
    else:
        blk_start = j * SEL_BLOCK
        blk_end = T
    s_pos = blk_start + off + n
    in_block = (off + n < SEL_BLOCK) & (s_pos < blk_end)
    k = _load_rows(K + b * skb + h * skh, skt, skd, s_pos, dk, in_block, dk_ok)
    v = _load_rows(V + b * svb + h * svh, svt, svd, s_pos, dv, in_block, dv_ok)
    dk_acc = tl.zeros([BLOCK_N, BLOCK_DK], tl.float32)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    start = tl.load(QSTART + b * ssb + h * ssh + j)
    stop = tl.load(QSTART + b * ssb + h * ssh + j + 1)
    for e in range(start, stop):
        t = tl.load(QLIST + b * sxb + h * sxh + e).to(tl.int64)
        q = _load_rows(Q + b * sqb + h * G * sqh + t * sqt, sqh, sqd, g, dk, g_ok, dk_ok)
        do = _load_rows(DO + b * sdb + h * G * sdh + t * sdt, sdh, sdd, g, dv, g_ok, dv_ok)
        lse, delta = _row_stats(LSE, DELTA, b * slb + (h * G + g) * slh + t * slt, g_ok)
        ok = in_block & (s_pos <= t)
        s = _dot(q, tl.trans(k), IEEE)
        dp = _dot(do, tl.trans(v), IEEE)
        p = tl.where(ok[None, :], tl.exp(s * scale - lse[:, None]), 0.0)  # (BLOCK_G, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dv_acc += _dot(tl.trans(p.to(do.dtype)), do, IEEE)
        dk_acc += _dot(tl.trans(ds.to(q.dtype)), q, IEEE)
    dk_ptr = DK_OUT + b * skb + h * skh
    dv_ptr = DV_OUT + b * svb + h * svh
    tl.store(dk_ptr + s_pos[:, None] * skt + dk[None, :] * skd, (dk_acc * scale).to(DK_OUT.dtype.element_ty),
             mask=in_block[:, None] & dk_ok[None, :])
    tl.store(dv_ptr + s_pos[:, None] * svt + dv[None, :] * svd, dv_acc.to(DV_OUT.dtype.element_ty),
             mask=in_block[:, None] & dv_ok[None, :])
