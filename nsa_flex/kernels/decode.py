"""Triton kernels of one decode step (one new token per row), split flash-decoding style so that
a single row still spreads over the whole GPU. ``@triton.jit`` functions only; the launch code
and the scratch buffers are ``nsa_flex.inference.decode_fused``, the split counts and tiles
``nsa_flex.tuning``.

Layout: ``q (B, Hq, 1, Dk)``; the new token's ``k_new (B, Hkv, 1, Dk)``, ``v_new (B, Hkv, 1,
Dv)``; the cache's ``k (B, Hkv, L+1, Dk)``, ``v (B, Hkv, L+1, Dv)``, ``k_cmp (B, Hkv, Lc+1,
Dk)``, ``v_cmp (B, Hkv, Lc+1, Dv)``; ``lengths (B,)``, the new token's position ``t`` (clamped to
``L``, the spare slot). A program's row tile is the ``G`` query heads of one KV head, padded to
``BLOCK_G`` (at least 16, ``tl.dot``'s smallest). Scratch, float32 and contiguous, ``R = B*Hkv``:
``logits (R, G, Tc)``, ``keys (R, Ns)``, and the partial softmax states of ``P`` slots per row,
``part_m, part_l (R, P, G)`` (running max and sum, base 2) and ``part_acc (R, P, G, Dv)``
(unnormalised output). Slots ``0 .. S1-1`` are the compressed branch's splits, then ``n``
selected blocks, then ``NW`` window tiles.

The step, four launches:

1. :func:`compressed_split_kernel`, grid ``(R, S1)``: split ``s`` attends the ``s``-th of ``S1``
   equal slices of the row's visible compressed blocks, writes its partial state and the scaled
   logits ``q . k_cmp`` of its slice. Split 0 writes the new token's K/V into the cache; with
   mean compression the split that owns a block completed by the new token computes it first.
2. :func:`block_keys_kernel`, grid ``(R, S2)``: each program combines the compressed splits'
   ``(m, l)`` into the log-sum-exp, and turns a slice of candidate selection blocks' logits into
   importances (paper eqs. 8-10): ``+inf`` for forced blocks.
3. :func:`sparse_split_kernel`, grid ``(R, n + NW)``: program ``r < n`` ranks the row's keys
   (top-n, an exact tie to the lower block) and attends the ``r``-th chosen block; the rest
   attend one tile of the sliding window each.
4. :func:`combine_kernel`, grid ``(B*Hq,)``: merges each branch's partial states, mixes the
   three with the gates, writes the output in ``q``'s dtype and advances ``lengths``.

Products: float32 inputs multiply in float32 (``input_precision="ieee"``); float16/bfloat16
multiply natively with float32 accumulation. The importances keep float32's precision
(``kernels.primitives._split_dot``).
"""

import triton
import triton.language as tl

from .primitives import _batch_head, _dot, _forced, _last_token, _load_rows, _num_visible, _overlap_weights, _split_dot
from .top_n import _ascending_rank, _top_n


@triton.jit
def _softmax_step(s, ok, acc, m, l, v, IEEE: tl.constexpr):
    """One online-softmax step of the row tile over a key tile: scores ``s`` (base 2), keys
    ``ok``, values ``v``."""
    s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m - m_safe)
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
    return acc, m_new, l


@triton.jit
def _store_partial(PM, PL, PACC, slot_row, g, dv, g_ok, dv_ok, acc, m, l, G: tl.constexpr, DV: tl.constexpr):
    """Partial state of the ``G`` rows into slot ``slot_row = row * P + slot``."""
    base = slot_row * G + g
    tl.store(PM + base, m, mask=g_ok)
    tl.store(PL + base, l, mask=g_ok)
    tl.store(PACC + base[:, None] * DV + dv[None, :], acc, mask=g_ok[:, None] & dv_ok[None, :])


@triton.jit
def _position(LEN, b, L):
    # int32, so that loop-carried indices keep one type under compiled Triton
    return tl.minimum(tl.load(LEN + b), L).to(tl.int32)


@triton.jit
def _mean_block(base, new_ptr, s_row, s_col, s_new, t, cols, cols_ok, CMP_BLOCK: tl.constexpr, BLOCK_L: tl.constexpr):
    """The mean of tokens ``t - l + 1 .. t``: the cached ones and the new token at ``t``."""
    rows = t - (CMP_BLOCK - 1) + tl.arange(0, BLOCK_L)
    old = _load_rows(base, s_row, s_col, rows, cols, rows < t, cols_ok).to(tl.float32)
    new = tl.load(new_ptr + cols * s_new, mask=cols_ok, other=0.0).to(tl.float32)
    return (tl.sum(old, 0) + new) / CMP_BLOCK


