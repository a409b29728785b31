"""Non-finite values (issue 14): what a NaN or infinity reaches, per backend and branch.

The reference is exact: a key's value reaches exactly the queries that see it. The Triton
selected-branch kernel and both decode steps match it. FlexAttention multiplies whole tiles
(0 * NaN is NaN), so the flex branches are pinned to what docs/design.md ("Non-finite values")
says they do: on the CPU, eagerly, every query of the call. Tiny float shapes; the Triton
kernels run under Triton's CPU interpreter.
"""

import pytest
import torch

from nsa_flex import NSACache, NSAConfig, attend, block_scores, decode_step, mean_compress, prefill, reference as R
from nsa_flex.triton_backend import available

TRITON = available(torch.device("cpu"))[0]
needs_triton = pytest.mark.skipif(not TRITON, reason="no CUDA and no Triton interpreter")

# l = 8, d = 4, l' = 8, n = 3, w = 8: block i of the compressed branch is seen from token 4i + 7
CONFIG = NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=3, num_initial=1, num_local=1, window=8)
NAN, INF = float("nan"), float("inf")


def _inputs(T, dtype=torch.float64, B=2, Hkv=2, G=2, D=16, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * G, T, D, generator=g).to(device, dtype)
    k = torch.randn(B, Hkv, T, D, generator=g).to(device, dtype)
    v = torch.randn(B, Hkv, T, D, generator=g).to(device, dtype)
    return q, k, v


def _selection(q, k):
    """A fixed selection (the reference's, from finite inputs), so that a NaN changes no choice."""
    return R.select_blocks(q.double(), mean_compress(k.double(), CONFIG), CONFIG, q.shape[-1] ** -0.5)[0]


def _seen_by(branch, idx, T, b, h, s):
    """``(T,)`` bool: which queries of batch row ``b`` and KV head ``h`` see key ``s`` of the
    branch (compressed: block ``s``), by the rules of docs/semantics.md written out."""
    t = torch.arange(T)
    if branch == "o_cmp":
        return t >= s * CONFIG.compress_stride + CONFIG.compress_block - 1
    if branch == "o_swa":
        return (t >= s) & (t < s + CONFIG.window)
    return (t >= s) & (idx[b, h] == s // CONFIG.select_block).any(dim=-1)


def _expected(clean, rows, b, h, G, fill, dim=None):
    """``clean`` with ``fill`` at the given rows of the query heads of KV head ``h`` (in column
    ``dim``, or every column)."""
    want = clean.clone()
    heads = slice(h * G, (h + 1) * G)
    cols = slice(None) if dim is None else slice(dim, dim + 1)
    want[b, heads, rows, cols] = fill
    return want


def _run(backend, q, k, v, idx, k_cmp, v_cmp, **kw):
    return attend(q, k, v, config=CONFIG, k_cmp=k_cmp, v_cmp=v_cmp, block_indices=idx, backend=backend,
                  return_aux=True, **kw)[1]


# -------------------------------------------------- causality: what an unseen key holds


@pytest.mark.parametrize("what", ["v nan", "v +inf", "v -inf", "k nan"])
def test_reference_a_value_reaches_exactly_the_queries_that_see_it(what):
    T, G, b, h, s, c, dim = 40, 2, 1, 0, 21, 3, 5
    q, k, v = _inputs(T)
    idx = _selection(q, k)
    k_cmp, v_cmp = mean_compress(k, CONFIG), mean_compress(v, CONFIG)
    clean = _run("reference", q, k, v, idx, k_cmp, v_cmp)
    name, kind = what.split()
    fill = {"nan": NAN, "+inf": INF, "-inf": -INF}[kind]
    bad = {"k": k.clone(), "v": v.clone()}
    bad_cmp = {"k": k_cmp.clone(), "v": v_cmp.clone()}
    bad[name][b, h, s, dim] = fill  # read by the selected and window branches
    bad_cmp[name][b, h, c, dim] = fill  # read by the compressed branch
    got = _run("reference", q, bad["k"], bad["v"], idx, bad_cmp["k"], bad_cmp["v"])
    for branch, key in (("o_cmp", c), ("o_slc", s), ("o_swa", s)):
        rows = _seen_by(branch, idx, T, b, h, key)
        assert 0 < rows.sum() < T
        if name == "v":  # the value's column, with the value's sign
            want = _expected(getattr(clean, branch), rows, b, h, G, fill, dim)
        else:  # a NaN score: the whole row
            want = _expected(getattr(clean, branch), rows, b, h, G, NAN)
        torch.testing.assert_close(getattr(got, branch), want, rtol=0, atol=1e-12, equal_nan=True, msg=branch)


def test_reference_infinities_of_both_signs_make_nan():
    T, G, b, h, dim = 24, 2, 0, 1, 2
    q, k, v = _inputs(T)
    bad = v.clone()
    bad[b, h, 10, dim], bad[b, h, 12, dim] = INF, -INF
    got = R.window_attention(q, k, bad, CONFIG, 0.25)
    clean = R.window_attention(q, k, v, CONFIG, 0.25)
    t = torch.arange(T)
    want = _expected(clean, (t >= 10) & (t < 10 + CONFIG.window), b, h, G, INF, dim)
    want = _expected(want, (t >= 12) & (t < 12 + CONFIG.window), b, h, G, -INF, dim)
    want = _expected(want, (t >= 12) & (t < 10 + CONFIG.window), b, h, G, NAN, dim)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12, equal_nan=True)


