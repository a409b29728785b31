"""Chunked prefill (``prefill(..., chunk_size=)``): any chunk size, rows of different lengths;
outputs and every cache field equal one prefill of the whole prompt, and a decode step after
either agrees."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import SMALL_CONFIGS as CONFIGS, rel_err

from nsa_flex import NSACache, SparseAttention, decode_step, prefill
from nsa_flex.triton_support import triton_missing

FIELDS = ("_k", "_v", "_k_cmp", "_v_cmp", "lengths")


def _prompt(B, Hq, Hkv, T, D, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)

    return r(B, Hq, T, D), r(B, Hkv, T, D), r(B, Hkv, T, D), torch.rand(B, Hq, T, 3, generator=g).to(dtype)


def _assert_same_caches(a: NSACache, b: NSACache, tol: float) -> None:
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        if name in ("_k", "_v", "lengths"):
            assert torch.equal(x, y), name  # copies of the prompt
        else:
            assert (x - y).abs().max() <= tol * max(1.0, y.abs().max()), name
    assert a._bound == b._bound


@settings(max_examples=15)
@given(
    config=st.sampled_from(CONFIGS),
    B=st.integers(1, 3),
    G=st.integers(1, 2),
    T=st.integers(1, 48),
    data=st.data(),
    backend=st.sampled_from(["flex", "reference"]),
    padding=st.sampled_from(["none", "rows", "nan"]),
    given_cmp=st.booleans(),
)
def test_chunked_prefill_equals_whole(config, B, G, T, data, backend, padding, given_cmp):
    chunk = data.draw(st.integers(1, T + 2), label="chunk_size")
    Hkv, D = 2, 8
    q, k, v, gates = _prompt(B, Hkv * G, Hkv, T, D, seed=T * 31 + chunk)
    lengths = None
    if padding != "none":
        lengths = torch.tensor(data.draw(st.lists(st.integers(0, T), min_size=B, max_size=B), label="lengths"))
        if padding == "nan":  # the padding may hold anything
            pad = torch.arange(T) >= lengths[:, None]
            q, k, v = (torch.where(pad[:, None, :, None], float("nan"), x) for x in (q, k, v))
    kw = dict(lengths=lengths, backend=backend)
    if given_cmp:
        tc = config.num_compressed(T)
        g = torch.Generator().manual_seed(1)
        kw.update(k_cmp=torch.randn(B, Hkv, tc, D, generator=g, dtype=torch.float64),
                  v_cmp=torch.randn(B, Hkv, tc, D, generator=g, dtype=torch.float64))
    max_len = T + 3
    whole, chunked = (NSACache(B, Hkv, max_len, D, config=config, dtype=torch.float64) for _ in range(2))
    out_whole = prefill(whole, q, k, v, gates, **kw)
    out_chunked = prefill(chunked, q, k, v, gates, chunk_size=chunk, **kw)
    assert out_chunked.shape == out_whole.shape
    assert not out_chunked.isnan().any()
    assert rel_err(out_chunked, out_whole) < 1e-10 or out_whole.abs().max() == out_chunked.abs().max() == 0
    _assert_same_caches(chunked, whole, 1e-12)

    # a decode step after each agrees
    q1, k1, v1, g1 = _prompt(B, Hkv * G, Hkv, 2, D, seed=7)
    a = decode_step(whole, q1, k1, v1, g1)
    b = decode_step(chunked, q1, k1, v1, g1)
    assert rel_err(b, a) < 1e-10
    _assert_same_caches(chunked, whole, 1e-12)


def test_chunks_of_every_size_give_the_same_cache():
    config = CONFIGS[0]
    B, Hq, Hkv, T, D = 2, 4, 2, 37, 8
    q, k, v, gates = _prompt(B, Hq, Hkv, T, D, seed=3)
    lengths = torch.tensor([37, 22])
    ref = NSACache(B, Hkv, T, D, config=config, dtype=torch.float64)
    out = prefill(ref, q, k, v, gates, lengths=lengths)
    for chunk in (1, 4, 5, 16, 36, 37, 100):
        cache = NSACache(B, Hkv, T, D, config=config, dtype=torch.float64)
        got = prefill(cache, q, k, v, gates, lengths=lengths, chunk_size=chunk)
        assert rel_err(got, out) < 1e-10, chunk
        _assert_same_caches(cache, ref, 1e-12)


def test_chunked_prefill_of_the_layer():
    # the layer's learned compressors (BlockCompressor) work block by block: chunks give the same
    torch.manual_seed(0)
    config = CONFIGS[0]
    layer = SparseAttention(32, heads=4, kv_heads=2, dim_head=8, config=config).double().eval()
    x = torch.randn(2, 41, 32, dtype=torch.float64)
    lengths = torch.tensor([41, 30])
    a, b = layer.new_cache(2, 45), layer.new_cache(2, 45)
    with torch.no_grad():
        out_a = layer.prefill(x, a, lengths=lengths)
        out_b = layer.prefill(x, b, lengths=lengths, chunk_size=9)
    assert rel_err(out_b, out_a) < 1e-10
    _assert_same_caches(b, a, 1e-12)
    with torch.no_grad():
        step = torch.randn(2, 1, 32, dtype=torch.float64)
        assert rel_err(layer.decode(step, b), layer.decode(step, a)) < 1e-10


@pytest.mark.parametrize("chunk_size,exc", [(0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError)])
def test_bad_chunk_sizes_raise(chunk_size, exc):
    q, k, v, _ = _prompt(1, 2, 1, 10, 8, 0)
    cache = NSACache(1, 1, 10, 8, config=CONFIGS[0], dtype=torch.float64)
    with pytest.raises(exc, match="chunk_size"):
        prefill(cache, q, k, v, chunk_size=chunk_size)


@pytest.mark.skipif(bool(triton_missing()), reason="needs the triton package")
def test_chunked_prefill_on_the_triton_backend():
    # the Triton selected-branch kernels at each chunk's offset (under the interpreter here)
    config = CONFIGS[0]
    B, Hq, Hkv, T, D = 2, 4, 2, 30, 16
    q, k, v, gates = _prompt(B, Hq, Hkv, T, D, seed=4, dtype=torch.float32)
    lengths = torch.tensor([30, 19])
    whole, chunked = (NSACache(B, Hkv, T, D, config=config) for _ in range(2))
    out = prefill(whole, q, k, v, gates, lengths=lengths, backend="triton")
    got = prefill(chunked, q, k, v, gates, lengths=lengths, backend="triton", chunk_size=7)
    assert rel_err(got, out) < 1e-5
    _assert_same_caches(chunked, whole, 1e-6)