@triton.jit
def _attend_tokens(
    Q, K, V, KN, VN, b, h, sknb, sknh, sknd, svnb, svnh, svnd,
    sqb, sqh, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
    start, span, t, scale_log2,
    G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, TILE: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, NEW_FROM_INPUTS: tl.constexpr,
    IEEE: tl.constexpr,
):
    """The partial state ``(acc, m, l)`` of the ``G`` query heads of KV head ``h`` of row ``b``
    over the cached tokens ``start .. start + span - 1`` (``span <= TILE``) that lie in ``[0, t]``.
    With ``NEW_FROM_INPUTS`` the token at ``t`` is the step's ``KN``/``VN`` (a kernel that may run
    before the cache holds it)."""
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    dk_ok, dv_ok = dk < DK, dv < DV
    g = tl.arange(0, BLOCK_G)
    q = _load_rows(Q + b * sqb + h * G * sqh, sqh, sqd, g, dk, g < G, dk_ok)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    if NEW_FROM_INPUTS:
        kn = tl.load(KN + b * sknb + h * sknh + dk * sknd, mask=dk_ok, other=0.0)
        vn = tl.load(VN + b * svnb + h * svnh + dv * svnd, mask=dv_ok, other=0.0)
    n = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    for off in range(0, TILE, BLOCK_N):
        pos = start + off + n
        ok = (off + n < span) & (pos >= 0) & (pos <= t)
        if NEW_FROM_INPUTS:
            kt = _load_rows(k_base, skt, skd, pos, dk, ok & (pos != t), dk_ok)
            vt = _load_rows(v_base, svt, svd, pos, dv, ok & (pos != t), dv_ok)
            kt = tl.where((pos == t)[:, None], kn[None, :], kt)
            vt = tl.where((pos == t)[:, None], vn[None, :], vt)
        else:
            kt = _load_rows(k_base, skt, skd, pos, dk, ok, dk_ok)
            vt = _load_rows(v_base, svt, svd, pos, dv, ok, dv_ok)
        s = _dot(q, tl.trans(kt), IEEE) * scale_log2
        acc, m, l = _softmax_step(s, ok, acc, m, l, vt, IEEE)
    return acc, m, l


@triton.jit
def _compressed_split(
    Q, K, V, KN, VN, KC, VC, LEN, LOGITS, row, split, n_split,
    sqb, sqh, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    sknb, sknh, sknd,
    svnb, svnh, svnd,
    skcb, skch, skct, skcd,
    svcb, svch, svct, svcd,
    Hkv, L, Tc, scale_log2,
    G: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_L: tl.constexpr, WRITE_NEW: tl.constexpr, MEAN: tl.constexpr, IEEE: tl.constexpr,
):
    """Split ``split`` of ``n_split`` of a row's compressed branch (:func:`compressed_split_kernel`):
    its partial state ``(acc, m, l)``, the logits of its slice stored."""
    b, h = _batch_head(row, Hkv)
    t = _position(LEN, b, L)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    dk_ok, dv_ok = dk < DK, dv < DV
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    kc_base = KC + b * skcb + h * skch
    vc_base = VC + b * svcb + h * svch
    kn_ptr = KN + b * sknb + h * sknh
    vn_ptr = VN + b * svnb + h * svnh
    if WRITE_NEW:
        if split == 0:  # later kernels read the new token from the cache
            tl.store(k_base + t * skt + dk * skd, tl.load(kn_ptr + dk * sknd, mask=dk_ok), mask=dk_ok)
            tl.store(v_base + t * svt + dv * svd, tl.load(vn_ptr + dv * svnd, mask=dv_ok), mask=dv_ok)

    # this split's slice of the visible compressed blocks: equal shares of what the row holds now
    n_vis = _num_visible(t, Tc, CMP_BLOCK, CMP_STRIDE)
    chunk = tl.cdiv(n_vis, n_split)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, n_vis)
    # A block that the new token completes is the last visible one. Its owner computes it (from
    # the cached tokens and the new one: split 0 may not have written that yet), stores it for
    # later steps, and uses it from registers.
    i_new = tl.zeros([], tl.int32) - 1
    kc_new = tl.zeros([BLOCK_DK], KC.dtype.element_ty)
    vc_new = tl.zeros([BLOCK_DV], VC.dtype.element_ty)
    if MEAN:
        last = n_vis - 1
        if (n_vis > 0) & (_last_token(last, CMP_BLOCK, CMP_STRIDE) == t) & (last >= lo) & (last < hi):
            kc_new = _mean_block(k_base, kn_ptr, skt, skd, sknd, t, dk, dk_ok, CMP_BLOCK, BLOCK_L).to(KC.dtype.element_ty)
            vc_new = _mean_block(v_base, vn_ptr, svt, svd, svnd, t, dv, dv_ok, CMP_BLOCK, BLOCK_L).to(VC.dtype.element_ty)
            tl.store(kc_base + last * skct + dk * skcd, kc_new, mask=dk_ok)
            tl.store(vc_base + last * svct + dv * svcd, vc_new, mask=dv_ok)
            i_new = last

    g = tl.arange(0, BLOCK_G)
    g_ok = g < G
    q = _load_rows(Q + b * sqb + h * G * sqh, sqh, sqd, g, dk, g_ok, dk_ok)
    logit_rows = LOGITS + (row.to(tl.int64) * G + g[:, None]) * Tc
    c = tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    for c0 in range(lo, hi, BLOCK_C):
        i = c0 + c
        ok = i < hi
        kc = _load_rows(kc_base, skct, skcd, i, dk, ok & (i != i_new), dk_ok)
        vc = _load_rows(vc_base, svct, svcd, i, dv, ok & (i != i_new), dv_ok)
        if MEAN:
            kc = tl.where((i == i_new)[:, None], kc_new[None, :], kc)
            vc = tl.where((i == i_new)[:, None], vc_new[None, :], vc)
        kc, vc = kc.to(q.dtype), vc.to(q.dtype)
        s = _dot(q, tl.trans(kc), IEEE) * scale_log2
        tl.store(logit_rows + i[None, :], s, mask=g_ok[:, None] & ok[None, :])
        acc, m, l = _softmax_step(s, ok, acc, m, l, vc, IEEE)
    return acc, m, l


