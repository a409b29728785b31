"""Length bucketing, ``SparseAttention(length_buckets=...)``: the argument's checks, the bucket
choice, and that padding to the bucket changes nothing the layer returns (outputs, aux and
gradients equal the unpadded layer's: every NSA branch is causal). Also the BlockMask caches'
bound. The compile-count tests are in test_compiled_cpu.py and test_gpu_compile_lengths.py.
"""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nsa_flex import NSAConfig, SparseAttention, masks
from nsa_flex.buckets import bucket_length, check_length_buckets
from nsa_flex.varlen import documents

from strategies import rel_err

SMALL = NSAConfig(
    compress_block=8, compress_stride=4, select_block=8, num_selected=3, num_initial=1, num_local=1, window=8
)


def make_pair(backend, dtype, buckets, seed=0, **kwargs):
    """The same tiny layer twice: without and with ``length_buckets``."""
    torch.manual_seed(seed)
    args = dict(dim=16, heads=2, kv_heads=1, dim_head=16, config=SMALL, bias=True) | kwargs
    plain = SparseAttention(**args, backend=backend).to(dtype)
    bucketed = copy.deepcopy(plain)
    bucketed.length_buckets = buckets
    return plain, bucketed


def grads(layer, x):
    """``x.grad`` then every parameter's gradient (a parameter without one counts as zero: the
    padded run may give a compression MLP a zero gradient where the short one gives none)."""
    return [x.grad] + [torch.zeros_like(p) if p.grad is None else p.grad for p in layer.parameters()]


def run_both(plain, bucketed, x, **kwargs):
    """Forward (with aux) and backward of one random cotangent through both layers."""
    g = torch.randn_like(x, generator=torch.Generator().manual_seed(7)) if x.dtype != torch.float64 else None
    results = []
    for layer in (plain, bucketed):
        xi = x.clone().requires_grad_()
        out, aux = layer(xi, return_aux=True, **kwargs)
        out.backward(torch.ones_like(out) if g is None else g)
        results.append((out, aux, grads(layer, xi)))
    return results


# ------------------------------------------------------------------------------- checks


@pytest.mark.parametrize(
    "value, error, words",
    [
        ("pow3", ValueError, "length_buckets must be None, 'pow2'"),
        (128, TypeError, "length_buckets must be None, 'pow2' or a tuple of ints, got int"),
        (torch.tensor([128, 256]), TypeError, "length_buckets"),
        ((), ValueError, "length_buckets must hold at least one"),
        ((128.0, 256), TypeError, "length_buckets must hold ints"),
        ((True, 256), TypeError, "length_buckets must hold ints"),
        ((0, 256), ValueError, "length_buckets must hold positive"),
        ((256, 128), ValueError, "length_buckets must be strictly increasing"),
        ((128, 128), ValueError, "length_buckets must be strictly increasing"),
    ],
)
def test_bad_length_buckets(value, error, words):
    with pytest.raises(error, match=words):
        SparseAttention(16, 2, config=SMALL, length_buckets=value)
    layer = SparseAttention(16, 2, config=SMALL)
    with pytest.raises(error, match=words):  # checked when set, too
        layer.length_buckets = value
    assert layer.length_buckets is None


def test_length_buckets_normalised():
    assert check_length_buckets(None) is None
    assert check_length_buckets("pow2") == "pow2"
    assert check_length_buckets([64, 128]) == (64, 128)
    assert check_length_buckets(range(64, 257, 64)) == (64, 128, 192, 256)
    layer = SparseAttention(16, 2, config=SMALL, length_buckets=[64, 128])
    assert layer.length_buckets == (64, 128)
    assert "length_buckets=(64, 128)" in repr(layer)
    assert "length_buckets" not in repr(SparseAttention(16, 2, config=SMALL))


@pytest.mark.parametrize(
    "T, buckets, expected",
    [
        (1, "pow2", 1), (2, "pow2", 2), (3, "pow2", 4), (1000, "pow2", 1024), (1024, "pow2", 1024),
        (1025, "pow2", 2048), (8192, "pow2", 8192), (1, (128, 256), 128), (128, (128, 256), 128),
        (129, (128, 256), 256), (256, (128, 256), 256),
    ],
)
def test_bucket_length(T, buckets, expected):
    assert bucket_length(T, buckets) == expected


def test_above_the_largest_bucket_raises():
    with pytest.raises(ValueError, match=r"sequence length 257 is above the largest of length_buckets \(256\)"):
        bucket_length(257, (128, 256))
    _, layer = make_pair("flex", torch.float32, (16, 32))
    with pytest.raises(ValueError, match="length_buckets"):
        layer(torch.randn(1, 33, 16))


def test_empty_x_still_reaches_the_attention_error():
    plain, bucketed = make_pair("flex", torch.float32, "pow2")
    for layer in (plain, bucketed):
        with pytest.raises(ValueError, match="at least one token"):
            layer(torch.randn(1, 0, 16))


# ------------------------------------------------------------------ padded == unpadded


@st.composite
def lengths_and_buckets(draw, max_t=100):
    T = draw(st.integers(1, max_t))
    if draw(st.booleans()):
        return T, "pow2"
    smaller = draw(st.lists(st.integers(1, max_t), max_size=3))
    top = draw(st.integers(T, T + 40))  # some bucket holds T
    return T, tuple(sorted(set(smaller) | {top}))


