"""Triton kernels of one decode step for many rows (``B * Hkv`` large): three launches that rank
each row's keys once and merge its partial states in the row's last program, where
:mod:`.decode`'s four launches rank them in every selected program and merge them in a
launch of their own. ``@triton.jit`` functions only; the launch code is
``nsa_flex.inference.decode_fused``, which picks between the two (``tuning.decode_batched``).

Layout as in :mod:`.decode` (``R = B*Hkv`` rows, the ``G`` query heads of a KV head a row
tile), except for the partial states: ``P = S1 + NW + n + 2`` slots per row, ``part_m, part_l
(R, P, G)``, ``part_acc (R, P, G, Dv)``: slots ``0 .. S1-1`` the compressed splits, then ``NW``
window tiles, ``n`` selected blocks, and the merged compressed and window states. ``arrivals``
(``NSACache._arrivals``), int32 ``(2R + B,)`` and zero between steps, counts the programs that
have finished a stage.

1. :func:`compressed_window_kernel`, grid ``(R, S1 + NW)``: program ``s < S1`` is
   :func:`.decode.compressed_split_kernel`'s split ``s`` (logits, partial state; split 0 writes
   the new token, the owner of a block it completes computes it); program ``S1 + w`` attends
   the ``w``-th tile of the sliding window, the new token taken from the inputs.
2. :func:`select_kernel`, grid ``(R, S2 + ceil(G / HEADS))``: programs ``s < S2`` turn the
   ``s``-th slice of the candidate blocks' logits into keys (as :mod:`.decode`'s
   ``block_keys_kernel``, by a banded sum instead of a product) and the row's last of them
   ranks all its keys (top-n, an exact tie to the lower block) and writes the chosen blocks,
   ascending; the others merge the compressed and the window states of ``HEADS`` heads each.
3. :func:`selected_combine_kernel`, grid ``(R, n)``: program ``r`` attends the ``r``-th chosen
   block; the row's last merges the three branches, gates them and writes the output; the last
   row of a batch entry advances ``lengths``.

"Last to finish": every program stores its results, then adds one to its row's count
(release and acquire at GPU scope, after a barrier of its own threads); the one that reads
``count - 1`` sees every other program's stores, reads them past L1 (``.cg``) and resets the
count for the next step.

Products as in :mod:`.decode`; the keys are float32 sums of exact products (the overlap weights
are small integers).
"""

import triton
import triton.language as tl

from .decode import _attend_tokens, _compressed_split, _position, _splits_lse, _store_partial
from .primitives import _batch_head, _forced, _num_visible
from .top_n import _ascending_rank, _top_n


@triton.jit
def _arrive(ARR, at, count):
    """Count this program in; whether it is the last of ``count``. The last resets the count."""
    tl.debug_barrier()  # every thread's stores are issued before the release below
    done = tl.atomic_add(ARR + at, 1, sem="acq_rel", scope="gpu")
    last = done == count - 1
    if last:
        tl.store(ARR + at, 0)
    return last


