"""Inference with NSACache: prefill + decode steps give the full forward's outputs.

Every backend prefills (reference in float64, flex and triton in float32; triton runs under
Triton's CPU interpreter here, so its shapes stay tiny); decode steps are shared code.
"""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from nsa_flex import NSACache, NSAConfig, SparseAttention, attend, decode_step, mean_compress, prefill
from nsa_flex.triton_backend import available

from strategies import configs, rel_err

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
TRITON = available(torch.device("cpu"))[0]
SMALL = NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=3, num_initial=1, num_local=1, window=8)


def make_layer(config, G, Hkv, dim_head=8, backend="reference", dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    layer = SparseAttention(16, heads=G * Hkv, kv_heads=Hkv, dim_head=dim_head, config=config, backend=backend, bias=True)
    with torch.no_grad():  # a compressor far from the block mean: decode must run the learned one
        for comp in (layer.compress_k, layer.compress_v):
            comp.mlp[-1].weight.mul_(4.0)
    return layer.to(dtype)


def run_cached(layer, x, prompt, steps, max_len=None):
    """Prefill ``x[:, :prompt]``, then decode ``steps`` tokens at a time; all outputs concatenated."""
    cache = layer.new_cache(x.shape[0], max_len or x.shape[1])
    outs = [layer.prefill(x[:, :prompt], cache)]
    i = prompt
    for m in steps:
        outs.append(layer.decode(x[:, i : i + m], cache))
        i += m
    return torch.cat(outs, dim=1), cache


def step_sizes(max_total):
    return st.lists(st.integers(1, 4), min_size=1, max_size=12).map(lambda s: _cap(s, max_total))


def _cap(sizes, total):
    out, used = [], 0
    for m in sizes:
        m = min(m, total - used)
        if m <= 0:
            break
        out.append(m)
        used += m
    return out or [1]


CASES = dict(
    reference=dict(dtype=torch.float64, dim_head=8, max_prompt=48, max_steps=30),
    flex=dict(dtype=torch.float32, dim_head=8, max_prompt=48, max_steps=30),
    triton=dict(dtype=torch.float32, dim_head=16, max_prompt=20, max_steps=12),
)


def _decode_matches_forward(backend, config, G, Hkv, B, prompt, steps, seed):
    c = CASES[backend]
    layer = make_layer(config, G, Hkv, c["dim_head"], backend, c["dtype"], seed)
    T = prompt + sum(steps)
    x = torch.randn(B, T, 16, dtype=c["dtype"], generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        full = layer(x)
        got, cache = run_cached(layer, x, prompt, steps, max_len=T + 3)
    assert got.shape == full.shape and torch.isfinite(got).all()
    assert torch.equal(cache.lengths, torch.full((B,), T))
    assert rel_err(got, full) < TOL[c["dtype"]], (prompt, steps)
    # the decode steps themselves, not only the prompt, agree
    assert rel_err(got[:, prompt:], full[:, prompt:]) < TOL[c["dtype"]]


prompts = lambda hi: st.one_of(st.sampled_from([0, 1, 2, 7, 8, 9, 16, 17]), st.integers(0, hi))


@given(
    configs(max_block=24), st.sampled_from([1, 2, 3, 4, 6, 8]), st.integers(1, 2), st.integers(1, 2),
    prompts(48), step_sizes(30), st.integers(0, 2**31 - 1),
)
def test_decode_matches_forward_reference(config, G, Hkv, B, prompt, steps, seed):
    _decode_matches_forward("reference", config, G, Hkv, B, prompt, steps, seed)


@given(
    configs(max_block=24), st.sampled_from([1, 2, 3, 4, 6, 8]), st.integers(1, 2), st.integers(1, 2),
    prompts(48), step_sizes(30), st.integers(0, 2**31 - 1),
)
def test_decode_matches_forward_flex(config, G, Hkv, B, prompt, steps, seed):
    _decode_matches_forward("flex", config, G, Hkv, B, prompt, steps, seed)


@pytest.mark.skipif(not TRITON, reason="no CUDA and no Triton interpreter")
@settings(max_examples=15)
@given(
    configs(max_block=16), st.sampled_from([1, 2, 3, 8]), st.just(1), st.just(1),
    prompts(20), step_sizes(12), st.integers(0, 2**31 - 1),
)
def test_decode_matches_forward_triton(config, G, Hkv, B, prompt, steps, seed):
    _decode_matches_forward("triton", config, G, Hkv, B, prompt, steps, seed)


@given(configs(max_block=24), st.sampled_from([1, 2, 4, 8]), prompts(40), step_sizes(24), st.integers(0, 2**31 - 1))
def test_functional_decode_matches_attend(config, G, prompt, steps, seed):
    """attend() users: mean compression, given gates, no module."""
    B, Hkv, Dk, Dv = 2, 2, 16, 8
    T = prompt + sum(steps)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * G, T, Dk, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, T, Dk, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, T, Dv, generator=g, dtype=torch.float64)
    gates = torch.rand(B, Hkv * G, T, 3, generator=g, dtype=torch.float64)
    full = attend(q, k, v, gates, config=config, backend="reference")
    cache = NSACache(B, Hkv, T, Dk, Dv, config=config, dtype=torch.float64)
    sl = lambda x, a, b: x[:, :, a:b]
    outs = [prefill(cache, sl(q, 0, prompt), sl(k, 0, prompt), sl(v, 0, prompt), sl(gates, 0, prompt), backend="reference")]
    i = prompt
    for m in steps:
        outs.append(decode_step(cache, sl(q, i, i + m), sl(k, i, i + m), sl(v, i, i + m), sl(gates, i, i + m)))
        i += m
    assert rel_err(torch.cat(outs, dim=2), full) < TOL[torch.float64]
    # the cache holds what a full pass computes
    torch.testing.assert_close(cache.k, k)
    torch.testing.assert_close(cache.k_cmp, mean_compress(k, config), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cache.v_cmp, mean_compress(v, config), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- rows of different lengths


@pytest.mark.parametrize("backend, dtype", [("reference", torch.float64), ("flex", torch.float32)])
def test_rows_of_different_lengths(backend, dtype):
    """Right-padded prompts with per-row lengths (one empty); each row equals its own forward."""
    layer = make_layer(SMALL, G=2, Hkv=2, backend=backend, dtype=dtype)
    lengths = [0, 5, 17, 9]
    steps = [1, 1, 3, 1, 2, 1, 4, 1, 1, 1, 1, 1]
    T = max(lengths)
    g = torch.Generator().manual_seed(3)
    rows = [torch.randn(1, n + sum(steps), 16, generator=g, dtype=dtype) for n in lengths]
    prompt = torch.zeros(len(rows), T, 16, dtype=dtype)
    prompt[:] = 1e3  # padding: any finite value, it must not matter
    for b, (r, n) in enumerate(zip(rows, lengths)):
        prompt[b, :n] = r[0, :n]
    with torch.no_grad():
        cache = layer.new_cache(len(rows), T + sum(steps))
        first = layer.prefill(prompt, cache, lengths=torch.tensor(lengths))
        decoded, i = [], 0
        for m in steps:
            x = torch.cat([r[:, n + i : n + i + m] for r, n in zip(rows, lengths)])
            decoded.append(layer.decode(x, cache))
            i += m
        decoded = torch.cat(decoded, dim=1)
        for b, (r, n) in enumerate(zip(rows, lengths)):
            full = layer(r)
            if n:
                assert rel_err(first[b, :n], full[0, :n]) < TOL[dtype], b
            assert rel_err(decoded[b], full[0, n:]) < TOL[dtype], b
    assert cache.lengths.tolist() == [n + sum(steps) for n in lengths]


def test_speculative_steps_and_rewind():
    """Verify 4 draft tokens, keep a different number per row, continue: as if only kept ones came."""
    layer = make_layer(SMALL, G=2, Hkv=1)
    B, P = 2, 13
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, 40, 16, generator=g, dtype=torch.float64)
    draft = torch.randn(B, 4, 16, generator=g, dtype=torch.float64)
    kept = torch.tensor([1, 3])
    with torch.no_grad():
        cache = layer.new_cache(B, 40)
        layer.prefill(x[:, :P], cache)
        layer.decode(draft, cache)
        cache.rewind_(4 - kept)
        assert cache.lengths.tolist() == [P + 1, P + 3]
        nxt = layer.decode(x[:, 20:26], cache)
        for b in range(B):
            seq = torch.cat([x[b : b + 1, :P], draft[b : b + 1, : kept[b]], x[b : b + 1, 20:26]], dim=1)
            assert rel_err(nxt[b], layer(seq)[0, -6:]) < 1e-10


def _tokens(B, Hkv, G, T, D, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hkv * G, T, D, generator=g, dtype=dtype), torch.randn(B, Hkv, T, D, generator=g, dtype=dtype),
            torch.randn(B, Hkv, T, D, generator=g, dtype=dtype),
            torch.rand(B, Hkv * G, T, 3, generator=g, dtype=dtype))


