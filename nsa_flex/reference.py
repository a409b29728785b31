"""The plain-PyTorch oracle: every step of NSA written to be obviously right, not fast.

Every branch is dense: a score for every (query, key) pair, ``T x T`` (or ``T x Tc``) work, so
it is for checking, not for speed; run it in float64 to check a backend. The queries go through
in chunks (:func:`_attention`), so memory stays at about 1-2 GiB whatever ``T`` is, gradients
included. It shares no code with the backends beyond the config, so a bug in one does not hide
in the other.

Non-finite values: what a key holds reaches exactly the queries that see it (a masked key adds
0 whatever it holds, a seen NaN or infinity propagates), and a query that sees no key of a
branch, by the masks or because a ``score_mod`` gives every key ``-inf``, gets 0 from it.

Shapes as in docs/semantics.md: ``q (B, Hq, T, Dk)``, ``k (B, Hkv, T, Dk)``, ``v (B, Hkv, T, Dv)``,
``G = Hq // Hkv``; query head ``h`` reads KV head ``h // G``.

``score_mod(score, b, h, q_idx, kv_idx)`` and ``mask_mod(b, h, q_idx, kv_idx)`` are FlexAttention
modifiers; here they are called once per query chunk on broadcastable index tensors
``(B,1,1,1)``, ``(1,H,1,1)``, ``(1,1,C,1)`` (absolute query positions), ``(1,1,1,S)``, so they
must be written with elementwise tensor ops (as FlexAttention modifiers are). ``kv_idx`` is a token position in every branch: in the
compressed branch, block ``i`` is seen at its last token ``i*d + l - 1``.

Nothing here validates its input, unlike the rest of the public API: kept free of checks so it
reads as the definition, the oracle is meant to be called through
``nsa_flex.attend(..., backend="reference")``, which checks every argument first. Called
directly with bad input, these functions raise whatever torch raises, or return nonsense.

```python
import torch
import nsa_flex
from nsa_flex import NSAConfig, reference

config = NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=3, window=8)
q = torch.randn(1, 2, 40, 8, dtype=torch.float64)
k = torch.randn(1, 1, 40, 8, dtype=torch.float64)
v = torch.randn(1, 1, 40, 8, dtype=torch.float64)

r = reference.attend(q, k, v, config=config)
print(r.out.shape, r.p_cmp.shape)  # torch.Size([1, 2, 40, 8]) torch.Size([1, 2, 40, 9])
out = nsa_flex.attend(q, k, v, config=config)
print(((out - r.out).norm() / r.out.norm()).item() < 1e-10)  # True
```
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .config import NSAConfig

__all__ = [
    "ReferenceOutput",
    "mean_compress",
    "compressed_kv_positions",
    "masked_attention",
    "compressed_attention",
    "overlap_matrix",
    "selection_scores",
    "top_n",
    "select_blocks",
    "selected_attention",
    "window_attention",
    "attend",
]


class ReferenceOutput(NamedTuple):
    """:func:`attend`'s result: ``out``, ``o_cmp``, ``o_slc``, ``o_swa`` ``(B, Hq, T, Dv)``;
    ``block_indices (B, Hkv, T, n)`` int32; ``p_cmp (B, Hq, T, Tc)``, the compressed branch's
    probabilities (the one ``T x Tc`` tensor kept: 2 GiB in float64 at ``T = 8192``,
    ``Hq = 64``, ``Tc = 511``)."""

    out: Tensor
    block_indices: Tensor
    o_cmp: Tensor
    o_slc: Tensor
    o_swa: Tensor
    p_cmp: Tensor


def mean_compress(x: Tensor, config: NSAConfig) -> Tensor:
    """``(B, H, T, D) -> (B, H, Tc, D)``: block ``i`` is the mean of tokens ``i*d .. i*d+l-1``."""
    B, H, T, D = x.shape
    l, d = config.compress_block, config.compress_stride
    blocks = [x[:, :, i * d : i * d + l].mean(dim=2) for i in range(config.num_compressed(T))]
    if not blocks:
        return x.new_zeros(B, H, 0, D)
    return torch.stack(blocks, dim=2)


def compressed_kv_positions(seq_len: int, config: NSAConfig, device=None) -> Tensor:
    """The position at which each compressed block becomes visible: its last token."""
    return config.compressed_last_token(torch.arange(config.num_compressed(seq_len), device=device))


def _index_grids(B: int, H: int, t: Tensor, kv_pos: Tensor):
    """Index tensors for the mods: batch ``(B,1,1,1)``, head ``(1,H,1,1)``, the query positions
    ``t`` as ``(1,1,C,1)`` and the key positions as ``(1,1,1,S)``, all int32."""
    dev = kv_pos.device
    b = torch.arange(B, device=dev, dtype=torch.int32).view(B, 1, 1, 1)
    h = torch.arange(H, device=dev, dtype=torch.int32).view(1, H, 1, 1)
    return b, h, t.to(torch.int32).view(1, 1, -1, 1), kv_pos.to(torch.int32).view(1, 1, 1, -1)


# Bytes one query chunk's (B, Hq, chunk, S) score tensor may take. A chunk holds a few tensors
# of that size (scores, weights, probabilities, masks), so the dense branches need about 1-2 GiB
# at a time whatever T is; with gradients each chunk is recomputed in the backward.
_CHUNK_BYTES = 128 * 2**20


def _chunk_rows(B: int, H: int, S: int, dtype: torch.dtype) -> int:
    """Queries per chunk: as many as keep ``(B, H, chunk, S)`` of ``dtype`` within ``_CHUNK_BYTES``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max(1, _CHUNK_BYTES // max(1, B * H * S * itemsize))


def _weighted_values(probs: Tensor, seen: Tensor, v: Tensor) -> Tensor:
    """``sum_s probs[..., t, s] * v[..., s, :]`` over the keys each query sees, whatever the others
    hold.

    ``probs @ v`` would not do: an unseen key's probability is 0, and ``0 * NaN`` (or ``0 * inf``)
    is NaN. So the finite values go through the product, non-finite ones replaced by 0, and what
    the non-finite ones add is written out as IEEE arithmetic gives it for positive
    probabilities: in each output column, NaN where the query sees a NaN or infinities of both
    signs, ``+inf``/``-inf`` where it sees infinities of one sign, nothing otherwise. Counting
    what each query sees is a product of 0/1 tensors, so under ``torch.compile`` nothing depends
    on the data's values on the host; eagerly, values that are all finite skip it.

    Args:
        probs: ``(B, H, C, S)``; seen: bool, the same shape; v: ``(B, H, S, Dv)``.

    Returns:
        ``(B, H, C, Dv)``.
    """
    finite = torch.isfinite(v)
    out = probs @ torch.where(finite, v, 0)
    if not torch.compiler.is_compiling() and bool(finite.all()):
        return out
    inf = float("inf")
    kinds = torch.cat((torch.isnan(v), v == inf, v == -inf), dim=-1).to(probs.dtype)  # (B, H, S, 3*Dv)
    nan, pos, neg = ((seen.to(probs.dtype) @ kinds) > 0).chunk(3, dim=-1)
    extra = torch.where(nan | (pos & neg), float("nan"), torch.where(pos, inf, torch.where(neg, -inf, 0.0)))
    return out + extra.to(out.dtype)


def _attend_rows(q, k, v, allowed_rows, t0, scale, kv_pos, score_mod, mask_mod):
    """Queries ``t0 .. t0 + C - 1`` (``q (B, Hq, C, Dk)`` holds just them) against every key,
    ``k``/``v`` already repeated to ``Hq`` heads: ``(out (B, Hq, C, Dv), probs (B, Hq, C, S))``."""
    B, Hq, C, _ = q.shape
    S = k.shape[2]
    scores = (q @ k.transpose(-1, -2)) * scale
    b, h, t, s = _index_grids(B, Hq, torch.arange(t0, t0 + C, device=q.device), kv_pos)
    if score_mod is not None:
        scores = score_mod(scores, b, h, t, s).expand_as(scores)
    allowed = allowed_rows(t0, t0 + C).expand(B, Hq, C, S)
    if mask_mod is not None:
        allowed = allowed & mask_mod(b, h, t, s)
    scores = scores.masked_fill(~allowed, float("-inf"))
    # A key the score_mod sends to -inf is not seen either; a NaN score is (it makes the row NaN).
    seen = scores != float("-inf")
    any_seen = seen.any(dim=-1, keepdim=True)
    # Rows that see nothing: shift by 0 instead of -inf, so exp gives 0s, never NaN.
    row_max = torch.where(any_seen, scores.amax(dim=-1, keepdim=True), 0.0).detach()
    weights = torch.exp(scores - row_max)
    probs = weights / torch.where(any_seen, weights.sum(dim=-1, keepdim=True), 1.0)
    return _weighted_values(probs, seen, v), probs


def _attention(q, k, v, allowed_rows, scale, kv_pos, score_mod=None, mask_mod=None, keep_probs=False, q_offset=0):
    """:func:`masked_attention` with the mask given per query chunk: ``allowed_rows(t0, t1)`` is
    bool, broadcastable to ``(B, Hq, t1 - t0, S)``, for the queries at positions ``t0 .. t1 - 1``
    (``q``'s row ``0`` is position ``q_offset``).

    The queries go through in chunks of :func:`_chunk_rows`, so that no ``T x S`` tensor is made
    unless ``keep_probs`` asks for the probabilities; with gradients each chunk is recomputed in
    the backward (``torch.utils.checkpoint``; eagerly, not inside ``torch.compile``), so autograd
    holds one chunk at a time, too.

    Returns:
        ``(out (B, Hq, T, Dv), probs (B, Hq, T, S) or None)``.
    """
    B, Hq, T, _ = q.shape
    G = Hq // k.shape[1]
    k = k.repeat_interleave(G, dim=1)
    v = v.repeat_interleave(G, dim=1)
    step = _chunk_rows(B, Hq, k.shape[2], torch.promote_types(q.dtype, k.dtype))
    if step >= T:
        out, probs = _attend_rows(q, k, v, allowed_rows, q_offset, scale, kv_pos, score_mod, mask_mod)
        return out, (probs if keep_probs else None)
    outs, probs = [], []
    for t0 in range(0, T, step):
        args = (q[:, :, t0 : t0 + step], k, v, allowed_rows, q_offset + t0, scale, kv_pos, score_mod, mask_mod)
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            o, p = checkpoint(_attend_rows, *args, use_reentrant=False)
        else:
            o, p = _attend_rows(*args)
        outs.append(o)
        if keep_probs:
            probs.append(p)
    return torch.cat(outs, dim=2), (torch.cat(probs, dim=2) if keep_probs else None)


def masked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    allowed: Tensor,
    scale: float,
    kv_pos: Tensor,
    score_mod: Callable | None = None,
    mask_mod: Callable | None = None,
) -> tuple[Tensor, Tensor]:
    """Softmax attention over the keys that ``allowed`` (and ``mask_mod``) let through.

    A key is *seen* by a query when it is allowed and its score is not ``-inf`` (a ``score_mod``
    may send it there). What a key that a query does not see holds never reaches that query's
    output, non-finite values included; a seen NaN or infinity propagates as arithmetic says.

    Args:
        q: ``(B, Hq, T, Dk)``; k: ``(B, Hkv, S, Dk)``; v: ``(B, Hkv, S, Dv)``.
        allowed: bool, broadcastable to ``(B, Hq, T, S)``.
        kv_pos: ``(S,)`` the position each key is shown to ``score_mod``/``mask_mod`` as.

    Returns:
        ``(out (B, Hq, T, Dv), probs (B, Hq, T, S))``. A query that sees no key gets output
        0 and probabilities 0. ``probs`` is the one ``T x S`` tensor made (the work itself goes
        through query chunks, see :func:`_attention`).
    """
    B, Hq, T, _ = q.shape
    allowed = allowed.expand(B, Hq, T, k.shape[2])
    return _attention(q, k, v, lambda t0, t1: allowed[:, :, t0:t1], scale, kv_pos, score_mod, mask_mod,
                      keep_probs=True)


