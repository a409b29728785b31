"""Triton kernel of block selection's scores: the compressed branch's softmax, moved onto
selection blocks and summed over the GQA group, without a ``T x Tc`` tensor. Kernel only; the
launch code and top-n live in ``selection.py``.

Layout: ``q (B, Hq, T, Dk)``, ``k_cmp (B, Hkv, Tc, Dk)``, scores ``(B, Hkv, C, Ns)`` float32 for
the ``C`` queries from ``t_start``. The row tile is ``BLOCK_T`` tokens times the ``G`` heads of a
group (padded to ``BLOCK_G``), so each compressed key tile is loaded once for the whole group.
"""

import triton
import triton.language as tl


@triton.jit
def _qk(q, kc_ptr, skt, skd, i, dk, i_ok, dk_ok, IEEE: tl.constexpr):
    kc = tl.load(kc_ptr + i[:, None] * skt + dk[None, :] * skd, mask=i_ok[:, None] & dk_ok[None, :], other=0.0)
    if IEEE:
        s = tl.dot(q, tl.trans(kc), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(kc))
    return s


@triton.jit
def _split_dot(p, w):
    """``p @ w`` for float32 ``p`` and small whole-number weights ``w``, on tensor cores with
    about float32's precision: ``p`` is split into three parts of at most 8 significant bits
    each (24 in all, float32's count) whose sum is exactly ``p``; TF32 holds such parts, and
    ``w``, exactly, so every product is exact and only the accumulation, in float32 (on tensor
    cores, not necessarily rounded as IEEE adds would be), loses precision. A plain TF32
    product would round ``p`` to 11 bits before the top-n compares it; a float32 ("ieee")
    product runs on the CUDA cores and took about half the scoring kernel's time (H200,
    T=65536). (The parts stay float32: Triton's interpreter multiplies bfloat16 tensors made in
    a kernel wrongly.)"""
    hi = p.to(tl.bfloat16).to(tl.float32)
    rest = p - hi
    mid = rest.to(tl.bfloat16).to(tl.float32)
    acc = tl.dot(hi, w, input_precision="tf32")
    acc = tl.dot(mid, w, acc, input_precision="tf32")
    return tl.dot(rest - mid, w, acc, input_precision="tf32")


