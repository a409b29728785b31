"""The oracle itself: checked against hand-derived facts of the paper and docs/semantics.md."""

import torch
from hypothesis import given, strategies as st

from nsa_flex import NSAConfig, attend, reference as R

from strategies import configs, make_qkv, Shape

SMALL = NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=3, num_initial=1, num_local=1, window=8)


def test_overlap_weights_follow_eq9():
    # Paper sizes: selection block j overlaps five compressed blocks with weights 1,2,2,2,1.
    m = R.overlap_matrix(1024, NSAConfig())
    j = 5
    col = m[:, j]
    nz = col.nonzero().flatten()
    assert col[nz].tolist() == [1, 2, 2, 2, 1]
    # those blocks start at tokens 16 before block j up to 48 into it
    assert (nz * 16).tolist() == [j * 64 - 16 + 16 * i for i in range(5)]


def test_mean_compress_blocks():
    x = torch.arange(2 * 40, dtype=torch.float64).view(1, 1, 40, 2)
    c = R.mean_compress(x, SMALL)
    assert c.shape == (1, 1, SMALL.num_compressed(40), 2)
    assert torch.equal(c[0, 0, 3], x[0, 0, 12:20].mean(0))


def test_compressed_branch_is_zero_before_first_block_and_never_nan():
    q, k, v = make_qkv(Shape(1, 1, 2, 20, 16, 16), seed=0)
    o, p = R.compressed_attention(q, R.mean_compress(k, SMALL), R.mean_compress(v, SMALL), SMALL, 0.25)
    assert torch.isfinite(o).all()
    assert (o[:, :, : SMALL.compress_block - 1] == 0).all()
    assert (o[:, :, SMALL.compress_block - 1 :] != 0).any(dim=-1).all()
    # rows with something visible are distributions
    sums = p.sum(-1)
    assert torch.allclose(sums[:, :, SMALL.compress_block - 1 :], torch.ones_like(sums[:, :, 7:]))


def test_short_sequence_has_no_compressed_blocks():
    q, k, v = make_qkv(Shape(1, 1, 1, 5, 16, 16), seed=1)
    r = R.attend(q, k, v, config=SMALL)
    assert r.o_cmp.shape == (1, 1, 5, 16) and (r.o_cmp == 0).all()
    assert torch.isfinite(r.out).all()


def test_window_sees_exactly_w_keys():
    T, w = 30, 8
    q = torch.zeros(1, 1, T, 16, dtype=torch.float64)  # uniform attention: output is the mean
    k = torch.randn(1, 1, T, 16, dtype=torch.float64)
    v = torch.arange(T, dtype=torch.float64).view(1, 1, T, 1).expand(1, 1, T, 16)
    o = R.window_attention(q, k, v, NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=3, window=w), 1.0)
    for t in range(T):
        lo = max(0, t - w + 1)
        assert torch.allclose(o[0, 0, t, 0], torch.tensor(sum(range(lo, t + 1)) / (t + 1 - lo), dtype=torch.float64))


@given(configs(), st.integers(1, 200), st.integers(0, 2**31 - 1))
def test_top_n_rules(config, T, seed):
    g = torch.Generator().manual_seed(seed)
    ns = config.num_select_blocks(T)
    scores = torch.rand(1, 2, T, ns, generator=g, dtype=torch.float64)
    idx = R.top_n(scores, config)
    assert idx.shape == (1, 2, T, config.num_selected) and idx.dtype == torch.int32
    for t in range(0, T, max(1, T // 13)):
        cur = t // config.select_block
        row = idx[0, 0, t]
        valid = row[row >= 0].tolist()
        assert valid == sorted(set(valid))  # ascending, unique
        assert (row[len(valid):] == -1).all()  # padding last
        assert all(0 <= j <= cur for j in valid)
        assert len(valid) == min(config.num_selected, cur + 1)
        forced = {j for j in range(config.num_initial) if j <= cur}
        forced |= {j for j in range(cur - config.num_local + 1, cur + 1) if j >= 0}
        assert forced <= set(valid)
        # every unchosen candidate scores no more than every chosen unforced block
        free = [j for j in valid if j not in forced]
        left = [j for j in range(cur + 1) if j not in valid]
        if free and left:
            assert scores[0, 0, t, left].max() <= scores[0, 0, t, free].min()


def test_reference_gradcheck():
    q, k, v = make_qkv(Shape(1, 1, 2, 20, 8, 6), seed=3, requires_grad=True)
    g = torch.rand(1, 2, 20, 3, dtype=torch.float64, requires_grad=True)
    kc = R.mean_compress(k.detach(), SMALL).requires_grad_()
    vc = R.mean_compress(v.detach(), SMALL).requires_grad_()
    idx = R.attend(q, k, v, config=SMALL).block_indices  # fixed selection: gradcheck needs a smooth function

    def f(q, k, v, g, kc, vc):
        sm = lambda s, b, h, qi, ki: 3 * torch.tanh(s / 3)
        return R.attend(q, k, v, g, config=SMALL, k_cmp=kc, v_cmp=vc, block_indices=idx, score_mod=sm).out

    assert torch.autograd.gradcheck(f, (q, k, v, g, kc, vc), fast_mode=True)


def test_reference_backend_traces_whole():
    """attend(backend="reference") under torch.compile(fullgraph=True): no graph break (its top-n
    counts each query's candidates on the host, from T and the config), forward and gradients
    equal to eager."""
    config = NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=3, window=8)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, 40, 16, generator=gen, dtype=torch.float64).requires_grad_() for h in (2, 1, 1))
    gates = torch.rand(1, 2, 40, 3, generator=gen, dtype=torch.float64).requires_grad_()

    def layer(q, k, v, gates):
        return attend(q, k, v, gates, config=config, backend="reference")

    with torch.no_grad():
        explanation = torch._dynamo.explain(layer)(q, k, v, gates)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out, ref = compiled(q, k, v, gates), layer(q, k, v, gates)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    w = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((out * w).sum(), (q, k, v, gates)),
                    torch.autograd.grad((ref * w).sum(), (q, k, v, gates))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    torch._dynamo.reset()