@pytest.mark.parametrize("per_row", [False, True], ids=["int", "tensor"])
def test_speculative_loop_runs_to_max_len_without_sync_bound(per_row):
    """Decode 3 draft tokens, rewind 2, again and again: a rewind lowers the host-side bound
    too, so the loop runs until the rows really reach max_len (no sync_bound() needed)."""
    B, Hkv, G, D, P, L = 2, 1, 2, 8, 10, 20
    q, k, v, gates = _tokens(B, Hkv, G, L, D, seed=7)
    drafts = _tokens(B, Hkv, G, 3 * L, D, seed=8)
    cache = NSACache(B, Hkv, L, D, config=SMALL, dtype=torch.float64)
    prefill(cache, q[:, :, :P], k[:, :, :P], v[:, :, :P], gates[:, :, :P], backend="reference")
    rows = [[x[b, :, :P] for x in (q, k, v, gates)] for b in range(B)]  # what each row holds
    rounds = 0
    while int(cache.lengths.max()) + 3 <= L:
        step = [x[:, :, 3 * rounds : 3 * rounds + 3] for x in drafts]
        out = decode_step(cache, *step)
        # keep 1 token per row (int), or 1 and 2 alternately per row (tensor)
        kept = [1, 1] if not per_row else [1 + (rounds + b) % 2 for b in range(B)]
        cache.rewind_(torch.tensor([3 - n for n in kept]) if per_row else 2)
        for b in range(B):
            seq = [torch.cat([r, x[b]], dim=1) for r, x in zip(rows[b], step)]
            full = attend(*(x[None] for x in seq), config=SMALL, backend="reference")
            assert rel_err(out[b], full[0, :, -3:]) < 1e-10, (rounds, b)
            rows[b] = [x[:, : x.shape[1] - 3 + kept[b]] for x in seq]
        rounds += 1
        assert cache.lengths.tolist() == [r[0].shape[1] for r in rows]
        assert cache._bound == int(cache.lengths.max())  # a rewind keeps the bound exact
    assert rounds >= 5 and int(cache.lengths.max()) > L - 3
    with pytest.raises(ValueError, match="max_len"):
        decode_step(cache, *(x[:, :, :3] for x in drafts))
    room = L - int(cache.lengths.max())
    if room:
        decode_step(cache, *(x[:, :, :room] for x in drafts))
    assert int(cache.lengths.max()) == L