def test_flex_on_the_cpu_multiplies_the_whole_score_matrix():
    """Pinned (docs/design.md): eager FlexAttention on the CPU makes every score of a (batch
    row, head) call, so a NaN value reaches every query of its batch row and KV head, in every
    branch, seen or not; other rows and heads are untouched."""
    T, G, b, h, s, c, dim = 40, 2, 1, 0, 21, 3, 5
    q, k, v = _inputs(T, torch.float32)
    idx = _selection(q, k)
    k_cmp, v_cmp = mean_compress(k, CONFIG), mean_compress(v, CONFIG)
    clean = _run("flex", q, k, v, idx, k_cmp, v_cmp)
    bad_v, bad_vc = v.clone(), v_cmp.clone()
    bad_v[b, h, s, dim], bad_vc[b, h, c, dim] = NAN, NAN
    got = _run("flex", q, k, bad_v, idx, k_cmp, bad_vc)
    every = torch.ones(T, dtype=torch.bool)
    for branch in ("o_cmp", "o_slc", "o_swa"):
        want = _expected(getattr(clean, branch), every, b, h, G, NAN, dim)
        torch.testing.assert_close(getattr(got, branch), want, rtol=0, atol=0, equal_nan=True, msg=branch)


@needs_triton
@pytest.mark.parametrize("what", ["v nan", "k nan"])
def test_triton_selected_kernel_reads_only_what_each_query_sees(what):
    T, G, b, h, s, dim = 40, 2, 1, 0, 21, 5
    q, k, v = _inputs(T, torch.float32)
    idx = _selection(q, k)
    k_cmp, v_cmp = mean_compress(k, CONFIG), mean_compress(v, CONFIG)
    clean = _run("triton", q, k, v, idx, k_cmp, v_cmp).o_slc
    name = what.split()[0]
    bad = {"k": k.clone(), "v": v.clone()}
    bad[name][b, h, s, dim] = NAN
    got = _run("triton", q, bad["k"], bad["v"], idx, k_cmp, v_cmp).o_slc
    rows = _seen_by("o_slc", idx, T, b, h, s)
    want = _expected(clean, rows, b, h, G, NAN, dim if name == "v" else None)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


# --------------------------------------------------------------------- packed documents

CU = torch.tensor([0, 24, 56])


def _packed_inputs(dtype):
    q, k, v = _inputs(56, dtype, B=1)
    bad = v.clone()
    bad[0, 0, 5, 3] = NAN  # document 0, in its selection block 0 (forced: seen by every later query)
    return q, k, v, bad


def test_reference_keeps_packed_documents_apart():
    q, k, v, bad = _packed_inputs(torch.float64)
    clean = attend(q, k, v, config=CONFIG, backend="reference", cu_seqlens=CU, return_aux=True)[1]
    idx = clean.block_indices
    got = attend(q, k, bad, config=CONFIG, backend="reference", cu_seqlens=CU, block_indices=idx, return_aux=True)[1]
    t = torch.arange(56)
    # compressed blocks 0 and 1 (tokens 0-7, 4-11) hold it, seen from token 7
    seen = {"o_cmp": (t >= 7) & (t < 24), "o_slc": (t >= 5) & (t < 24), "o_swa": (t >= 5) & (t < 5 + CONFIG.window)}
    for branch, rows in seen.items():
        want = _expected(getattr(clean, branch), rows, 0, 0, 2, NAN, 3)
        torch.testing.assert_close(getattr(got, branch), want, rtol=0, atol=0, equal_nan=True, msg=branch)