@triton.jit
def compressed_split_kernel(
    Q, K, V, KN, VN, KC, VC, LEN, LOGITS, PM, PL, PACC,
    sqb, sqh, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    sknb, sknh, sknd,
    svnb, svnh, svnd,
    skcb, skch, skct, skcd,
    svcb, svch, svct, svcd,
    Hkv, L, Tc, P, scale_log2,
    G: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_L: tl.constexpr, WRITE_NEW: tl.constexpr, MEAN: tl.constexpr, IEEE: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    acc, m, l = _compressed_split(
        Q, K, V, KN, VN, KC, VC, LEN, LOGITS, row, split, tl.num_programs(1),
        sqb, sqh, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sknb, sknh, sknd, svnb, svnh, svnd,
        skcb, skch, skct, skcd, svcb, svch, svct, svcd, Hkv, L, Tc, scale_log2,
        G, CMP_BLOCK, CMP_STRIDE, DK, DV, BLOCK_G, BLOCK_C, BLOCK_DK, BLOCK_DV, BLOCK_L, WRITE_NEW, MEAN, IEEE,
    )
    g = tl.arange(0, BLOCK_G)
    dv = tl.arange(0, BLOCK_DV)
    _store_partial(PM, PL, PACC, row.to(tl.int64) * P + split, g, dv, g < G, dv < DV, acc, m, l, G, DV)


@triton.jit
def _splits_lse(PM, PL, slot0, S1, g, g_ok, BLOCK_S1: tl.constexpr, G: tl.constexpr):
    """Log-sum-exp (base 2) of heads ``g`` over all visible compressed blocks, from the states
    of the ``S1`` splits in slots ``slot0 ..``; ``+inf`` for a head that sees none, so that every
    probability taken from it is 0 (NaN too, as a head whose visible logits hold a NaN:
    select_blocks scores such a row 0)."""
    sp = tl.arange(0, BLOCK_S1)
    part = (slot0 + sp[:, None]) * G + g[None, :]
    part_ok = (sp < S1)[:, None] & g_ok[None, :]
    pm = tl.load(PM + part, mask=part_ok, other=float("-inf"))
    pl = tl.load(PL + part, mask=part_ok, other=0.0)
    mx = tl.max(pm, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    total = tl.sum(pl * tl.exp2(pm - mx[None, :]), 0)
    return tl.where(total > 0, mx + tl.log2(tl.where(total > 0, total, 1.0)), float("inf"))


@triton.jit
def block_keys_kernel(
    LEN, LOGITS, PM, PL, KEYS,
    Hkv, L, Tc, Ns, P, S1,
    G: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, SEL_BLOCK: tl.constexpr,
    N_INITIAL: tl.constexpr, N_LOCAL: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_S1: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    SEL_STEP: tl.constexpr,
):
    """Keys of the candidate selection blocks ``j <= t // l'``: the group's summed probability
    mapped by token overlap, ``+inf`` for forced blocks. Program ``s`` takes the ``s``-th equal
    slice of the candidates, ``SEL_STEP`` blocks (``BLOCK_C`` compressed logits) at a time:
    compressed block ``i`` and selection block ``j`` share ``|[i, i+r-1] & [j*l'/d,
    (j+1)*l'/d - 1]|`` stride-chunks of ``d`` tokens, a small product at float32's precision
    (``kernels.primitives._split_dot``)."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    n_split = tl.num_programs(1)
    b = (row // Hkv).to(tl.int64)
    R: tl.constexpr = CMP_BLOCK // CMP_STRIDE
    PER_SEL: tl.constexpr = SEL_BLOCK // CMP_STRIDE
    t = _position(LEN, b, L)
    n_vis = _num_visible(t, Tc, CMP_BLOCK, CMP_STRIDE)
    # (clamped: a replay that outran max_len has t = L, whose block may be past the last)
    cur = tl.minimum(t // SEL_BLOCK, Ns - 1)

    g = tl.arange(0, BLOCK_G)
    g_ok = g < G
    lse = _splits_lse(PM, PL, row.to(tl.int64) * P, S1, g, g_ok, BLOCK_S1, G)

    n_cand = cur + 1
    chunk = tl.cdiv(tl.cdiv(n_cand, SEL_STEP), n_split) * SEL_STEP  # whole steps
    lo = split * chunk
    hi = tl.minimum(lo + chunk, n_cand)
    logit_rows = LOGITS + (row.to(tl.int64) * G + g[:, None]) * Tc
    c = tl.arange(0, BLOCK_C)
    jb = tl.arange(0, BLOCK_S)
    for j0 in range(lo, hi, SEL_STEP):
        i = j0 * PER_SEL - (R - 1) + c
        i_ok = (i >= 0) & (i < n_vis)
        ok = g_ok[:, None] & i_ok[None, :]
        s = tl.load(logit_rows + i[None, :], mask=ok, other=float("-inf"))
        # (a head with lse = +inf scores 0 even where its logit is NaN or +inf)
        p = tl.where(ok & (lse < float("inf"))[:, None], tl.exp2(s - lse[:, None]), 0.0)
        j = j0 + jb
        w = _overlap_weights(i, j, jb, R, PER_SEL, SEL_STEP)
        imp = tl.sum(_split_dot(p, w), 0)  # (BLOCK_S,), as the full forward's scoring kernel
        forced = _forced(j, cur, N_INITIAL, N_LOCAL)
        tl.store(KEYS + row.to(tl.int64) * Ns + j, tl.where(forced, float("inf"), imp),
                 mask=(jb < SEL_STEP) & (j < hi))


@triton.jit
def sparse_split_kernel(
    Q, K, V, LEN, KEYS, IDX, PM, PL, PACC,
    sqb, sqh, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    Hkv, L, Ns, P, S1, scale_log2,
    G: tl.constexpr, SEL_BLOCK: tl.constexpr, N_SEL: tl.constexpr, WINDOW: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, TILE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_SEL: tl.constexpr, BLOCK_NS: tl.constexpr, ONE_TILE: tl.constexpr, IEEE: tl.constexpr,
):
    """Program ``r < N_SEL``: the chosen block of rank ``r`` (ascending), its tokens ``<= t``;
    program ``N_SEL + w``: window tokens ``t - W + 1 + w*TILE ..`` (at most ``TILE``, ``<= t``)."""
    row = tl.program_id(0)
    r = tl.program_id(1)
    b, h = _batch_head(row, Hkv)
    t = _position(LEN, b, L)

    j = tl.zeros([], tl.int32) - 1
    if r < N_SEL:
        cur = tl.minimum(t // SEL_BLOCK, Ns - 1)
        chosen = _top_n(KEYS + row.to(tl.int64) * Ns, cur, Ns, N_SEL, BLOCK_SEL, BLOCK_NS, ONE_TILE, "")
        # ascending order: each block's rank among the chosen
        slot = tl.arange(0, BLOCK_SEL)
        rank = _ascending_rank(chosen, Ns, N_SEL, BLOCK_SEL)
        if r == 0:
            tl.store(IDX + row.to(tl.int64) * N_SEL + rank, chosen, mask=slot < N_SEL)
        j = tl.sum(tl.where(rank == r, chosen, 0), 0)
    w_tile = r - N_SEL
    start = tl.where(r < N_SEL, j * SEL_BLOCK, t - (WINDOW - 1) + w_tile * TILE)
    span = tl.where(r < N_SEL, SEL_BLOCK, tl.minimum(TILE, WINDOW - w_tile * TILE))

    g = tl.arange(0, BLOCK_G)
    dv = tl.arange(0, BLOCK_DV)
    # (no block, j = -1: every position < 0)
    acc, m, l = _attend_tokens(Q, K, V, Q, Q, b, h, 0, 0, 0, 0, 0, 0, sqb, sqh, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
                               start, span, t, scale_log2, G, DK, DV, TILE, BLOCK_G, BLOCK_N, BLOCK_DK, BLOCK_DV,
                               False, IEEE)
    _store_partial(PM, PL, PACC, row.to(tl.int64) * P + S1 + r, g, dv, g < G, dv < DV, acc, m, l, G, DV)


@triton.jit
def _merge(PM, PL, PACC, slot_row0, lo, hi, G: tl.constexpr, DV: tl.constexpr, dv, dv_ok,
           BLOCK_DV: tl.constexpr, BLOCK_P: tl.constexpr):
    """One head's output from the partial states in slots ``lo .. hi - 1`` (0 if all are empty).
    ``slot_row0 * G`` addresses the head's entry of slot 0. Only empty rows (``l == 0``, whose
    ``acc`` is 0) are zeroed: a NaN that the visible keys brought (``l`` or ``acc`` NaN) stays,
    as in the forward."""
    sp = tl.arange(0, BLOCK_P)
    m = tl.full([], float("-inf"), tl.float32)
    l = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_DV], tl.float32)
    for p0 in range(lo, hi, BLOCK_P):
        ok = p0 + sp < hi
        at = slot_row0 + (p0 + sp) * G
        pm = tl.load(PM + at, mask=ok, other=float("-inf"))
        pl = tl.load(PL + at, mask=ok, other=0.0)
        pa = tl.load(PACC + at[:, None] * DV + dv[None, :], mask=ok[:, None] & dv_ok[None, :], other=0.0)
        m_new = tl.maximum(m, tl.max(pm, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.exp2(pm - m_safe)
        alpha = tl.exp2(m - m_safe)
        l = l * alpha + tl.sum(pl * w, 0)
        acc = acc * alpha + tl.sum(pa * w[:, None], 0)
        m = m_new
    return acc / tl.where(l == 0, 1.0, l)


@triton.jit
def combine_kernel(
    PM, PL, PACC, GATES, OUT, LEN,
    sgb, sgh, sgc,
    sob, soh, sod,
    Hq, L, P, S1,
    G: tl.constexpr, N_SEL: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_P: tl.constexpr,
    GATED: tl.constexpr,
):
    """One query head: the three branches from their slots, gated (eq. 5); then ``lengths[b]
    += 1``, stopping at ``L`` (a replay past max_len kept no token there), by head 0 of each
    row, after every kernel of the step has read it."""
    pid = tl.program_id(0)
    b = (pid // Hq).to(tl.int64)
    hq = (pid % Hq).to(tl.int64)
    dv = tl.arange(0, BLOCK_DV)
    dv_ok = dv < DV
    # the head's entry of slot 0 of its KV head's row, (row * P) * G + g, row = b*Hkv + hq // G
    slot_row0 = (b * (Hq // G) + hq // G) * P * G + hq % G
    o_cmp = _merge(PM, PL, PACC, slot_row0, 0, S1, G, DV, dv, dv_ok, BLOCK_DV, BLOCK_P)
    o_slc = _merge(PM, PL, PACC, slot_row0, S1, S1 + N_SEL, G, DV, dv, dv_ok, BLOCK_DV, BLOCK_P)
    o_swa = _merge(PM, PL, PACC, slot_row0, S1 + N_SEL, P, G, DV, dv, dv_ok, BLOCK_DV, BLOCK_P)
    if GATED:
        gp = GATES + b * sgb + hq * sgh
        out = (tl.load(gp).to(tl.float32) * o_cmp + tl.load(gp + sgc).to(tl.float32) * o_slc
               + tl.load(gp + 2 * sgc).to(tl.float32) * o_swa)
    else:
        out = o_cmp + o_slc + o_swa
    tl.store(OUT + b * sob + hq * soh + dv * sod, out.to(OUT.dtype.element_ty), mask=dv_ok)
    if hq == 0:
        tl.store(LEN + b, tl.minimum(tl.load(LEN + b) + 1, L))