def test_rewind_refuses_negative_counts_and_floors_at_zero():
    cache = NSACache(2, 1, 40, 8, config=SMALL, dtype=torch.float64)
    q, k, v, _ = _tokens(2, 1, 2, 10, 8, seed=1)
    prefill(cache, q, k, v, lengths=torch.tensor([10, 4]), backend="reference")
    for bad in (torch.tensor(-35), torch.tensor([3, -1]), torch.tensor([-2, -2], dtype=torch.int32)):
        with pytest.raises(ValueError, match="num_tokens must be >= 0"):
            cache.rewind_(bad)
        assert cache.lengths.tolist() == [10, 4] and cache._bound == 10  # untouched
    with pytest.raises(ValueError, match="num_tokens must be >= 0"):
        cache.rewind_(-1)
    with pytest.raises(TypeError, match="num_tokens"):
        cache.rewind_(torch.tensor([1.0, 2.0]))
    cache.rewind_(torch.tensor([1, 6]))  # over-long for row 1: stops at 0
    assert cache.lengths.tolist() == [9, 0] and cache._bound == 9
    cache.rewind_(torch.tensor(2, dtype=torch.uint8))
    assert cache.lengths.tolist() == [7, 0] and cache._bound == 7
    cache.rewind_(50)
    assert cache.lengths.tolist() == [0, 0] and cache._bound == 0