def assert_same(results, tol):
    """Outputs, aux and gradients of the two runs agree: each within ``tol`` relative to its own
    norm, gradients within ``tol`` relative to the largest gradient (some are round-off around
    an exact zero, e.g. the key compression's while a query sees a single compressed block)."""
    (out, aux, g), (out_b, aux_b, g_b) = results
    assert out_b.shape == out.shape
    assert rel_err(out_b, out) < tol
    assert torch.equal(aux_b.block_indices, aux.block_indices)
    for name in ("o_cmp", "o_slc", "o_swa"):
        assert rel_err(getattr(aux_b, name), getattr(aux, name)) < tol, name
    scale = max(float(b.abs().max()) for b in g)
    for i, (a, b) in enumerate(zip(g_b, g)):
        assert a.shape == b.shape
        assert float((a - b).abs().max()) <= tol * scale, f"gradient {i} (0 is x)"


@given(lengths_and_buckets(), st.integers(1, 2), st.booleans())
def test_bucketed_equals_unpadded_reference_float64(tb, B, selection_grad):
    T, buckets = tb
    plain, bucketed = make_pair("reference", torch.float64, buckets, selection_grad=selection_grad)
    x = torch.randn(B, T, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(T))
    assert_same(run_both(plain, bucketed, x), 1e-10)


@given(lengths_and_buckets(max_t=80), st.integers(1, 2))
def test_bucketed_equals_unpadded_flex_float32(tb, B):
    T, buckets = tb
    plain, bucketed = make_pair("flex", torch.float32, buckets, heads=4, kv_heads=2)
    x = torch.randn(B, T, 16, generator=torch.Generator().manual_seed(T))
    assert_same(run_both(plain, bucketed, x), 1e-5)


@pytest.mark.parametrize("backend, dtype", [("reference", torch.float64), ("flex", torch.float32)])
def test_mods_see_the_padded_positions(backend, dtype):
    """Mods are called at the padded positions too: a per-token tensor they index must reach
    the bucket's length. What they say there changes no returned output."""
    T = 37
    document = torch.arange(64) // 20  # tokens 0..19, 20..36 (and the padding up to 64)

    def same_document(b, h, q_idx, kv_idx):
        return document[q_idx] == document[kv_idx]

    def soft_cap(score, b, h, q_idx, kv_idx):
        return 3.0 * torch.tanh(score / 3.0) + 0.01 * document[kv_idx]

    plain, bucketed = make_pair(backend, dtype, "pow2")
    assert bucket_length(T, bucketed.length_buckets) == document.numel()
    x = torch.randn(2, T, 16, dtype=dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    seen = []

    def spy(b, h, q_idx, kv_idx):
        seen.append(int(q_idx.max()))
        return same_document(b, h, q_idx, kv_idx)

    with torch.no_grad():
        for mods in (dict(mask_mod=same_document), dict(score_mod=soft_cap), dict(mask_mod=same_document, score_mod=soft_cap)):
            assert rel_err(bucketed(x, **mods), plain(x, **mods)) < tol
        if backend == "reference":  # called eagerly on whole index tensors
            bucketed(x, mask_mod=spy)
            assert max(seen) == 63


@pytest.mark.parametrize("backend, dtype", [("reference", torch.float64), ("flex", torch.float32)])
@pytest.mark.parametrize("as_documents", [False, True])
def test_packed_rows(backend, dtype, as_documents):
    """``cu_seqlens``: the padding is one more document; the real ones are unchanged."""
    cu = torch.tensor([0, 23, 24, 24, 61], dtype=torch.int32)  # an empty and a one-token document
    docs = documents(cu) if as_documents else cu
    plain, bucketed = make_pair(backend, dtype, (32, 64, 96))
    x = torch.randn(1, 61, 16, dtype=dtype, generator=torch.Generator().manual_seed(3))
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert_same(run_both(plain, bucketed, x, cu_seqlens=docs), tol)


def test_prefill_and_decode_do_not_pad():
    """The cache path ignores the buckets: a cache of exactly the prompt's length (shorter than
    its bucket) is enough, and prefill + decode equal the bucketed forward."""
    _, layer = make_pair("flex", torch.float32, "pow2")
    x = torch.randn(2, 40, 16)
    cache = layer.new_cache(2, 40)
    with torch.no_grad():
        full = layer(x)
        first = layer.prefill(x[:, :37], cache)
        rest = [layer.decode(x[:, t : t + 1], cache) for t in range(37, 40)]
    assert rel_err(torch.cat([first, *rest], dim=1), full) < 1e-5


# ------------------------------------------------------------------ BlockMask caches


def test_block_mask_caches_stay_bounded():
    """Many lengths: the cached compressed/window BlockMasks never exceed the LRU bound, and
    with buckets a run over many lengths adds one entry per bucket."""
    caches = (masks.block_masks._compressed_block_mask_cached, masks.block_masks._window_block_mask_cached)
    for cache in caches:
        cache.cache_clear()
    config = NSAConfig(compress_block=16, compress_stride=8, select_block=16, num_selected=3, window=32)
    maxsize = caches[0].cache_info().maxsize
    assert maxsize == caches[1].cache_info().maxsize == 64
    for T in range(16, 16 + 3 * maxsize):  # three times the bound, all different
        masks.compressed_block_mask(T, config)
        masks.sliding_window_block_mask(T, config.window)
    for cache in caches:
        info = cache.cache_info()
        assert info.currsize == maxsize and info.misses == 3 * maxsize

    for cache in caches:
        cache.cache_clear()
    layer = SparseAttention(16, 2, dim_head=16, config=config, length_buckets=(64, 128, 192))
    with torch.no_grad():
        for T in range(40, 190, 15):  # 10 lengths in 3 buckets
            layer(torch.randn(1, T, 16))
    for cache in caches:
        assert cache.cache_info().currsize == 3