@triton.jit
def block_scores_kernel(
    Q, KC, S, LSE,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    ssb, ssh, sst, ssn,
    slb, slh, slt,
    Tc, Ns, Hkv, t_start, C, scale_log2,
    G: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, SEL_BLOCK: tl.constexpr,
    N_INITIAL: tl.constexpr, N_LOCAL: tl.constexpr,
    DK: tl.constexpr, BLOCK_DK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    SEL_STEP: tl.constexpr, IEEE: tl.constexpr, HAS_LSE: tl.constexpr,
):
    """Scores of selection blocks for ``BLOCK_T`` queries of one KV head: ``-inf`` for blocks
    after the query's own, ``+inf`` for forced blocks, else the group's summed probability.

    Two passes over the compressed keys: the first finds each row's log-sum-exp (base 2), the
    second turns scores into probabilities and maps them onto selection blocks with a small
    product against the overlap weights (compressed block ``i`` and selection block ``j`` share
    ``|[i, i+r-1] & [j*l'/d, (j+1)*l'/d - 1]|`` stride-chunks of ``d`` tokens). With
    ``HAS_LSE`` the first pass is skipped: ``LSE (B, Hq, T)`` holds the compressed branch's
    natural log-sum-exp (``-inf`` for a query that sees no block), as FlexAttention returns it.
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    h = (bh % Hkv).to(tl.int64)
    M: tl.constexpr = BLOCK_T * BLOCK_G
    R: tl.constexpr = CMP_BLOCK // CMP_STRIDE
    PER_SEL: tl.constexpr = SEL_BLOCK // CMP_STRIDE

    rows = tl.arange(0, M)
    local = pid * BLOCK_T + rows // BLOCK_G
    tok = t_start + local
    g = rows % BLOCK_G
    row_ok = (g < G) & (local < C)
    dk = tl.arange(0, BLOCK_DK)
    dk_ok = dk < DK
    q = tl.load(Q + b * sqb + (h * G + g)[:, None] * sqh + tok.to(tl.int64)[:, None] * sqt + dk[None, :] * sqd,
                mask=row_ok[:, None] & dk_ok[None, :], other=0.0)
    kc_ptr = KC + b * skb + h * skh

    t_last = t_start + tl.minimum(pid * BLOCK_T + BLOCK_T, C) - 1
    n_vis = tl.where(t_last >= CMP_BLOCK - 1, (t_last - (CMP_BLOCK - 1)) // CMP_STRIDE + 1, 0)
    n_vis = tl.minimum(n_vis, Tc)
    c = tl.arange(0, BLOCK_C)

    if HAS_LSE:
        lse = tl.load(LSE + b * slb + (h * G + g) * slh + tok.to(tl.int64) * slt, mask=row_ok, other=float("inf"))
        # natural log to base 2; a row that sees nothing, or NaN: +inf, so that every p below is 0
        lse = tl.where((lse == float("-inf")) | (lse != lse), float("inf"), lse * 1.4426950408889634)
    else:
        # pass 1: log-sum-exp of each row over its visible compressed blocks
        m = tl.full([M], float("-inf"), tl.float32)
        acc = tl.zeros([M], tl.float32)
        for c0 in range(0, n_vis, BLOCK_C):
            i = c0 + c
            s = _qk(q, kc_ptr, skt, skd, i, dk, i < Tc, dk_ok, IEEE) * scale_log2
            vis = ((i * CMP_STRIDE + CMP_BLOCK - 1)[None, :] <= tok[:, None]) & (i < Tc)[None, :]
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            acc = acc * tl.exp2(m - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
            m = m_new
        # a row that sees nothing, or whose visible scores hold a NaN (or +inf): +inf, so that it
        # scores 0 everywhere, as select_blocks' PyTorch path scores it
        lse = tl.where((m == float("-inf")) | (acc != acc), float("inf"), m + tl.log2(tl.where(acc > 0, acc, 1.0)))

    # pass 2: probabilities -> selection blocks j0 .. j0 + SEL_STEP - 1 per step
    tt = t_start + pid * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = tt < t_start + C
    cur = tt // SEL_BLOCK
    jb = tl.arange(0, BLOCK_S)
    s_base = S + b * ssb + h * ssh + (tt - t_start).to(tl.int64)[:, None] * sst
    for j0 in range(0, t_last // SEL_BLOCK + 1, SEL_STEP):
        i = j0 * PER_SEL - (R - 1) + c
        i_ok = (i >= 0) & (i < Tc)
        s = _qk(q, kc_ptr, skt, skd, i, dk, i_ok, dk_ok, IEEE) * scale_log2
        vis = ((i * CMP_STRIDE + CMP_BLOCK - 1)[None, :] <= tok[:, None]) & i_ok[None, :] & row_ok[:, None]
        p = tl.where(vis & (lse < float("inf"))[:, None], tl.exp2(s - lse[:, None]), 0.0)
        j = j0 + jb
        lo = tl.maximum(i[:, None], (j * PER_SEL)[None, :])
        hi = tl.minimum(i[:, None] + R - 1, (j * PER_SEL + PER_SEL - 1)[None, :])
        w = tl.maximum(hi - lo + 1, 0).to(tl.float32)
        w = tl.where((jb < SEL_STEP)[None, :], w, 0.0)
        per_row = _split_dot(p, w)  # (M, BLOCK_S)
        imp = tl.sum(tl.reshape(per_row, [BLOCK_T, BLOCK_G, BLOCK_S]), 1)
        cand = j[None, :] <= cur[:, None]
        forced = cand & ((j[None, :] < N_INITIAL) | (j[None, :] > cur[:, None] - N_LOCAL))
        val = tl.where(forced, float("inf"), tl.where(cand, imp, float("-inf")))
        tl.store(s_base + j[None, :] * ssn, val, mask=t_ok[:, None] & ((jb < SEL_STEP) & (j < Ns))[None, :])


@triton.jit
def _packed(vals, j, ok, Ns):
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
           ONE_TILE: tl.constexpr):
    """The ``N_SEL`` best of ``keys[0 .. cur]`` (distinct integers from :func:`_packed`) as
    block indices, ``-1`` for empty slots: round ``r`` takes the largest key below round
    ``r - 1``'s. With ``ONE_TILE`` the keys stay in registers; otherwise every round reads
    them again."""
    NONE: tl.constexpr = -9223372036854775807 - 1
    slot = tl.arange(0, BLOCK_SEL)
    chosen = tl.full([BLOCK_SEL], -1, tl.int32)
    jn = tl.arange(0, BLOCK_NS)
    below = tl.full([], 9223372036854775807, tl.int64)
    if ONE_TILE:
        key = _packed(tl.load(KEYS + jn, mask=jn <= cur, other=0.0), jn, jn <= cur, Ns)
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
                key = _packed(tl.load(KEYS + jj, mask=jj <= cur, other=0.0), jj, jj <= cur, Ns)
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
    S, IDX,
    ssb, ssh, sst, ssn,
    sib, sih, sit, sin,
    Ns, Hkv, t_start, SEL_BLOCK: tl.constexpr, N_SEL: tl.constexpr, BLOCK_SEL: tl.constexpr,
    BLOCK_NS: tl.constexpr, ONE_TILE: tl.constexpr,
):
    """Top-n of the scores of :func:`block_scores_kernel`: program ``(c, b*Hkv + h)`` ranks the
    candidate blocks ``0 .. t // l'`` of query ``t = t_start + c`` (an exact tie to the lower
    block, ``+inf`` forced blocks first) and writes the chosen ones to ``IDX[b, h, c]``,
    ascending, then ``-1``. ``S`` must be ``ssn``-contiguous along the blocks (``ssn == 1``)."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    h = (bh % Hkv).to(tl.int64)
    cur = tl.minimum((t_start + c) // SEL_BLOCK, Ns - 1)
    row = S + b * ssb + h * ssh + c.to(tl.int64) * sst
    chosen = _top_n(row, cur, Ns, N_SEL, BLOCK_SEL, BLOCK_NS, ONE_TILE)
    slot = tl.arange(0, BLOCK_SEL)
    rank = _ascending_rank(chosen, Ns, N_SEL, BLOCK_SEL)
    tl.store(IDX + b * sib + h * sih + c.to(tl.int64) * sit + rank * sin, chosen, mask=slot < N_SEL)