def test_rewind_clamps_on_the_device_when_values_cannot_be_read():
    """Compiled (nothing may be read): a negative count is taken as 0, never lengthening a row;
    the host-side bound stays where it was (an upper bound still)."""
    torch._dynamo.reset()
    cache = NSACache(2, 1, 40, 8, config=SMALL, dtype=torch.float64)
    q, k, v, _ = _tokens(2, 1, 2, 10, 8, seed=1)
    prefill(cache, q, k, v, lengths=torch.tensor([10, 4]), backend="reference")

    def rewind(n):
        cache.rewind_(n)
        return cache.lengths + 0

    compiled = torch.compile(rewind, fullgraph=True, backend="eager")
    assert compiled(torch.tensor([-35, 1])).tolist() == [10, 3]
    assert compiled(torch.tensor([2, -7])).tolist() == [8, 3]
    assert compiled(torch.tensor([9, 9])).tolist() == [0, 0]
    assert cache._bound == 10
    prefill(cache, q, k, v, lengths=torch.tensor([10, 4]), backend="reference")

    def rewind_two():
        cache.rewind_(2)
        return cache.lengths + 0

    assert torch.compile(rewind_two, fullgraph=True, backend="eager")().tolist() == [8, 2]
    assert cache._bound == 10  # an int too: what is captured runs later, at each replay
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "m, fused", [(1, False), (3, False), pytest.param(1, True, marks=pytest.mark.skipif(not TRITON, reason="no Triton"))]
)
def test_a_step_past_max_len_keeps_lengths_at_max_len(m, fused):
    """What a CUDA-graph replay past max_len does (simulated: a host-side bound left behind, as
    replays leave it): its tokens past max_len go to the spare slot, and the lengths stop at
    max_len, so the cache still describes what it holds."""
    L, D = 24, 16
    q, k, v, gates = _tokens(2, 1, 2, L + 10, D, seed=3, dtype=torch.float32)
    cache = NSACache(2, 1, L, D, config=SMALL)
    prefill(cache, q[:, :, : L - 1], k[:, :, : L - 1], v[:, :, : L - 1], lengths=torch.tensor([L - 1, L - 2]),
            backend="reference")
    held = cache.k.clone()
    for i in range(3):
        cache._bound = 0  # the host does not know what replays did
        sl = slice(L - 1 + i * m, L - 1 + (i + 1) * m)
        out = decode_step(cache, q[:, :, sl], k[:, :, sl], v[:, :, sl], gates[:, :, sl], fused=fused)
        assert out.shape == (2, 2, m, D) and torch.isfinite(out).all()
        assert cache.lengths.tolist() == [L, min(L - 2 + (i + 1) * m, L)], i
    # the tokens that fit are in place; the rest went nowhere but the spare slot
    assert torch.equal(cache.k[0, :, : L - 1], held[0, :, : L - 1])
    assert torch.equal(cache.k[0, :, L - 1], k[0, :, L - 1])
    assert torch.equal(cache.k[1, :, : L - 2], held[1, :, : L - 2])
    assert torch.equal(cache.k[1, :, L - 2 :], k[1, :, L - 1 : L + 1])  # its first two new tokens
    cache.sync_bound()
    assert cache._bound == L
    with pytest.raises(ValueError, match="max_len"):
        decode_step(cache, q[:, :, :1], k[:, :, :1], v[:, :, :1])


PADDING = [float("nan"), float("inf"), -float("inf"), 1e30]


def _padded_prompt(B, Hkv, G, T, D, lengths, fill, seed, dtype):
    q, k, v, gates = _tokens(B, Hkv, G, T, D, seed, dtype)
    pad = torch.arange(T) >= torch.tensor(lengths)[:, None]  # (B, T)
    bad = [x.masked_fill(pad[:, None, :, None], fill) for x in (q, k, v, gates)]
    return (q, k, v, gates), bad