@needs_triton
def test_triton_selected_kernel_keeps_packed_documents_apart():
    q, k, v, bad = _packed_inputs(torch.float32)
    idx = attend(q, k, v, config=CONFIG, backend="reference", cu_seqlens=CU, return_aux=True)[1].block_indices
    clean = attend(q, k, v, config=CONFIG, backend="triton", cu_seqlens=CU, block_indices=idx, return_aux=True)[1]
    got = attend(q, k, bad, config=CONFIG, backend="triton", cu_seqlens=CU, block_indices=idx, return_aux=True)[1]
    t = torch.arange(56)
    want = _expected(clean.o_slc, (t >= 5) & (t < 24), 0, 0, 2, NAN, 3)
    torch.testing.assert_close(got.o_slc, want, rtol=0, atol=0, equal_nan=True)
    # the compressed and window branches are FlexAttention's (pinned below)
    assert torch.isnan(got.o_swa[0, :2, 24:, 3]).all()


def test_flex_on_the_cpu_lets_a_document_reach_the_others():
    """Pinned (docs/design.md): FlexAttention on the CPU, eagerly, multiplies the whole packed
    row, so a NaN value reaches every query of the row in every branch."""
    q, k, v, bad = _packed_inputs(torch.float32)
    clean = attend(q, k, v, config=CONFIG, backend="flex", cu_seqlens=CU, return_aux=True)[1]
    got = attend(q, k, bad, config=CONFIG, backend="flex", cu_seqlens=CU, block_indices=clean.block_indices,
                 return_aux=True)[1]
    for branch in ("o_cmp", "o_slc", "o_swa"):
        a, want = getattr(got, branch), getattr(clean, branch)
        assert torch.isnan(a[0, :2, :, 3]).all(), branch
        want = want.clone()
        want[0, :2, :, 3] = NAN
        torch.testing.assert_close(a, want, rtol=0, atol=0, equal_nan=True, msg=branch)


# --------------------------------------------------------- rows shorter than one block


def test_block_scores_without_compressed_blocks_builds_no_row_from_another():
    T = CONFIG.compress_block - 3
    q, k, _ = _inputs(T, torch.float32)
    q = q.clone()
    q[0, 1, 2, 0] = NAN
    q.requires_grad_()
    k_cmp = mean_compress(k, CONFIG).requires_grad_()
    assert k_cmp.shape[2] == 0
    scores = block_scores(q, k_cmp, config=CONFIG)
    assert torch.equal(scores, torch.zeros_like(scores))
    gq, gk = torch.autograd.grad(scores.sum(), (q, k_cmp))  # zeros, not None: DDP needs them
    assert torch.equal(gq, torch.zeros_like(q)) and gk.shape == k_cmp.shape


@pytest.mark.parametrize("backend", ["reference", "flex"])
def test_selection_grad_without_compressed_blocks_keeps_a_nan_query_to_itself(backend):
    T = CONFIG.compress_block - 3
    dtype = torch.float64 if backend == "reference" else torch.float32
    q, k, v = _inputs(T, dtype)
    clean = attend(q, k, v, config=CONFIG, backend=backend, selection_grad=True)
    bad = q.clone()
    bad[0, 1, 2, 0] = NAN
    bad.requires_grad_()
    got = attend(bad, k, v, config=CONFIG, backend=backend, selection_grad=True)
    assert torch.isnan(got[0, 1, 2]).all()
    want = clean.clone()
    want[0, 1, 2] = NAN
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert torch.autograd.grad(got[1].sum(), bad)[0] is not None


# -------------------------------------------------------- decoding equals the forward


