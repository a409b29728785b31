"""Triton kernel of one decode step (one new token per row): the three NSA branches and the
block selection between them, in one program per (row, KV head). Kernel only; the launch code
lives in ``cache.py`` (``decode_step(..., fused=True)``).

Layout: ``q (B, Hq, 1, Dk)``; the cache's ``k (B, Hkv, L+1, Dk)``, ``v (B, Hkv, L+1, Dv)``,
``k_cmp (B, Hkv, Lc+1, Dk)`` float32, ``v_cmp (B, Hkv, Lc+1, Dv)``; ``lengths (B,)`` with the
new token already written at position ``lengths[b]``. The row tile is the ``G`` query heads of
the KV head, padded to ``BLOCK_G`` (at least 16). Every product is a float32 one
(``input_precision="ieee"``), as the PyTorch decode path computes in float32.
"""

import triton
import triton.language as tl

from .triton_kernels import _load_rows


@triton.jit
def _rows(ptr, stride_row, stride_col, rows, cols, row_mask, col_mask):
    """The selected-branch kernels' tile load, widened to float32 (every product here is one)."""
    return _load_rows(ptr, stride_row, stride_col, rows, cols, row_mask, col_mask).to(tl.float32)


@triton.jit
def _attend_keys(q, acc, m, l, k_base, v_base, skt, skd, svt, svd, pos, ok, dk, dv, dk_ok, dv_ok, scale_log2):
    """One online-softmax step of the G rows over keys ``pos`` (``ok`` masks them)."""
    kt = _rows(k_base, skt, skd, pos, dk, ok, dk_ok)
    vt = _rows(v_base, svt, svd, pos, dv, ok, dv_ok)
    s = tl.dot(q, tl.trans(kt), input_precision="ieee") * scale_log2
    s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m - m_safe)
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p, vt, input_precision="ieee")
    return acc, m_new, l