@pytest.mark.parametrize("fill", PADDING, ids=["nan", "inf", "-inf", "1e30"])
@pytest.mark.parametrize(
    "backend, dtype, D",
    [("reference", torch.float64, 8), ("flex", torch.float32, 8),
     pytest.param("triton", torch.float32, 16, marks=pytest.mark.skipif(not TRITON, reason="no Triton"))],
)
def test_prefill_padding_never_reaches_a_real_output(backend, dtype, D, fill):
    """Right padding holding NaN or inf (q, k, v, gates, and the given compressed blocks that
    reach into it) changes no real output and leaves nothing non-finite in the cache."""
    B, Hkv, G, T, L = 3, 1, 2, 13, 20
    lengths = [13, 6, 0]
    (q, k, v, gates), bad = _padded_prompt(B, Hkv, G, T, D, lengths, fill, seed=2, dtype=dtype)
    k_cmp, v_cmp = mean_compress(bad[1], SMALL), mean_compress(bad[2], SMALL)  # blocks over padding: non-finite
    runs = {}
    for given in (False, True):
        cache = NSACache(B, Hkv, L, D, config=SMALL, dtype=dtype)
        extra = dict(k_cmp=k_cmp, v_cmp=v_cmp) if given else {}
        out = prefill(cache, *bad, lengths=torch.tensor(lengths), backend=backend, **extra)
        runs[given] = out
        for b, n in enumerate(lengths):
            assert torch.all(out[b, :, n:] == 0), b
            if n:
                full = attend(*(x[b : b + 1, :, :n] for x in (q, k, v, gates)), config=SMALL, backend=backend)
                assert rel_err(out[b, :, :n], full[0]) < TOL[dtype], (given, b)
        for name in ("k", "v", "k_cmp", "v_cmp"):
            assert torch.isfinite(getattr(cache, name)).all(), name
    # a step after it sees only the real tokens
    step = _tokens(B, Hkv, G, 1, D, seed=9, dtype=dtype)
    got = decode_step(cache, *step, fused=False)
    for b, n in enumerate(lengths):
        seq = [torch.cat([x[b : b + 1, :, :n], s[b : b + 1]], dim=2) for x, s in zip((q, k, v, gates), step)]
        full = attend(*seq, config=SMALL, backend="reference")
        assert rel_err(got[b], full[0, :, -1:]) < TOL[dtype], b