def compressed_attention(
    q: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    config: NSAConfig,
    scale: float,
    score_mod: Callable | None = None,
    mask_mod: Callable | None = None,
    q_offset: int = 0,
) -> tuple[Tensor, Tensor]:
    """Compressed branch: query ``t`` sees block ``i`` iff ``i*d + l - 1 <= t``. ``q``'s rows
    are the positions ``q_offset ..``; ``k_cmp`` holds blocks ``0 .. Tc - 1``.

    Returns ``(o_cmp (B, Hq, T, Dv), p_cmp (B, Hq, T, Tc))``.
    """
    B, Hq, T, _ = q.shape
    kv_pos = config.compressed_last_token(torch.arange(k_cmp.shape[2], device=q.device))
    if kv_pos.numel() == 0:
        return q.new_zeros(B, Hq, T, v_cmp.shape[-1]), q.new_zeros(B, Hq, T, 0)

    def visible(t0, t1):
        return kv_pos[None, :] <= torch.arange(t0, t1, device=q.device)[:, None]

    return _attention(q, k_cmp, v_cmp, visible, scale, kv_pos, score_mod, mask_mod, keep_probs=True, q_offset=q_offset)


def overlap_matrix(seq_len: int, config: NSAConfig, dtype=torch.float64, device=None) -> Tensor:
    """``(Tc, Ns)``: ``|tokens(i) ∩ tokens(j)| / d`` for compressed block ``i``, selection block ``j``."""
    l, d, ls = config.compress_block, config.compress_stride, config.select_block
    tc, ns = config.num_compressed(seq_len), config.num_select_blocks(seq_len)
    m = torch.zeros(tc, ns, dtype=dtype, device=device)
    for i in range(tc):
        for j in range(ns):
            lo = max(i * d, j * ls)
            hi = min(i * d + l, (j + 1) * ls)  # exclusive ends
            m[i, j] = max(hi - lo, 0) / d
    return m