def _step_and_compare(fused, steps, rewind=None, dtype=torch.float64, device="cpu"):
    """Prefill 13 tokens of rows holding a NaN value (row 0, token 5) and decode the rest in
    steps of ``steps`` tokens, a NaN key and value arriving on the way (row 1, tokens 20, 21):
    every output equals the reference forward over the tokens kept, NaN where it has NaN.

    ``rewind``: ``(step, n)``: after that step, drop the last ``n`` tokens held. Their keys and
    values were NaN, and their slots (raw, and a compressed block they completed) stay stale
    until overwritten: no later query may see them."""
    B, Hkv, G, D, P = 2, 1, 2, 16, 13
    T = P + sum(steps)
    q, k, v = _inputs(T, torch.float64, B=B, Hkv=Hkv, G=G, D=D, seed=3, device=device)
    v[0, 0, 5, 2] = NAN
    k[1, 0, 20, 7] = NAN
    v[1, 0, 21, 4] = NAN  # with steps of several tokens, the earlier ones of its step must not see it

    def walk(step):  # -> the input positions kept, in order; step(i, positions, out) runs a step
        kept, src = list(range(P)), P
        for i, m in enumerate(steps):
            step(i, slice(src, src + m))
            kept += range(src, src + m)
            src += m
            if rewind is not None and rewind[0] == i:
                del kept[len(kept) - rewind[1]:]
        return kept

    dropped = set(range(P + sum(steps))) - set(walk(lambda i, sl: None))
    for t in dropped:  # garbage, rewound: the cache must forget it
        k[:, :, t], v[:, :, t] = NAN, NAN
    cache = NSACache(B, Hkv, 48, D, config=CONFIG, dtype=dtype, device=device)
    prefill(cache, q[:, :, :P].to(dtype), k[:, :, :P].to(dtype), v[:, :, :P].to(dtype), backend="reference")
    outs = {}

    def step(i, sl):
        out = decode_step(cache, q[:, :, sl].to(dtype), k[:, :, sl].to(dtype), v[:, :, sl].to(dtype), fused=fused)
        outs.update({t: out[:, :, j] for j, t in enumerate(range(sl.start, sl.stop))})
        if rewind is not None and rewind[0] == i:
            cache.rewind_(rewind[1])

    kept = walk(step)
    got = torch.stack([outs[t] for t in kept[P:]], dim=2).double()
    idx = torch.tensor(kept, device=device)
    want = attend(q[:, :, idx], k[:, :, idx], v[:, :, idx], config=CONFIG, backend="reference")[:, :, P:]
    assert torch.isnan(want).any() and not torch.isnan(want).all()
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 3e-2)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol, equal_nan=True)


@pytest.mark.parametrize("steps", [[1] * 14, [3, 2, 4, 3, 2]], ids=["m1", "m2-4"])
def test_decode_equals_the_forward_with_nan(steps):
    _step_and_compare(False, steps)


def test_decode_never_sees_rewound_tokens():
    # after step 2 (held: 13 + 7 tokens) the last 3 go: slots 17-19, in the query's selection
    # block, and compressed block 3 (tokens 12-19) that token 19 completed, stay stale
    _step_and_compare(False, [1, 2, 4, 1, 1, 3, 1, 1], rewind=(2, 3))


@needs_triton
def test_fused_decode_equals_the_forward_with_nan():
    _step_and_compare(True, [1] * 12, dtype=torch.float32)


@needs_triton
def test_fused_decode_never_sees_rewound_tokens():
    _step_and_compare(True, [1] * 11, rewind=(6, 3), dtype=torch.float32)


@needs_triton
def test_fused_decode_chooses_what_pytorch_chooses_in_a_nan_row():
    _fused_nan_row("cpu")


def _fused_nan_row(device):
    """A row whose visible compressed scores hold a NaN scores every block 0 in both steps
    (select_blocks' rule): the same blocks, the same NaN outputs."""
    from nsa_flex.inference.cache import compressor_or_mean as _compressor
    from nsa_flex.inference.decode import _decode_torch as _decode
    from nsa_flex.inference.decode_fused import launch_decode as _decode_fused

    B, Hkv, G, D, P = 1, 1, 2, 16, 30
    q, k, v = _inputs(P + 4, torch.float32, B=B, Hkv=Hkv, G=G, D=D, seed=4, device=device)
    # compressed blocks 4 and 5, seen from token 23 and 27; they overlap selection blocks 2 and
    # 3, so a NaN importance there would outrank the tie rule's block 1
    k[0, 0, 21, 1] = NAN
    cache = NSACache(B, Hkv, 40, D, config=CONFIG, device=device)
    prefill(cache, q[:, :, :P], k[:, :, :P], v[:, :, :P], backend="reference")
    ours = cache.clone()
    mean = _compressor(None, CONFIG)
    for t in range(P, P + 4):
        sl = slice(t, t + 1)
        want, want_idx = _decode(cache, q[:, :, sl], k[:, :, sl], v[:, :, sl], None, CONFIG, D**-0.5, mean, mean)
        got, got_idx = _decode_fused(ours, q[:, :, sl], k[:, :, sl], v[:, :, sl], None, CONFIG, D**-0.5, None, None)
        assert torch.isnan(want).all()
        assert torch.equal(got_idx, want_idx)
        torch.testing.assert_close(got, want, equal_nan=True)