@pytest.mark.parametrize("fill", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_module_prefill_padding_never_reaches_a_real_output(fill):
    layer = make_layer(SMALL, G=2, Hkv=1)
    x = torch.randn(2, 14, 16, dtype=torch.float64)
    lengths = [14, 5]
    bad = x.clone()
    bad[1, 5:] = fill
    with torch.no_grad():
        cache = layer.new_cache(2, 20)
        out = layer.prefill(bad, cache, lengths=torch.tensor(lengths))
        assert rel_err(out[0], layer(x[:1])[0]) < 1e-10
        assert rel_err(out[1, :5], layer(x[1:, :5])[0]) < 1e-10
        assert torch.isfinite(out).all()


def test_decode_from_an_empty_cache_and_reuse_after_reset():
    layer = make_layer(SMALL, G=1, Hkv=2)
    x = torch.randn(1, 20, 16, dtype=torch.float64)
    with torch.no_grad():
        full = layer(x)
        cache = layer.new_cache(1, 20)
        got = torch.cat([layer.decode(x[:, i : i + 1], cache) for i in range(20)], dim=1)
        assert rel_err(got, full) < 1e-10
        with pytest.raises(ValueError, match="max_len"):
            layer.decode(x[:, :1], cache)
        cache.reset()
        again, _ = run_cached(layer, x, 11, [9])
        assert rel_err(again, full) < 1e-10


def test_clone_and_copy():
    layer = make_layer(SMALL, G=1, Hkv=1)
    x = torch.randn(1, 30, 16, dtype=torch.float64)
    with torch.no_grad():
        cache = layer.new_cache(1, 30)
        layer.prefill(x[:, :20], cache)
        saved = cache.clone()
        a = layer.decode(x[:, 20:25], cache)
        cache.copy_(saved)
        assert cache.lengths.tolist() == [20] and cache._bound == 20
        torch.testing.assert_close(layer.decode(x[:, 20:25], cache), a, rtol=0, atol=0)
    with pytest.raises(ValueError, match="k is"):
        cache.copy_(NSACache(1, 1, 31, 8, config=SMALL, dtype=torch.float64))


# --------------------------------------------------------------- no host sync in a step


def test_decode_step_reads_nothing_from_the_device():
    """On the meta device every value read (.item(), bool(), data-dependent shapes) raises: a
    step that runs there does no host-device sync and is capturable in a CUDA graph."""
    layer = make_layer(SMALL, G=2, Hkv=2, dtype=torch.float32).to("meta")
    cache = layer.new_cache(2, 64)
    cache._bound = 30  # as a prefill would have set it
    out = layer.decode(torch.empty(2, 3, 16, device="meta"), cache)
    assert out.shape == (2, 3, 16) and out.device.type == "meta"


def test_decode_step_traces_into_one_graph():
    """torch.compile(fullgraph=True) refuses graph breaks: no data-dependent Python in a step."""
    torch._dynamo.reset()
    config = SMALL
    cache = NSACache(1, 1, 40, 8, config=config)
    prefill(cache, *(torch.randn(1, 1, 17, 8) for _ in range(3)))

    def step(q, k, v):
        return decode_step(cache, q, k, v)

    q = torch.randn(1, 2, 1, 8)
    k, v = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    out = torch.compile(step, fullgraph=True, backend="eager")(q, k, v)
    assert out.shape == (1, 2, 1, 8)
    torch._dynamo.reset()


# --------------------------------------------------------------------------- bad input


def _cache(**kw):
    args = dict(batch_size=2, kv_heads=2, max_len=32, dim_head=8, config=SMALL, dtype=torch.float64) | kw
    return NSACache(**args)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(kv_heads=1.0), TypeError, "kv_heads"),
        (dict(max_len=0), ValueError, "max_len"),
        (dict(dim_head=True), TypeError, "dim_head"),
        (dict(dim_head_v=0), ValueError, "dim_head_v"),
        (dict(dtype=torch.int32), TypeError, "dtype"),
        (dict(config={"window": 8}), TypeError, "config"),
    ],
)
def test_cache_rejects_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _cache(**kwargs)


def qkv(B=2, Hq=4, Hkv=2, m=1, Dk=8, Dv=8, dtype=torch.float64):
    return torch.randn(B, Hq, m, Dk, dtype=dtype), torch.randn(B, Hkv, m, Dk, dtype=dtype), torch.randn(B, Hkv, m, Dv, dtype=dtype)


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: ("cache", *qkv()), TypeError, "cache must be an NSACache"),
        (lambda: (_cache(), *qkv(B=3)), ValueError, "batch"),
        (lambda: (_cache(), *qkv(Hq=6, Hkv=3)), ValueError, "k has 3 heads"),
        (lambda: (_cache(), *qkv(Dk=16)), ValueError, "head dims"),
        (lambda: (_cache(), *qkv(Dv=4)), ValueError, "head dims"),
        (lambda: (_cache(), *qkv(dtype=torch.float32)), TypeError, "dtype"),
        (lambda: (_cache(device="meta"), *qkv()), ValueError, "on cpu but the cache is on meta"),
        (lambda: (_cache(), *qkv(m=33)), ValueError, "max_len"),
        (lambda: (_cache(), qkv()[0][0], *qkv()[1:]), ValueError, "q must have 4"),
        (lambda: (_cache(), *qkv(Hq=3)), ValueError, "multiple"),
    ],
)
def test_decode_step_rejects_bad_input(make, exc, match):
    with pytest.raises(exc, match=match):
        decode_step(*make())