def selection_scores(p_cmp: Tensor, config: NSAConfig, num_kv_heads: int, seq_len: int | None = None) -> Tensor:
    """Importance of each selection block (eqs. 8-10): token-overlap mapping, then GQA group sum.

    Args:
        p_cmp: ``(B, Hq, T, Tc)`` compressed-branch probabilities.
        seq_len: the keys' length (default ``T``), whose ``Tc`` blocks ``p_cmp`` covers.

    Returns:
        ``(B, Hkv, T, Ns)``.
    """
    B, Hq, T, _ = p_cmp.shape
    p_slc = p_cmp @ overlap_matrix(T if seq_len is None else seq_len, config, p_cmp.dtype, p_cmp.device)
    return p_slc.view(B, num_kv_heads, Hq // num_kv_heads, T, -1).sum(dim=2)


def top_n(scores: Tensor, config: NSAConfig, q_offset: int = 0) -> Tensor:
    """Top-n selection with forced initial and local blocks (docs/semantics.md, "Selection").

    Args:
        scores: ``(B, Hkv, T, Ns)`` for the queries at positions ``q_offset ..``.

    Returns:
        ``(B, Hkv, T, n)`` int32: chosen blocks ascending, then ``-1`` padding.
    """
    B, H, T, Ns = scores.shape
    n, ls = config.num_selected, config.select_block
    j = torch.arange(Ns, device=scores.device)[None, :]
    current = ((torch.arange(T, device=scores.device) + q_offset) // ls)[:, None]
    candidate = j <= current
    forced = candidate & ((j < config.num_initial) | (j > current - config.num_local))
    inf = torch.tensor(float("inf"), dtype=scores.dtype, device=scores.device)
    key = torch.where(forced, inf, torch.where(candidate, scores, -inf))
    out = torch.full((B, H, T, n), -1, dtype=torch.int32, device=scores.device)
    for t in range(T):
        m = min(n, Ns, (t + q_offset) // ls + 1)  # candidates: blocks 0 .. t // ls (a host count, no device read)
        # equal scores: the lower block first, the library's rule (docs/semantics.md)
        ranked = torch.sort(key[:, :, t], dim=-1, descending=True, stable=True).indices[..., :m]
        chosen = ranked.sort(dim=-1).values
        out[:, :, t, :m] = chosen.to(torch.int32)
    return out


def select_blocks(
    q: Tensor,
    k_cmp: Tensor,
    config: NSAConfig,
    scale: float,
    score_mod: Callable | None = None,
    mask_mod: Callable | None = None,
    q_offset: int = 0,
) -> tuple[Tensor, Tensor]:
    """Block selection from scratch: returns ``(block_indices (B, Hkv, T, n), scores (B, Hkv, T, Ns))``
    for the queries at positions ``q_offset ..`` (the keys: ``q_offset + T`` positions)."""
    T = q.shape[2]
    v_dummy = k_cmp.new_zeros(*k_cmp.shape[:-1], 1)
    _, p_cmp = compressed_attention(q, k_cmp, v_dummy, config, scale, score_mod, mask_mod, q_offset)
    scores = selection_scores(p_cmp, config, k_cmp.shape[1], q_offset + T)
    return top_n(scores, config, q_offset), scores


def _allowed_by_selection(block_indices: Tensor, config: NSAConfig, seq_len: int, q_start: int = 0) -> Tensor:
    """``(B, Hkv, C, T)`` bool for the ``C`` queries ``q_start ..`` whose selections
    ``block_indices (B, Hkv, C, n)`` holds: key ``s`` is in one of query ``t``'s blocks and
    ``s <= t``."""
    B, H, T, n = block_indices.shape
    s = torch.arange(seq_len, device=block_indices.device)
    block_of_s = s // config.select_block
    ns = config.num_select_blocks(seq_len)
    # One column per block plus a dump column for the -1 padding.
    idx = torch.where(block_indices < 0, ns, block_indices).long()
    chosen = torch.zeros(B, H, T, ns + 1, dtype=torch.bool, device=idx.device)
    chosen.scatter_(-1, idx, True)
    in_selected = chosen[..., block_of_s]  # (B, H, T, S)
    causal = s[None, :] <= torch.arange(q_start, q_start + T, device=s.device)[:, None]
    return in_selected & causal


def selected_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_indices: Tensor,
    config: NSAConfig,
    scale: float,
    score_mod: Callable | None = None,
    mask_mod: Callable | None = None,
    q_offset: int = 0,
) -> Tensor:
    """Selected branch: query ``t`` of head ``h`` sees keys ``s <= t`` in the blocks
    ``block_indices[b, h // G, t]`` (``-1`` selects nothing); rows from position ``q_offset``."""
    S = k.shape[2]
    G = q.shape[1] // k.shape[1]

    def allowed(t0, t1):
        rows = block_indices[:, :, t0 - q_offset : t1 - q_offset]
        return _allowed_by_selection(rows, config, S, t0).repeat_interleave(G, dim=1)

    kv_pos = torch.arange(S, device=q.device)
    return _attention(q, k, v, allowed, scale, kv_pos, score_mod, mask_mod, q_offset=q_offset)[0]


def window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    config: NSAConfig,
    scale: float,
    score_mod: Callable | None = None,
    mask_mod: Callable | None = None,
    q_offset: int = 0,
) -> Tensor:
    """Sliding window: query ``t`` sees keys ``t - w < s <= t`` (rows from position ``q_offset``)."""
    s = torch.arange(k.shape[2], device=q.device)

    def allowed(t0, t1):
        t = torch.arange(t0, t1, device=q.device)[:, None]
        return (s[None, :] <= t) & (s[None, :] > t - config.window)

    return _attention(q, k, v, allowed, scale, s, score_mod, mask_mod, q_offset=q_offset)[0]


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gates: Tensor | None = None,
    *,
    config: NSAConfig | None = None,
    k_cmp: Tensor | None = None,
    v_cmp: Tensor | None = None,
    block_indices: Tensor | None = None,
    scale: float | None = None,
    score_mod: Callable | None = None,
    mask_mod: Callable | None = None,
    cu_seqlens: Tensor | None = None,
    selection_grad: bool = False,
    q_offset: int = 0,
) -> ReferenceOutput:
    """The whole NSA layer (eq. 5), densely. Inputs are not validated: ``nsa_flex.attend``
    does that before it calls here.

    ``q_offset``: ``q (B, Hq, Tq, Dk)`` (and ``gates``, ``block_indices``) hold the queries at
    positions ``q_offset .. q_offset + Tq - 1``; ``k``, ``v`` positions ``0 .. Tk - 1``, and
    ``k_cmp``/``v_cmp`` their ``num_compressed(Tk)`` blocks (not with ``cu_seqlens``).

    ``cu_seqlens`` (``(N+1,)`` document offsets of a packed row, ``B = 1``): each document is
    run alone, as the definition says (docs/varlen.md); ``k_cmp``/``v_cmp`` hold each
    document's compressed blocks concatenated, ``block_indices`` are doc-local, and the mods
    see packed positions.

    Returns:
        ``ReferenceOutput``: ``out (B, Hq, T, Dv)``, the selection, each branch's output and
        the compressed branch's probabilities.
    """
    if cu_seqlens is not None:
        return _attend_documents(
            q, k, v, gates, config=config, k_cmp=k_cmp, v_cmp=v_cmp, block_indices=block_indices,
            scale=scale, score_mod=score_mod, mask_mod=mask_mod, cu_seqlens=cu_seqlens,
        )
    config = NSAConfig() if config is None else config
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k_cmp = mean_compress(k, config) if k_cmp is None else k_cmp
    v_cmp = mean_compress(v, config) if v_cmp is None else v_cmp
    Tk = k.shape[2]
    o_cmp, p_cmp = compressed_attention(q, k_cmp, v_cmp, config, scale, score_mod, mask_mod, q_offset)
    if block_indices is None:
        # Selection is not differentiable (docs/semantics.md): scores are computed without a graph.
        scores = selection_scores(p_cmp.detach(), config, k.shape[1], Tk)
        block_indices = top_n(scores, config, q_offset)
    slc_score_mod = score_mod
    if selection_grad:
        # straight-through: scores times 1 + imp - imp.detach(), imp the pair's importance
        w = selection_scores(p_cmp, config, k.shape[1], Tk)
        w = (w - w.detach() + 1).to(q.dtype)
        G, ls, H, Ns = q.shape[1] // k.shape[1], config.select_block, k.shape[1], w.shape[-1]

        def slc_score_mod(score, b, h, t, s):
            score = score * w[b, h // G, t - q_offset, s // ls]
            return score if score_mod is None else score_mod(score, b, h, t, s)

    o_slc = selected_attention(q, k, v, block_indices, config, scale, slc_score_mod, mask_mod, q_offset)
    o_swa = window_attention(q, k, v, config, scale, score_mod, mask_mod, q_offset)
    if gates is None:
        out = o_cmp + o_slc + o_swa
    else:
        g = gates.to(o_cmp.dtype)
        out = g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_swa
    return ReferenceOutput(out, block_indices, o_cmp, o_slc, o_swa, p_cmp)


def _attend_documents(q, k, v, gates, *, config, k_cmp, v_cmp, block_indices, scale, score_mod, mask_mod, cu_seqlens):
    """The packed row as its documents, each through :func:`attend` alone, concatenated."""
    config = NSAConfig() if config is None else config
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    bounds = [int(x) for x in cu_seqlens.tolist()]
    pieces, cmp_start = [], 0
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        tc = config.num_compressed(end - start)
        tok, blk = slice(start, end), slice(cmp_start, cmp_start + tc)

        def part(x, s):
            return None if x is None else x[:, :, s]

        shifted_score = None if score_mod is None else (
            lambda sc, b, h, qi, kv, o=start: score_mod(sc, b, h, qi + o, kv + o))
        shifted_mask = None if mask_mod is None else (
            lambda b, h, qi, kv, o=start: mask_mod(b, h, qi + o, kv + o))
        r = attend(
            q[:, :, tok], k[:, :, tok], v[:, :, tok], part(gates, tok), config=config,
            k_cmp=part(k_cmp, blk), v_cmp=part(v_cmp, blk), block_indices=part(block_indices, tok),
            scale=scale, score_mod=shifted_score, mask_mod=shifted_mask,
        )
        pieces.append((tok, blk, r))
        cmp_start += tc
    B, Hq, T, _ = q.shape
    p_cmp = q.new_zeros(B, Hq, T, cmp_start)
    for tok, blk, r in pieces:
        p_cmp[:, :, tok, blk] = r.p_cmp
    cat = [torch.cat([getattr(r, f) for _, _, r in pieces], dim=2) for f in ReferenceOutput._fields[:5]]
    return ReferenceOutput(*cat, p_cmp)