@triton.jit
def _merge_states(PM, PL, PACC, slot0, lo, hi, g, g_ok, dv, dv_ok, G: tl.constexpr, DV: tl.constexpr,
                  BLOCK_SL: tl.constexpr):
    """Merged ``(m, l, acc)`` of heads ``g`` over slots ``lo .. hi - 1`` (``slot0 = row * P``),
    ``BLOCK_SL`` slots at a time; read past L1, as other programs wrote them."""
    sl = tl.arange(0, BLOCK_SL)
    m = tl.full(g.shape, float("-inf"), tl.float32)
    l = tl.zeros(g.shape, tl.float32)
    acc = tl.zeros([g.shape[0], dv.shape[0]], tl.float32)
    for p0 in range(lo, hi, BLOCK_SL):
        ok = (p0 + sl < hi)[:, None] & g_ok[None, :]
        at = (slot0 + p0 + sl)[:, None] * G + g[None, :]
        pm = tl.load(PM + at, mask=ok, other=float("-inf"), cache_modifier=".cg")
        pl = tl.load(PL + at, mask=ok, other=0.0, cache_modifier=".cg")
        pa = tl.load(PACC + at[:, :, None] * DV + dv[None, None, :], mask=ok[:, :, None] & dv_ok[None, None, :],
                     other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, tl.max(pm, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.exp2(pm - m_safe[None, :])
        alpha = tl.exp2(m - m_safe)
        l = l * alpha + tl.sum(pl * w, 0)
        acc = acc * alpha[:, None] + tl.sum(pa * w[:, :, None], 0)
        m = m_new
    return m, l, acc


@triton.jit
def _normalized(l, acc):
    """``acc / l``; 0 where no key was seen (``l == 0``, ``acc`` 0). A NaN the keys brought stays,
    as in the forward."""
    return acc / tl.where(l == 0, 1.0, l)[:, None]


@triton.jit
def compressed_window_kernel(
    Q, K, V, KN, VN, KC, VC, LEN, LOGITS, PM, PL, PACC,
    sqb, sqh, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    sknb, sknh, sknd,
    svnb, svnh, svnd,
    skcb, skch, skct, skcd,
    svcb, svch, svct, svcd,
    Hkv, L, Tc, P, S1, scale_log2,
    G: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, WINDOW: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, TILE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_L: tl.constexpr, WRITE_NEW: tl.constexpr, MEAN: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Program ``s < S1``: compressed split ``s``; program ``S1 + w``: window tokens ``t - W + 1 +
    w*TILE ..`` (at most ``TILE``, ``<= t``). Both store their partial state in their slot."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    if split < S1:
        acc, m, l = _compressed_split(
            Q, K, V, KN, VN, KC, VC, LEN, LOGITS, row, split, S1,
            sqb, sqh, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sknb, sknh, sknd, svnb, svnh, svnd,
            skcb, skch, skct, skcd, svcb, svch, svct, svcd, Hkv, L, Tc, scale_log2,
            G, CMP_BLOCK, CMP_STRIDE, DK, DV, BLOCK_G, BLOCK_C, BLOCK_DK, BLOCK_DV, BLOCK_L, WRITE_NEW, MEAN, IEEE,
        )
    else:
        b, h = _batch_head(row, Hkv)
        t = _position(LEN, b, L)
        w_tile = split - S1
        # the new token from the inputs: split 0 may not have written it to the cache yet
        acc, m, l = _attend_tokens(
            Q, K, V, KN, VN, b, h, sknb, sknh, sknd, svnb, svnh, svnd,
            sqb, sqh, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
            t - (WINDOW - 1) + w_tile * TILE, tl.minimum(TILE, WINDOW - w_tile * TILE), t, scale_log2,
            G, DK, DV, TILE, BLOCK_G, BLOCK_N, BLOCK_DK, BLOCK_DV, True, IEEE,
        )
    g = tl.arange(0, BLOCK_G)
    dv = tl.arange(0, BLOCK_DV)
    g_ok, dv_ok = g < G, dv < DV
    _store_partial(PM, PL, PACC, row.to(tl.int64) * P + split, g, dv, g_ok, dv_ok, acc, m, l, G, DV)


@triton.jit
def select_kernel(
    LEN, LOGITS, PM, PL, PACC, KEYS, IDX, ARR,
    Hkv, L, Tc, Ns, P, S1, NW, S2,
    G: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, SEL_BLOCK: tl.constexpr,
    N_SEL: tl.constexpr, N_INITIAL: tl.constexpr, N_LOCAL: tl.constexpr, DV: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_S1: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_O: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_SL: tl.constexpr, HEADS: tl.constexpr,
    BLOCK_SEL: tl.constexpr, BLOCK_NS: tl.constexpr, ONE_TILE: tl.constexpr,
):
    """Program ``s < S2``: the keys of the ``s``-th equal slice of the candidate selection blocks
    ``j <= t // l'``, ``BLOCK_J`` at a time: the group's summed probability mapped by token
    overlap (eq. 9: compressed block ``i = j*l'/d + o`` shares ``min(o + r - 1, l'/d - 1) -
    max(o, 0) + 1`` stride-chunks of ``d`` tokens with selection block ``j``, for ``o = 1 - r ..
    l'/d - 1``), ``+inf`` for forced blocks; the row's last of them ranks the keys. Program ``S2 + c``: the
    merged compressed and window states of heads ``c*HEADS ..``."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    slot0 = row.to(tl.int64) * P
    if split >= S2:
        dv = tl.arange(0, BLOCK_DV)
        dv_ok = dv < DV
        gh = (split - S2) * HEADS + tl.arange(0, HEADS)
        gh_ok = gh < G
        m, l, acc = _merge_states(PM, PL, PACC, slot0, 0, S1, gh, gh_ok, dv, dv_ok, G, DV, BLOCK_SL)
        _store_partial(PM, PL, PACC, slot0 + P - 2, gh, dv, gh_ok, dv_ok, acc, m, l, G, DV)
        m, l, acc = _merge_states(PM, PL, PACC, slot0, S1, S1 + NW, gh, gh_ok, dv, dv_ok, G, DV, BLOCK_SL)
        _store_partial(PM, PL, PACC, slot0 + P - 1, gh, dv, gh_ok, dv_ok, acc, m, l, G, DV)
    else:
        b = (row // Hkv).to(tl.int64)
        R: tl.constexpr = CMP_BLOCK // CMP_STRIDE
        PER_SEL: tl.constexpr = SEL_BLOCK // CMP_STRIDE
        t = _position(LEN, b, L)
        n_vis = _num_visible(t, Tc, CMP_BLOCK, CMP_STRIDE)
        # (clamped: a replay that outran max_len has t = L, whose block may be past the last)
        cur = tl.minimum(t // SEL_BLOCK, Ns - 1)

        g = tl.arange(0, BLOCK_G)
        g_ok = g < G
        lse = _splits_lse(PM, PL, slot0, S1, g, g_ok, BLOCK_S1, G)

        n_cand = cur + 1
        chunk = tl.cdiv(tl.cdiv(n_cand, BLOCK_J), S2) * BLOCK_J
        lo = split * chunk
        hi = tl.minimum(lo + chunk, n_cand)
        o = tl.arange(0, BLOCK_O) - (R - 1)  # compressed blocks within a selection block
        weight = tl.minimum(o + R - 1, PER_SEL - 1) - tl.maximum(o, 0) + 1
        weight = tl.where(o < PER_SEL, weight, 0).to(tl.float32)
        jb = tl.arange(0, BLOCK_J)
        logit_rows = LOGITS + (row.to(tl.int64) * G + g[:, None, None]) * Tc
        # (a head with lse = +inf scores 0 even where its logit is NaN or +inf)
        usable = g_ok & (lse < float("inf"))
        for j0 in range(lo, hi, BLOCK_J):
            j = j0 + jb
            i = j[:, None] * PER_SEL + o[None, :]  # (BLOCK_J, BLOCK_O)
            ok = usable[:, None, None] & ((i >= 0) & (i < n_vis) & (weight[None, :] > 0))[None, :, :]
            s = tl.load(logit_rows + i[None, :, :], mask=ok, other=float("-inf"))
            p = tl.where(ok, tl.exp2(s - lse[:, None, None]), 0.0)
            imp = tl.sum(tl.sum(p * weight[None, None, :], 2), 0)  # (BLOCK_J,)
            forced = _forced(j, cur, N_INITIAL, N_LOCAL)
            tl.store(KEYS + row.to(tl.int64) * Ns + j, tl.where(forced, float("inf"), imp), mask=j < hi)

        if _arrive(ARR, row, S2):  # every key of the row is in: rank them
            chosen = _top_n(KEYS + row.to(tl.int64) * Ns, cur, Ns, N_SEL, BLOCK_SEL, BLOCK_NS, ONE_TILE, ".cg")
            slot = tl.arange(0, BLOCK_SEL)
            rank = _ascending_rank(chosen, Ns, N_SEL, BLOCK_SEL)
            tl.store(IDX + row.to(tl.int64) * N_SEL + rank, chosen, mask=slot < N_SEL)


@triton.jit
def selected_combine_kernel(
    Q, K, V, LEN, IDX, PM, PL, PACC, ARR, GATES, OUT,
    sqb, sqh, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    sgb, sgh, sgc,
    sob, soh, sod,
    B, Hkv, L, P, S1, NW, scale_log2,
    G: tl.constexpr, SEL_BLOCK: tl.constexpr, N_SEL: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    TILE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_SL: tl.constexpr, HEADS: tl.constexpr, GATED: tl.constexpr, IEEE: tl.constexpr,
):
    """Program ``(row, r)``: the chosen block of rank ``r`` (ascending), its tokens ``<= t``. The
    row's last: its heads' three branches from their slots, gated (eq. 5), ``HEADS`` at a time;
    the batch entry's last row: ``lengths[b] += 1``, stopping at ``L`` (a replay past max_len
    kept no token there)."""
    row = tl.program_id(0)
    r = tl.program_id(1)
    b, h = _batch_head(row, Hkv)
    t = _position(LEN, b, L)
    slot0 = row.to(tl.int64) * P
    j = tl.load(IDX + row.to(tl.int64) * N_SEL + r)

    # (no block, j = -1: every position < 0)
    acc, m, l = _attend_tokens(Q, K, V, Q, Q, b, h, 0, 0, 0, 0, 0, 0, sqb, sqh, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
                               j * SEL_BLOCK, SEL_BLOCK, t, scale_log2, G, DK, DV, TILE, BLOCK_G, BLOCK_N, BLOCK_DK,
                               BLOCK_DV, False, IEEE)
    g = tl.arange(0, BLOCK_G)
    dv = tl.arange(0, BLOCK_DV)
    g_ok, dv_ok = g < G, dv < DV
    sel0 = S1 + NW
    _store_partial(PM, PL, PACC, slot0 + sel0 + r, g, dv, g_ok, dv_ok, acc, m, l, G, DV)

    if _arrive(ARR, B * Hkv + row, N_SEL):  # every selected block of the row is in: combine
        for g0 in range(0, G, HEADS):
            gh = g0 + tl.arange(0, HEADS)
            gh_ok = gh < G
            _, l_c, acc_c = _merge_states(PM, PL, PACC, slot0, P - 2, P - 1, gh, gh_ok, dv, dv_ok, G, DV, 1)
            _, l_w, acc_w = _merge_states(PM, PL, PACC, slot0, P - 1, P, gh, gh_ok, dv, dv_ok, G, DV, 1)
            _, l_s, acc_s = _merge_states(PM, PL, PACC, slot0, sel0, sel0 + N_SEL, gh, gh_ok, dv, dv_ok, G, DV, BLOCK_SL)
            o_cmp, o_swa, o_slc = _normalized(l_c, acc_c), _normalized(l_w, acc_w), _normalized(l_s, acc_s)
            hq = h * G + gh
            if GATED:
                gp = GATES + b * sgb + hq * sgh
                out = (tl.load(gp, mask=gh_ok).to(tl.float32)[:, None] * o_cmp
                       + tl.load(gp + sgc, mask=gh_ok).to(tl.float32)[:, None] * o_slc
                       + tl.load(gp + 2 * sgc, mask=gh_ok).to(tl.float32)[:, None] * o_swa)
            else:
                out = o_cmp + o_slc + o_swa
            tl.store(OUT + b * sob + hq[:, None] * soh + dv[None, :] * sod, out.to(OUT.dtype.element_ty),
                     mask=gh_ok[:, None] & dv_ok[None, :])
        if _arrive(ARR, 2 * B * Hkv + b, Hkv):  # every row of b has read lengths[b]
            tl.store(LEN + b, tl.minimum(tl.load(LEN + b) + 1, L))