def test_decode_step_rejects_bad_gates_and_compressors():
    cache = _cache()
    q, k, v = qkv()
    with pytest.raises(ValueError, match="gates"):
        decode_step(cache, q, k, v, torch.rand(2, 4, 2, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="compress_k"):
        decode_step(cache, q, k, v, compress_k="mean")
    with pytest.raises(ValueError, match="compress_v must map"):
        decode_step(cache, *qkv(m=8), compress_v=lambda x: x)
    assert cache.lengths.tolist() == [0, 0]


def test_prefill_rejects_bad_input():
    cache = _cache()
    q, k, v = qkv(m=10)
    with pytest.raises(ValueError, match="longer than the cache's max_len"):
        prefill(cache, *qkv(m=33))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T = 10\]"):
        prefill(cache, q, k, v, lengths=torch.tensor([3, 11]))
    with pytest.raises(ValueError, match="lengths must be"):
        prefill(cache, q, k, v, lengths=torch.tensor([3]))
    with pytest.raises(TypeError, match="lengths must be an integer tensor"):
        prefill(cache, q, k, v, lengths=torch.tensor([3.0, 4.0]))
    with pytest.raises(ValueError, match="backend"):
        prefill(cache, q, k, v, backend="cuda")
    with pytest.raises(TypeError, match="dtype"):
        prefill(cache, *qkv(m=10, dtype=torch.float32))
    with pytest.raises(ValueError, match="k_cmp"):
        prefill(cache, q, k, v, k_cmp=torch.zeros(2, 2, 5, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="num_tokens"):
        cache.rewind_(1.5)
    with pytest.raises(ValueError, match="num_tokens must be a scalar or"):
        cache.rewind_(torch.tensor([1, 2, 3]))


def test_module_rejects_a_foreign_cache_and_bad_x():
    layer = make_layer(SMALL, G=2, Hkv=2)
    with pytest.raises(ValueError, match="not made for this layer"):
        layer.decode(torch.randn(2, 1, 16, dtype=torch.float64), NSACache(2, 1, 32, 8, config=SMALL, dtype=torch.float64))
    cache = layer.new_cache(2, 32)
    with pytest.raises(TypeError, match="cache must be"):
        layer.decode(torch.randn(2, 1, 16, dtype=torch.float64), None)
    with pytest.raises(ValueError, match="x must be"):
        layer.decode(torch.randn(2, 16, dtype=torch.float64), cache)
    with pytest.raises(TypeError, match="x has dtype torch.float32 but the cache"):
        layer.decode(torch.randn(2, 1, 16), cache)
    with pytest.raises(ValueError, match="max_len"):
        layer.prefill(torch.randn(2, 33, 16, dtype=torch.float64), cache)


def test_rotate_at_equals_forward_at_an_offset():
    from nsa_flex.rotary import RotaryEmbedding

    rope = RotaryEmbedding(16)
    x = torch.randn(2, 3, 5, 16)
    pos = torch.tensor([[7, 8, 9, 10, 11], [0, 1, 2, 3, 4]])
    out = rope.rotate_at(x, pos)
    assert torch.equal(out[:1], rope(x[:1], offset=7)) and torch.equal(out[1:], rope(x[1:]))
    with pytest.raises(ValueError, match="positions must be"):
        rope.rotate_at(x, pos[:, :4])
    with pytest.raises(TypeError, match="integer"):
        rope.rotate_at(x, pos.float())


def test_docs_examples_run():
    """The CPU examples of docs/inference.md run and print what their comments say."""
    import contextlib
    import io
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "inference.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "cuda" not in b]
    assert len(blocks) == 4
    for block in blocks:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, "docs/inference.md", "exec"), {"__name__": "docs_example"})
        expected = [line.split("# ", 1)[1].strip() for line in block.splitlines() if line.startswith("print(") and "# " in line]
        assert out.getvalue().split("\n")[: len(expected)] == expected


def test_a_step_past_max_len_counts_its_tokens_in_words():
    cache = NSACache(1, 1, 2, 8, config=SMALL, dtype=torch.float32)

    def qkv(m):
        return torch.randn(1, 2, m, 8), torch.randn(1, 1, m, 8), torch.randn(1, 1, m, 8)

    with pytest.raises(ValueError, match=r"q adds 3 tokens to rows holding up to 0: past the cache's max_len \(2\)"):
        decode_step(cache, *qkv(3))
    decode_step(cache, *qkv(2))
    with pytest.raises(ValueError, match=r"q adds 1 token to rows holding up to 2: past the cache's max_len \(2\)"):
        decode_step(cache, *qkv(1))
