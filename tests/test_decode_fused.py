"""The fused decode step (nsa_flex.inference.decode_fused): its Triton launches, four for a few
rows (kernels.decode) or three for many (kernels.decode_batch, "batched"), against the PyTorch
step, under Triton's interpreter on the CPU."""

import pytest
import torch

from nsa_flex import NSACache, NSAConfig, attend, decode_step, prefill
from nsa_flex.testing import assert_decode_matches_forward
from nsa_flex.triton_backend import available

from strategies import rel_err
from test_cache import make_layer

TRITON = available(torch.device("cpu"))[0]
SMALL = NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=3, num_initial=1, num_local=1, window=8)


FUSED_CONFIG = NSAConfig(compress_block=16, compress_stride=8, select_block=16, num_selected=4, num_initial=1, num_local=2, window=20)


def _fused_against_pytorch(config, G, splits, prompt_lengths, steps, L, seed, compress=None, Dk=16, Dv=16,
                           batched=False):
    """Step a cache with the split kernels and a copy with the PyTorch step, on the same
    inputs: same chosen blocks, outputs to float32 rounding, same cache contents (and, for the
    batched kernels, their arrival counts back at zero)."""
    from nsa_flex.inference.cache import compressor_or_mean as _compressor
    from nsa_flex.inference.decode import _decode_torch as _decode
    from nsa_flex.inference.decode_fused import launch_decode as _decode_fused

    g = torch.Generator().manual_seed(seed)
    B, Hkv = len(prompt_lengths), 2
    P = max(prompt_lengths)
    cache = NSACache(B, Hkv, L, Dk, Dv, config=config, dtype=torch.float32)
    prefill(cache, torch.randn(B, G * Hkv, P, Dk, generator=g), torch.randn(B, Hkv, P, Dk, generator=g),
            torch.randn(B, Hkv, P, Dv, generator=g), lengths=torch.tensor(prompt_lengths),
            compress_k=compress, compress_v=compress)
    ours = cache.clone()
    for _ in range(steps):
        q, k, v = torch.randn(B, G * Hkv, 1, Dk, generator=g), torch.randn(B, Hkv, 1, Dk, generator=g), torch.randn(B, Hkv, 1, Dv, generator=g)
        gates = torch.rand(B, G * Hkv, 1, 3, generator=g)
        scale = Dk**-0.5
        want, want_idx = _decode(cache, q, k, v, gates, config, scale, _compressor(compress, config), _compressor(compress, config))
        got, got_idx = _decode_fused(ours, q, k, v, gates, config, scale, compress, compress, splits=splits,
                                     batched=batched)
        assert torch.equal(got_idx, want_idx), (cache.lengths.tolist(), got_idx.flatten().tolist(), want_idx.flatten().tolist())
        assert rel_err(got, want) < 1e-5, cache.lengths.tolist()
        for name in ("k", "v", "lengths"):
            assert torch.equal(getattr(ours, name), getattr(cache, name)), name
        assert not ours._arrivals.any()  # the last arrivals reset their counts
        # a completed block is the mean of its tokens either way, summed in another order
        for name in ("k_cmp", "v_cmp"):
            torch.testing.assert_close(getattr(ours, name), getattr(cache, name), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not TRITON, reason="no CUDA and no Triton interpreter")
@pytest.mark.parametrize(
    "G, splits, prompts, batched",
    [(1, (1, 1), [0, 14, 29], False), (3, (2, 3), [1, 15, 30], False), (8, (5, 2), [0, 23], False),
     (2, (9, 7), [1, 14, 29], False), (3, (2, 3), [1, 15, 30], True), (2, (9, 7), [1, 14, 29], True),
     (1, (1, 1), [0, 14, 29], True)],
    # 9 and 7 splits leave programs with nothing
    ids=["G1-s1", "G3-s2", "G8-s5", "G2-s9-empty", "batched-G3-s2", "batched-G2-s9-empty", "batched-G1-s1"],
)
def test_fused_decode_equals_the_pytorch_steps(G, splits, prompts, batched):
    # 12 steps from these lengths cross compression (every 8 tokens from 15), selection (every
    # 16) and window (20) boundaries; an empty row and a one-token row
    _fused_against_pytorch(FUSED_CONFIG, G, splits, prompts, steps=12, L=48, seed=G, batched=batched)