def test_query_chunks_change_nothing(monkeypatch):
    """The reference attends in query chunks (memory-bounded, recomputed in the backward):
    with chunks of a few queries it gives what one chunk gives, forward and gradients, with
    user mods (the score_mod reads absolute query positions), selection_grad and p_cmp."""
    config = NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=3, num_initial=1, num_local=1, window=8)
    B, Hkv, G, T = 2, 2, 2, 37
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(B, Hkv * G, T, 8, generator=gen, dtype=torch.float64).requires_grad_()
    k = torch.randn(B, Hkv, T, 8, generator=gen, dtype=torch.float64).requires_grad_()
    v = torch.randn(B, Hkv, T, 6, generator=gen, dtype=torch.float64).requires_grad_()
    gates = torch.rand(B, Hkv * G, T, 3, generator=gen, dtype=torch.float64).requires_grad_()
    slope = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)  # captured by the score_mod
    w_out = torch.randn(B, Hkv * G, T, 6, generator=gen, dtype=torch.float64)
    tc = config.num_compressed(T)
    w_p = torch.randn(B, Hkv * G, T, tc, generator=gen, dtype=torch.float64)

    def score_mod(s, b, h, qi, kv):
        return s - slope * (qi - kv).abs() + 0.1 * torch.cos(qi.double())

    def mask_mod(b, h, qi, kv):
        return (qi + kv + h) % 5 != 0

    def run():
        r = R.attend(q, k, v, gates, config=config, score_mod=score_mod, mask_mod=mask_mod, selection_grad=True)
        loss = (r.out * w_out).sum() + (r.p_cmp * w_p).sum()
        return r, torch.autograd.grad(loss, (q, k, v, gates, slope))

    assert R._chunk_rows(B, Hkv * G, T, torch.float64) >= T  # one chunk
    one, one_grads = run()
    monkeypatch.setattr(R, "_CHUNK_BYTES", B * Hkv * G * tc * 8 * 3)
    assert R._chunk_rows(B, Hkv * G, tc, torch.float64) == 3 and R._chunk_rows(B, Hkv * G, T, torch.float64) == 1
    many, many_grads = run()
    assert torch.equal(many.block_indices, one.block_indices)
    for name, a, b in zip(R.ReferenceOutput._fields, many, one):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13, msg=name)
    for name, a, b in zip(("q", "k", "v", "gates", "slope"), many_grads, one_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13, msg=f"grad {name}")
    assert one_grads[-1].abs() > 0


def test_query_chunks_of_masked_attention(monkeypatch):
    """The public masked_attention with a broadcast mask, chunked: the same outputs and probabilities."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 19, 8, generator=gen, dtype=torch.float64)
    k, v = torch.randn(1, 2, 11, 8, generator=gen, dtype=torch.float64), torch.randn(1, 2, 11, 5, generator=gen, dtype=torch.float64)
    allowed = torch.rand(1, 1, 19, 11, generator=gen) > 0.3
    one = R.masked_attention(q, k, v, allowed, 0.4, torch.arange(11))
    monkeypatch.setattr(R, "_CHUNK_BYTES", 4 * 11 * 8 * 2)
    many = R.masked_attention(q, k, v, allowed, 0.4, torch.arange(11))
    for a, b in zip(many, one):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)