# -------------------------------------------------- a row the score_mod masks whole


def _masks_row(row, kv_mod=None):
    def score_mod(score, b, h, q_idx, kv_idx):
        hit = q_idx == row
        if kv_mod is not None:
            hit = hit & (kv_idx % CONFIG.compress_stride == kv_mod)
        return torch.where(hit, float("-inf"), score)

    return score_mod


@pytest.mark.parametrize("backend", ["reference", "flex"])
def test_a_row_the_score_mod_masks_whole_contributes_zero(backend):
    T, row = 30, 20
    dtype = torch.float64 if backend == "reference" else torch.float32
    q, k, v = _inputs(T, dtype)
    out, aux = attend(q, k, v, config=CONFIG, backend=backend, score_mod=_masks_row(row), return_aux=True)
    for branch in ("o_cmp", "o_slc", "o_swa"):
        o = getattr(aux, branch)
        assert torch.isfinite(o).all(), branch
        assert torch.equal(o[:, :, row], torch.zeros_like(o[:, :, row])), branch
    assert torch.equal(out[:, :, row], torch.zeros_like(out[:, :, row]))


@pytest.mark.parametrize("backend", ["reference", "flex"])
def test_selection_grad_with_a_compressed_row_masked_whole(backend):
    """The score_mod hides every compressed block from query 20 (blocks are seen at tokens
    4i + 7, all 3 mod 4) and a quarter of its other keys: its importance is 0, not NaN."""
    T, row = 30, 20
    dtype = torch.float64 if backend == "reference" else torch.float32
    q, k, v = _inputs(T, dtype)
    q.requires_grad_()
    sm = _masks_row(row, kv_mod=3)
    scores = block_scores(q, mean_compress(k, CONFIG), config=CONFIG, score_mod=sm)
    assert torch.equal(scores[:, :, row], torch.zeros_like(scores[:, :, row]))
    out, aux = attend(q, k, v, config=CONFIG, backend=backend, score_mod=sm, selection_grad=True, return_aux=True)
    assert torch.isfinite(out).all()
    assert torch.equal(aux.o_cmp[:, :, row], torch.zeros_like(aux.o_cmp[:, :, row]))
    plain = attend(q, k, v, config=CONFIG, backend=backend, score_mod=sm)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    assert torch.isfinite(torch.autograd.grad(out.sum(), q)[0]).all()


# ------------------------------------------------------------- selection's scoring kernel


@needs_triton
def test_fused_scoring_ignores_compressed_keys_a_query_cannot_see():
    """The Triton scoring kernel: a NaN compressed key changes nothing for the queries before
    it, and rows that see it score every block 0, as the PyTorch path scores them."""
    from nsa_flex.ops.scoring import launch_scoring as _select_fused
    from nsa_flex import select_blocks

    T = 48
    q, k, _ = _inputs(T, torch.float32, B=1, Hkv=2, G=2)
    k_cmp = mean_compress(k, CONFIG)
    bad = k_cmp.clone()
    bad[0, 1, 6, 4] = NAN  # seen from token 31
    clean = _select_fused(q, k_cmp, CONFIG, 0.25)
    got = _select_fused(q, bad, CONFIG, 0.25)
    assert torch.equal(got[:, :, :31], clean[:, :, :31])
    assert torch.equal(got[:, 0], clean[:, 0])  # the other KV head
    assert torch.equal(got, select_blocks(q, bad, config=CONFIG, scale=0.25))
    assert not torch.equal(got[:, 1, 31:], clean[:, 1, 31:])