@pytest.mark.skipif(not TRITON, reason="no CUDA and no Triton interpreter")
@pytest.mark.parametrize("batched", [False, True], ids=["split", "batched"])
def test_fused_decode_small_blocks_and_head_sizes(batched):
    # l = 8, d = 4, l' = 8 (a window below one tile), Dk != Dv, G = 6; 3 splits
    _fused_against_pytorch(SMALL, 6, (3, 3), [5, 12], steps=12, L=40, seed=11, Dk=32, Dv=16, batched=batched)


@pytest.mark.skipif(not TRITON, reason="no CUDA and no Triton interpreter")
def test_fused_decode_with_a_learned_compressor():
    # a compressor other than the mean: PyTorch writes and compresses, the kernels attend
    from nsa_flex import BlockCompressor

    torch.manual_seed(4)
    comp = BlockCompressor(16, FUSED_CONFIG)
    with torch.no_grad():
        _fused_against_pytorch(FUSED_CONFIG, 2, (2, 2), [13, 30], steps=6, L=48, seed=4, compress=comp)


@pytest.mark.skipif(not TRITON, reason="no CUDA and no Triton interpreter")
@pytest.mark.parametrize("batched", [False, True], ids=["split", "batched"])
def test_fused_top_n_reads_keys_from_memory_past_the_register_tile(monkeypatch, batched):
    # above tuning.KEYS_IN_REGISTERS block keys every round of the top-n reads them again
    from nsa_flex import tuning

    monkeypatch.setattr(tuning, "KEYS_IN_REGISTERS", 16)
    config = NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=5, num_initial=1, num_local=1, window=8)
    _fused_against_pytorch(config, 2, (3, 2), [150, 40], steps=3, L=200, seed=5, batched=batched)


@pytest.mark.skipif(not TRITON, reason="no CUDA and no Triton interpreter")
def test_fused_decode_matches_the_full_forward():
    """Mean compression inside the kernels, rows of different lengths, against attend()."""
    config = FUSED_CONFIG
    B, Hkv, G, D = 2, 2, 4, 16
    prompts, steps = [0, 23], 26
    T = max(prompts) + steps
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, Hkv * G, T, D, generator=g)
    k, v = torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    gates = torch.rand(B, Hkv * G, T, 3, generator=g)
    cache = NSACache(B, Hkv, T, D, config=config)
    prefill(cache, q[:, :, :23], k[:, :, :23], v[:, :, :23], gates[:, :, :23], lengths=torch.tensor(prompts))
    pick = lambda x, i: torch.stack([x[b, :, n + i : n + i + 1] for b, n in enumerate(prompts)])  # noqa: E731
    outs = [decode_step(cache, pick(q, i), pick(k, i), pick(v, i), pick(gates, i), fused=True) for i in range(steps)]
    got = torch.cat(outs, dim=2)
    for b, n in enumerate(prompts):
        full = attend(q[b : b + 1, :, : n + steps], k[b : b + 1, :, : n + steps], v[b : b + 1, :, : n + steps],
                      gates[b : b + 1, :, : n + steps], config=config, backend="reference")
        assert rel_err(got[b], full[0, :, n:]) < 1e-5, b
    assert cache.lengths.tolist() == [n + steps for n in prompts]


def test_decode_step_picks_pytorch_off_cuda(monkeypatch):
    # fused=None (the default) runs the kernels only on CUDA, for one token per row
    import nsa_flex.inference.decode as decode_mod

    def refuse(*args, **kwargs):
        raise AssertionError("the fused step ran")

    monkeypatch.setattr(decode_mod, "launch_decode", refuse)
    cache = NSACache(1, 1, 40, 8, config=SMALL, dtype=torch.float32)
    out = decode_step(cache, torch.randn(1, 2, 1, 8), torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8))
    assert out.shape == (1, 2, 1, 8) and cache.lengths.tolist() == [1]


def test_fused_decode_rejects_what_it_cannot_run():
    cache = NSACache(1, 1, 40, 8, config=SMALL, dtype=torch.float32)
    q, k, v = torch.randn(1, 2, 2, 8), torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8)
    with pytest.raises(ValueError, match="one token"):
        decode_step(cache, q, k, v, fused=True)
    with pytest.raises(TypeError, match="fused must be a bool or None"):
        decode_step(cache, q[:, :, :1], k[:, :, :1], v[:, :, :1], fused=1)


@pytest.mark.skipif(not TRITON, reason="no CUDA and no Triton interpreter")
def test_module_fused_decode_matches_forward():
    layer = make_layer(SMALL, G=2, Hkv=2, dim_head=16, dtype=torch.float32, seed=3)
    x = torch.randn(2, 30, 16)
    assert_decode_matches_forward(layer, x, prompt=9, steps=1, rtol=1e-5, fused=True)
