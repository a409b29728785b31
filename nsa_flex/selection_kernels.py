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
def block_scores_kernel(
    Q, KC, S,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    ssb, ssh, sst, ssn,
    Tc, Ns, Hkv, t_start, C, scale_log2,
    G: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, SEL_BLOCK: tl.constexpr,
    N_INITIAL: tl.constexpr, N_LOCAL: tl.constexpr,
    DK: tl.constexpr, BLOCK_DK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    SEL_STEP: tl.constexpr, IEEE: tl.constexpr,
):
    """Scores of selection blocks for ``BLOCK_T`` queries of one KV head: ``-inf`` for blocks
    after the query's own, ``+inf`` for forced blocks, else the group's summed probability.

    Two passes over the compressed keys: the first finds each row's log-sum-exp (base 2), the
    second turns scores into probabilities and maps them onto selection blocks with a small
    product against the overlap weights (compressed block ``i`` and selection block ``j`` share
    ``|[i, i+r-1] & [j*l'/d, (j+1)*l'/d - 1]|`` stride-chunks of ``d`` tokens).
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
    # a row that sees nothing: +inf, so that every p below is 0
    lse = tl.where(m == float("-inf"), float("inf"), m + tl.log2(tl.where(acc > 0, acc, 1.0)))

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
        p = tl.where(vis, tl.exp2(s - lse[:, None]), 0.0)
        j = j0 + jb
        lo = tl.maximum(i[:, None], (j * PER_SEL)[None, :])
        hi = tl.minimum(i[:, None] + R - 1, (j * PER_SEL + PER_SEL - 1)[None, :])
        w = tl.maximum(hi - lo + 1, 0).to(tl.float32)
        w = tl.where((jb < SEL_STEP)[None, :], w, 0.0)
        # exact float32 products: TF32 would round the probabilities the top-n compares
        per_row = tl.dot(p, w, input_precision="ieee")  # (M, BLOCK_S)
        imp = tl.sum(tl.reshape(per_row, [BLOCK_T, BLOCK_G, BLOCK_S]), 1)
        cand = j[None, :] <= cur[:, None]
        forced = cand & ((j[None, :] < N_INITIAL) | (j[None, :] > cur[:, None] - N_LOCAL))
        val = tl.where(forced, float("inf"), tl.where(cand, imp, float("-inf")))
        tl.store(s_base + j[None, :] * ssn, val, mask=t_ok[:, None] & ((jb < SEL_STEP) & (j < Ns))[None, :])