@triton.jit
def _store_rows(ptr, stride_row, rows, cols, row_ok, col_ok, acc, l):
    out = tl.where((l > 0)[:, None], acc / tl.where(l > 0, l, 1.0)[:, None], 0.0)
    tl.store(ptr + rows[:, None] * stride_row + cols[None, :], out, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def decode_kernel(
    Q, K, V, KC, VC, LEN, SCORES, IDX, OC, OS, OW,
    sqb, sqh, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    skcb, skch, skct, skcd,
    svcb, svch, svct, svcd,
    ssb, ssh,
    sib, sih,
    sob, soh,
    Hkv, Tc, Ns, scale_log2,
    G: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, SEL_BLOCK: tl.constexpr,
    N_SEL: tl.constexpr, N_INITIAL: tl.constexpr, N_LOCAL: tl.constexpr, WINDOW: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, SEL_STEP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_SEL: tl.constexpr,
    BLOCK_NS: tl.constexpr,
):
    bh = tl.program_id(0)
    b = (bh // Hkv).to(tl.int64)
    h = (bh % Hkv).to(tl.int64)
    R: tl.constexpr = CMP_BLOCK // CMP_STRIDE
    PER_SEL: tl.constexpr = SEL_BLOCK // CMP_STRIDE
    # the new token's position; int32 so that every index below (and the loop-carried best_j)
    # keeps one type, as compiled Triton requires
    t = tl.load(LEN + b).to(tl.int32)
    g = tl.arange(0, BLOCK_G)
    g_ok = g < G
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    dk_ok, dv_ok = dk < DK, dv < DV
    q = _rows(Q + b * sqb + h * G * sqh, sqh, sqd, g, dk, g_ok, dk_ok)
    kc_base = KC + b * skcb + h * skch
    vc_base = VC + b * svcb + h * svch
    c = tl.arange(0, BLOCK_C)

    # Compressed branch: blocks whose last token i*d + l - 1 <= t.
    n_vis = tl.where(t >= CMP_BLOCK - 1, (t - (CMP_BLOCK - 1)) // CMP_STRIDE + 1, 0)
    n_vis = tl.minimum(n_vis, Tc)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    for c0 in range(0, n_vis, BLOCK_C):
        acc, m, l = _attend_keys(q, acc, m, l, kc_base, vc_base, skct, skcd, svct, svcd, c0 + c,
                                 c0 + c < n_vis, dk, dv, dk_ok, dv_ok, scale_log2)
    o_base = b * sob + h * G * soh
    _store_rows(OC + o_base, soh, g, dv, g_ok, dv_ok, acc, l)
    lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), float("inf"))  # +inf: every p is 0

    # Scores of the selection blocks j <= t // l' (eqs. 8-10), +inf for forced ones, into a
    # scratch row: the group's probabilities mapped by token overlap, a step of blocks at a time.
    # (clamped: a replay that outran max_len has t = L, whose block may be past the last)
    cur = tl.minimum(t // SEL_BLOCK, Ns - 1)
    jb = tl.arange(0, BLOCK_S)
    s_row = SCORES + b * ssb + h * ssh
    for j0 in range(0, cur + 1, SEL_STEP):
        i = j0 * PER_SEL - (R - 1) + c
        i_ok = (i >= 0) & (i < n_vis)
        kc = _rows(kc_base, skct, skcd, i, dk, i_ok, dk_ok)
        s = tl.dot(q, tl.trans(kc), input_precision="ieee") * scale_log2
        p = tl.where(i_ok[None, :] & g_ok[:, None], tl.exp2(s - lse[:, None]), 0.0)
        j = j0 + jb
        lo = tl.maximum(i[:, None], (j * PER_SEL)[None, :])
        hi = tl.minimum(i[:, None] + R - 1, (j * PER_SEL + PER_SEL - 1)[None, :])
        w = tl.where((jb < SEL_STEP)[None, :], tl.maximum(hi - lo + 1, 0).to(tl.float32), 0.0)
        imp = tl.sum(tl.dot(p, w, input_precision="ieee"), 0)  # (BLOCK_S,)
        forced = (j < N_INITIAL) | (j > cur - N_LOCAL)
        tl.store(s_row + j, tl.where(forced, float("inf"), imp), mask=(jb < SEL_STEP) & (j <= cur))
    tl.debug_barrier()

    # Top-n over the candidates: the highest score, the lower block on an exact tie, n times.
    slot = tl.arange(0, BLOCK_SEL)
    chosen = tl.full([BLOCK_SEL], -1, tl.int32)
    jn = tl.arange(0, BLOCK_NS)
    for r in range(N_SEL):
        best_v = tl.full([], float("-inf"), tl.float32)
        best_j = tl.zeros([], tl.int32) + Ns
        for j0 in range(0, cur + 1, BLOCK_NS):
            j = j0 + jn
            vals = tl.load(s_row + j, mask=j <= cur, other=float("-inf"))
            v_max = tl.max(vals, 0)
            j_at = tl.min(tl.where(vals == v_max, j, Ns), 0)
            better = (v_max > best_v) | ((v_max == best_v) & (j_at < best_j))
            best_j = tl.where(better, j_at, best_j)
            best_v = tl.where(better, v_max, best_v)
        found = best_v > float("-inf")
        chosen = tl.where(slot == r, tl.where(found, best_j, -1), chosen)
        tl.store(s_row + best_j, float("-inf"), mask=found)
        tl.debug_barrier()
    # ascending, -1 last (as select_blocks returns them)
    chosen = tl.sort(tl.where(chosen >= 0, chosen, Ns))
    chosen = tl.where(chosen < Ns, chosen, -1)
    tl.store(IDX + b * sib + h * sih + slot, chosen, mask=slot < N_SEL)

    # Selected branch: the tokens <= t of the chosen blocks.
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    n = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    for r in range(N_SEL):
        j = tl.sum(tl.where(slot == r, chosen, 0), 0)
        for off in range(0, SEL_BLOCK, BLOCK_N):
            pos = j * SEL_BLOCK + off + n
            ok = (off + n < SEL_BLOCK) & (pos <= t) & (pos >= 0)  # j = -1 (no block): pos < 0
            acc, m, l = _attend_keys(q, acc, m, l, k_base, v_base, skt, skd, svt, svd, pos, ok,
                                     dk, dv, dk_ok, dv_ok, scale_log2)
    _store_rows(OS + o_base, soh, g, dv, g_ok, dv_ok, acc, l)

    # Sliding window: keys t - w < s <= t.
    first = tl.maximum(t - (WINDOW - 1), 0)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    for s0 in range(0, WINDOW, BLOCK_N):
        pos = first + s0 + n
        acc, m, l = _attend_keys(q, acc, m, l, k_base, v_base, skt, skd, svt, svd, pos,
                                 (s0 + n < WINDOW) & (pos <= t), dk, dv, dk_ok, dv_ok, scale_log2)
    _store_rows(OW + o_base, soh, g, dv, g_ok, dv_ok, acc, l)
