"""Triton kernel of block selection's scores: the compressed branch's softmax, moved onto
selection blocks and summed over the GQA group, without a ``T x Tc`` tensor. ``@triton.jit``
functions only; the launch code is ``nsa_flex.ops.scoring``, the top-n ``kernels.top_n``.

Layout: ``q (B, Hq, T, Dk)``, ``k_cmp (B, Hkv, Tc, Dk)``, scores ``(B, Hkv, C, Ns)`` float32 for
the ``C`` queries from ``t_start``. The row tile is ``BLOCK_T`` tokens times the ``G`` heads of a
group (padded to ``BLOCK_G``), so each compressed key tile is loaded once for the whole group.
"""

import triton
import triton.language as tl

from .primitives import _batch_head, _dot, _forced, _last_token, _load_rows, _num_visible, _overlap_weights, _split_dot


@triton.jit
def _qk(q, kc_ptr, skt, skd, i, dk, i_ok, dk_ok, IEEE: tl.constexpr):
    """Scores of the row tile ``q`` against compressed keys ``i`` (rows masked by ``i_ok``)."""
    return _dot(q, tl.trans(_load_rows(kc_ptr, skt, skd, i, dk, i_ok, dk_ok)), IEEE)


@triton.jit
def _score_document(
    q, lse, kc_ptr, s_base, skt, skd, ssn, pos, seg, t_pos, t_seg, last, Tc, Ns, scale_log2, dk, dk_ok,
    CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, SEL_BLOCK: tl.constexpr,
    N_INITIAL: tl.constexpr, N_LOCAL: tl.constexpr, M: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    SEL_STEP: tl.constexpr, IEEE: tl.constexpr, HAS_LSE: tl.constexpr,
):
    """The scores of the tile's rows that lie in one sequence (a packed row's document, or the
    whole row): ``pos`` (``M`` rows) and ``t_pos`` (``BLOCK_T`` tokens) count from its first
    token, ``seg``/``t_seg`` mark the rows and tokens that are its, ``last`` is the largest
    ``pos`` among them, ``kc_ptr`` points at its first compressed block and ``Tc`` counts its
    blocks. ``lse``: the rows' log-sum-exp (base 2) when ``HAS_LSE``."""
    R: tl.constexpr = CMP_BLOCK // CMP_STRIDE
    PER_SEL: tl.constexpr = SEL_BLOCK // CMP_STRIDE
    c = tl.arange(0, BLOCK_C)
    if not HAS_LSE:
        # pass 1: log-sum-exp of each row over its visible compressed blocks
        m = tl.full([M], float("-inf"), tl.float32)
        acc = tl.zeros([M], tl.float32)
        for c0 in range(0, _num_visible(last, Tc, CMP_BLOCK, CMP_STRIDE), BLOCK_C):
            i = c0 + c
            s = _qk(q, kc_ptr, skt, skd, i, dk, i < Tc, dk_ok, IEEE) * scale_log2
            vis = (_last_token(i, CMP_BLOCK, CMP_STRIDE)[None, :] <= pos[:, None]) & (i < Tc)[None, :]
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            acc = acc * tl.exp2(m - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
            m = m_new
        # a row that sees nothing, or whose visible scores hold a NaN (or +inf): +inf, so that it
        # scores 0 everywhere, as select_blocks' PyTorch path scores it
        lse = tl.where((m == float("-inf")) | (acc != acc), float("inf"), m + tl.log2(tl.where(acc > 0, acc, 1.0)))

    # pass 2: probabilities -> selection blocks j0 .. j0 + SEL_STEP - 1 per step
    cur = t_pos // SEL_BLOCK
    jb = tl.arange(0, BLOCK_S)
    for j0 in range(0, tl.maximum(last, 0) // SEL_BLOCK + 1, SEL_STEP):
        i = j0 * PER_SEL - (R - 1) + c
        i_ok = (i >= 0) & (i < Tc)
        s = _qk(q, kc_ptr, skt, skd, i, dk, i_ok, dk_ok, IEEE) * scale_log2
        vis = (_last_token(i, CMP_BLOCK, CMP_STRIDE)[None, :] <= pos[:, None]) & i_ok[None, :] & seg[:, None]
        p = tl.where(vis & (lse < float("inf"))[:, None], tl.exp2(s - lse[:, None]), 0.0)
        j = j0 + jb
        w = _overlap_weights(i, j, jb, R, PER_SEL, SEL_STEP)
        per_row = _split_dot(p, w)  # (M, BLOCK_S)
        imp = tl.sum(tl.reshape(per_row, [BLOCK_T, BLOCK_G, BLOCK_S]), 1)
        cand = j[None, :] <= cur[:, None]
        forced = cand & _forced(j[None, :], cur[:, None], N_INITIAL, N_LOCAL)
        val = tl.where(forced, float("inf"), tl.where(cand, imp, float("-inf")))
        tl.store(s_base + j[None, :] * ssn, val, mask=t_seg[:, None] & ((jb < SEL_STEP) & (j < Ns))[None, :])


@triton.jit
def block_scores_kernel(
    Q, KC, S, LSE, DOC, CU, CMP_CU,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    ssb, ssh, sst, ssn,
    slb, slh, slt,
    Tc, Ns, Hkv, t_start, C, scale_log2, q_pos0,
    G: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, SEL_BLOCK: tl.constexpr,
    N_INITIAL: tl.constexpr, N_LOCAL: tl.constexpr,
    DK: tl.constexpr, BLOCK_DK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    SEL_STEP: tl.constexpr, IEEE: tl.constexpr, HAS_LSE: tl.constexpr, VARLEN: tl.constexpr,
):
    """Scores of selection blocks for ``BLOCK_T`` queries of one KV head: ``-inf`` for blocks
    after the query's own, ``+inf`` for forced blocks, else the group's summed probability.

    Two passes over the compressed keys: the first finds each row's log-sum-exp (base 2), the
    second turns scores into probabilities and maps them onto selection blocks with a small
    product against the overlap weights (compressed block ``i`` and selection block ``j`` share
    ``|[i, i+r-1] & [j*l'/d, (j+1)*l'/d - 1]|`` stride-chunks of ``d`` tokens). With
    ``HAS_LSE`` the first pass is skipped: ``LSE (B, Hq, T)`` holds the compressed branch's
    natural log-sum-exp (``-inf`` for a query that sees no block), as FlexAttention returns it.

    ``VARLEN``: a packed row (``B = 1``). ``DOC (T,)`` is each token's document, ``CU (N+1,)``
    the documents' token offsets and ``CMP_CU (N+1,)`` their offsets in ``KC``; positions and
    block indices are doc-local. The tile's documents are scored one after another, each
    against its own compressed blocks, so that a tile may hold any number of them.
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = _batch_head(bh, Hkv)
    M: tl.constexpr = BLOCK_T * BLOCK_G

    rows = tl.arange(0, M)
    local = pid * BLOCK_T + rows // BLOCK_G
    tok = t_start + local
    g = rows % BLOCK_G
    row_ok = (g < G) & (local < C)
    dk = tl.arange(0, BLOCK_DK)
    dk_ok = dk < DK
    q_row = (tok - q_pos0).to(tl.int64)  # Q's (and LSE's) row 0 is position q_pos0
    q = tl.load(Q + b * sqb + (h * G + g)[:, None] * sqh + q_row[:, None] * sqt + dk[None, :] * sqd,
                mask=row_ok[:, None] & dk_ok[None, :], other=0.0)
    lse = tl.zeros([M], tl.float32)
    if HAS_LSE:
        lse = tl.load(LSE + b * slb + (h * G + g) * slh + q_row * slt, mask=row_ok, other=float("inf"))
        # natural log to base 2; a row that sees nothing, or NaN: +inf, so that every p below is 0
        lse = tl.where((lse == float("-inf")) | (lse != lse), float("inf"), lse * 1.4426950408889634)

    lt = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = lt < C
    tt = t_start + lt
    t_last = t_start + tl.minimum(pid * BLOCK_T + BLOCK_T, C) - 1
    s_base = S + b * ssb + h * ssh + lt.to(tl.int64)[:, None] * sst
    kc_ptr = KC + b * skb + h * skh
    if VARLEN:
        row_doc = tl.load(DOC + tok, mask=local < C, other=-1)
        t_doc = tl.load(DOC + tt, mask=t_ok, other=-1)
        for d in range(tl.load(DOC + t_start + pid * BLOCK_T), tl.load(DOC + t_last) + 1):
            first = tl.load(CU + d)
            c_first = tl.load(CMP_CU + d)
            last = tl.minimum(t_last, tl.load(CU + d + 1) - 1) - first
            _score_document(
                q, lse, kc_ptr + c_first.to(tl.int64) * skt, s_base, skt, skd, ssn, tok - first,
                row_ok & (row_doc == d), tt - first, t_ok & (t_doc == d), last,
                tl.load(CMP_CU + d + 1) - c_first, Ns, scale_log2, dk, dk_ok,
                CMP_BLOCK, CMP_STRIDE, SEL_BLOCK, N_INITIAL, N_LOCAL, M, BLOCK_T, BLOCK_G, BLOCK_C, BLOCK_S,
                SEL_STEP, IEEE, HAS_LSE,
            )
    else:
        _score_document(
            q, lse, kc_ptr, s_base, skt, skd, ssn, tok, row_ok, tt, t_ok, t_last, Tc, Ns, scale_log2, dk, dk_ok,
            CMP_BLOCK, CMP_STRIDE, SEL_BLOCK, N_INITIAL, N_LOCAL, M, BLOCK_T, BLOCK_G, BLOCK_C, BLOCK_S,
            SEL_STEP, IEEE, HAS_LSE,
        )
