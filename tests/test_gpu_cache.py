"""On a CUDA device: decode steps captured in a CUDA graph and replayed agree with the full
forward (bf16, relative error below 2e-2), per-row lengths included; float32 eager decoding
agrees to 1e-5.

Capture follows PyTorch's recipe: warm up on a side stream (which runs a real step, so the
cache is saved before and restored after, in place), capture into static input and output
buffers, then copy_ each step's inputs into them and replay.
"""

import pytest
import torch

from nsa_flex import NSACache, NSAConfig, SparseAttention, attend, decode_step, prefill

from strategies import rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("gpu_numerics")]

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def capture(step, cache):
    """A CUDA graph of ``step()`` (which decodes into ``cache``) and its static output; the
    cache is left as it was before."""
    saved = cache.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm up: lazy inits, cuBLAS handles, allocator, outside the capture
            step()
            cache.copy_(saved)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    cache.copy_(saved)  # capture ran nothing, but keep the host-side bound honest
    torch.cuda.synchronize()
    return graph, out


def replay_steps(step, cache, load, steps, dim):
    """Capture ``step`` (inputs staged by ``load(0)``), then for each ``i < steps`` stage
    ``load(i)``, replay, and keep the output: all of them concatenated along ``dim``."""
    load(0)
    graph, out = capture(step, cache)
    got = []
    for i in range(steps):
        load(i)
        graph.replay()
        got.append(out.clone())
    torch.cuda.synchronize()
    return torch.cat(got, dim=dim)


def padded_rows(seqs):
    """Left-aligned, right-padded ``(B, T, ...)`` from a list of ``(T_b, ...)``."""
    T = max(s.shape[0] for s in seqs)
    out = seqs[0].new_zeros(len(seqs), T, *seqs[0].shape[1:])
    for b, s in enumerate(seqs):
        out[b, : s.shape[0]] = s
    return out


@pytest.mark.parametrize("m, fused", [(1, False), (3, False), (1, True)], ids=["m1", "m3-speculative", "m1-fused"])
def test_functional_decode_in_a_cuda_graph_matches_attend(m, fused):
    torch.manual_seed(0)
    config = NSAConfig(window=256)
    B, Hkv, G, D, dtype = 2, 2, 4, 64, torch.bfloat16
    prompt_lens, steps = [1500, 1111], 30  # steps * m new tokens cross strides and blocks
    total = [n + steps * m for n in prompt_lens]
    T = max(total)
    dev = "cuda"
    q = torch.randn(B, Hkv * G, T, D, device=dev).to(dtype)
    k = torch.randn(B, Hkv, T, D, device=dev).to(dtype)
    v = torch.randn(B, Hkv, T, D, device=dev).to(dtype)
    gates = torch.rand(B, Hkv * G, T, 3, device=dev).to(dtype)
    # Row b holds total[b] tokens; what lies past them in q/k/v is padding the outputs never see.
    full = attend(q, k, v, gates, config=config)

    cache = NSACache(B, Hkv, T, D, config=config, device=dev, dtype=dtype)
    P = max(prompt_lens)
    lengths = torch.tensor(prompt_lens, device=dev)
    with torch.no_grad():
        prefill(cache, q[:, :, :P], k[:, :, :P], v[:, :, :P], gates[:, :, :P], lengths=lengths)

    static = [torch.zeros(B, x.shape[1], m, x.shape[-1], device=dev, dtype=dtype) for x in (q, k, v, gates)]

    def load(i):  # row b's tokens i*m .. i*m + m - 1 after its prompt
        for buf, x in zip(static, (q, k, v, gates)):
            for b, n in enumerate(prompt_lens):
                buf[b].copy_(x[b, :, n + i * m : n + (i + 1) * m])

    step = lambda: decode_step(cache, *static[:3], static[3], fused=fused)  # noqa: E731
    got = replay_steps(step, cache, load, steps, dim=2)  # (B, Hq, steps*m, D)
    assert cache.sync_bound()._bound == max(total)
    assert cache.lengths.tolist() == total
    for b, n in enumerate(prompt_lens):
        expected = full[b, :, n : n + steps * m]
        assert torch.isfinite(got[b]).all()
        assert rel_err(got[b], expected) < TOL[dtype], f"row {b}"


def test_module_decode_in_a_cuda_graph_matches_forward():
    torch.manual_seed(1)
    dtype, dev = torch.bfloat16, "cuda"
    layer = SparseAttention(256, heads=8, kv_heads=2, dim_head=64, config=NSAConfig(window=256)).to(dev, dtype)
    prompt_lens, steps = [1200, 901], 40
    total = [n + steps for n in prompt_lens]
    seqs = [torch.randn(n, 256, device=dev).to(dtype) for n in total]
    x = padded_rows(seqs)
    with torch.no_grad():
        full = layer(x)  # causal: padding after a row's tokens does not reach them
        cache = layer.new_cache(2, max(total) + 8)
        P = max(prompt_lens)
        layer.prefill(x[:, :P], cache, lengths=torch.tensor(prompt_lens, device=dev))
        static_x = torch.zeros(2, 1, 256, device=dev, dtype=dtype)

        def load(i):
            for b, n in enumerate(prompt_lens):
                static_x[b].copy_(x[b, n + i : n + i + 1])

        got = replay_steps(lambda: layer.decode(static_x, cache), cache, load, steps, dim=1)
    for b, n in enumerate(prompt_lens):
        assert torch.isfinite(got[b]).all()
        assert rel_err(got[b], full[b, n : n + steps]) < TOL[dtype], f"row {b}"


def test_graph_replay_equals_eager_decode():
    torch.manual_seed(2)
    dtype, dev = torch.bfloat16, "cuda"
    layer = SparseAttention(256, heads=8, kv_heads=2, dim_head=64, config=NSAConfig(window=256)).to(dev, dtype)
    x = torch.randn(2, 700, 256, device=dev).to(dtype)
    with torch.no_grad():
        cache = layer.new_cache(2, 800)
        layer.prefill(x[:, :690], cache)
        eager_cache = cache.clone()
        eager = torch.cat([layer.decode(x[:, 690 + i : 691 + i], eager_cache) for i in range(10)], dim=1)
        static_x = x[:, 690:691].clone()
        graph, out = capture(lambda: layer.decode(static_x, cache), cache)
        replayed = []
        for i in range(10):
            static_x.copy_(x[:, 690 + i : 691 + i])
            graph.replay()
            replayed.append(out.clone())
        torch.cuda.synchronize()
    assert rel_err(torch.cat(replayed, dim=1), eager) < 1e-3


def test_float32_eager_decode_matches_forward():
    torch.manual_seed(3)
    dev = "cuda"
    layer = SparseAttention(128, heads=8, kv_heads=2, dim_head=32, config=NSAConfig(select_block=32, num_selected=8, window=128)).to(dev)
    x = torch.randn(2, 700, 128, device=dev)
    with torch.no_grad():
        full = layer(x)
        cache = layer.new_cache(2, 700)
        outs = [layer.prefill(x[:, :600], cache)]
        i = 600
        for m in [1, 1, 2, 1, 4, 1, 16, 1, 1, 33, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]:
            outs.append(layer.decode(x[:, i : i + m], cache))
            i += m
    got = torch.cat(outs, dim=1)
    assert rel_err(got, full[:, :i]) < TOL[torch.float32]
    assert rel_err(got[:, 600:], full[:, 600:i]) < TOL[torch.float32]


# ------------------------------------------------- the fused step at the reference shape


def _filled_cache(B, Hkv, D, config, lengths, max_len, dtype, seed):
    """A cache whose row ``b`` holds ``lengths[b]`` random tokens (and their block means)."""
    from nsa_flex import mean_compress

    g = torch.Generator(device="cuda").manual_seed(seed)
    T = max(lengths)
    cache = NSACache(B, Hkv, max_len, D, config=config, device="cuda", dtype=dtype)
    k = torch.randn(B, Hkv, T, D, device="cuda", generator=g).to(dtype)
    v = torch.randn(B, Hkv, T, D, device="cuda", generator=g).to(dtype)
    cache.k[:, :, :T], cache.v[:, :, :T] = k, v  # past a row's length: never visible
    tc = config.num_compressed(T)
    cache.k_cmp[:, :, :tc], cache.v_cmp[:, :, :tc] = mean_compress(k, config), mean_compress(v, config)
    cache.lengths.copy_(torch.tensor(lengths))
    cache._bound = T
    return cache


def _chosen_importance(cache, q, idx, scale):
    """The float64 importance (eqs. 8-10) of each (row, KV head)'s chosen blocks, summed, for
    the query at position ``lengths - 1`` (after its step); forced blocks count 0."""
    from nsa_flex.selection import block_importance

    config, L = cache.config, cache.max_len
    B, Hkv = cache.batch_size, cache.kv_heads
    t = cache.lengths - 1
    tc, ns = config.num_compressed(L), config.num_select_blocks(L)
    qg = q[:, :, 0].unflatten(1, (Hkv, -1)).double()  # (B, Hkv, G, D)
    s = qg @ cache.k_cmp.double().transpose(-1, -2) * scale  # (B, Hkv, G, tc)
    visible = (torch.arange(tc, device="cuda") * config.compress_stride + config.compress_block - 1) <= t[:, None]
    p = torch.softmax(s.masked_fill(~visible[:, None, None], float("-inf")), -1).nan_to_num(0.0).sum(2)
    imp = block_importance(p, config, L)  # (B, Hkv, ns)
    j = torch.arange(ns, device="cuda")
    cur = (t // config.select_block)[:, None]
    forced = (j < config.num_initial) | (j > cur - config.num_local)
    imp = imp.masked_fill(forced[:, None], 0.0)
    chosen = idx[:, :, 0].long()
    return (imp.gather(-1, chosen.clamp_min(0)) * (chosen >= 0)).sum(-1)  # (B, Hkv)


@pytest.mark.parametrize("batched", [False, True], ids=["split", "batched"])
@pytest.mark.parametrize("B", [1, 8])
@pytest.mark.parametrize("T", [8192, 65536])
def test_fused_decode_at_the_reference_shape_in_a_cuda_graph(B, T, batched):
    """The split kernels (kernels.decode, or kernels.decode_batch whatever the batch: its programs
    run concurrently here, unlike under the interpreter) against the PyTorch step, both captured
    in CUDA graphs, the reference shape in bf16, rows of different lengths; 4 steps cross
    compression and selection boundaries.

    The chosen blocks must be equal, except where two blocks' importances tie to float32
    rounding (the two sum their products in different orders): there the chosen blocks'
    float64 importances must agree. Outputs agree to bf16 rounding wherever the blocks do.
    """
    from nsa_flex.inference.cache import compressor_or_mean as _compressor
    from nsa_flex.inference.decode import _decode_torch as _decode
    from nsa_flex.inference.decode_fused import launch_decode as _decode_fused

    torch.manual_seed(T + B)
    config, dtype = NSAConfig(), torch.bfloat16
    Hq, Hkv, D, steps = 64, 4, 128, 4
    scale = D**-0.5
    lengths = [T - 3 - 7 * b for b in range(B)]
    fused = _filled_cache(B, Hkv, D, config, lengths, T + 1, dtype, seed=T)
    ref = fused.clone()
    static = [torch.zeros(B, h, 1, d, device="cuda", dtype=dtype) for h, d in ((Hq, D), (Hkv, D), (Hkv, D), (Hq, 3))]
    mean = _compressor(None, config)
    graph_f, out_f = capture(lambda: _decode_fused(fused, *static, config, scale, None, None, batched=batched), fused)
    graph_r, out_r = capture(lambda: _decode(ref, *static, config, scale, mean, mean), ref)
    mismatched = 0
    for i in range(steps):
        for buf in static[:3]:
            buf.copy_(torch.randn(buf.shape, device="cuda").to(dtype))
        static[3].copy_(torch.rand(static[3].shape, device="cuda").to(dtype))
        graph_f.replay()
        graph_r.replay()
        torch.cuda.synchronize()
        (got, got_idx), (want, want_idx) = out_f, out_r
        assert torch.equal(fused.lengths, ref.lengths) and fused.lengths.tolist() == [n + i + 1 for n in lengths]
        same = (got_idx == want_idx).all(-1)[:, :, 0]  # (B, Hkv)
        mismatched += int((~same).sum())
        if not same.all():
            a, b = _chosen_importance(fused, static[0], got_idx, scale), _chosen_importance(ref, static[0], want_idx, scale)
            assert torch.allclose(a[~same], b[~same], rtol=1e-4, atol=1e-7), (i, a[~same], b[~same])
        rows = same.repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq)
        assert torch.isfinite(got).all()
        assert rel_err(got[rows], want[rows]) < 1e-2, i
    assert mismatched <= steps * B * Hkv // 8, mismatched  # near-ties are rare
    for name in ("k", "v", "k_cmp", "v_cmp"):
        torch.testing.assert_close(getattr(fused, name), getattr(ref, name), rtol=1e-2, atol=1e-2)
    assert not fused._arrivals.any()


def test_fused_is_the_default_on_cuda():
    torch.manual_seed(5)
    config, dtype = NSAConfig(window=128), torch.bfloat16
    cache = _filled_cache(2, 2, 64, config, [700, 333], 800, dtype, seed=5)
    other = cache.clone()
    q, k, v = (torch.randn(2, h, 1, 64, device="cuda").to(dtype) for h in (8, 2, 2))
    with torch.no_grad():
        assert torch.equal(decode_step(cache, q, k, v), decode_step(other, q, k, v, fused=True))
    assert torch.equal(cache.k_cmp, other.k_cmp) and torch.equal(cache.lengths, other.lengths)


def test_replays_past_max_len_and_captured_rewinds_keep_lengths_in_range():
    """Replays skip the host-side check: past max_len a fused step's token goes to the spare
    slot and the lengths stop at max_len; a captured rewind takes negative counts as 0."""
    torch.manual_seed(6)
    config = NSAConfig(compress_block=16, compress_stride=8, select_block=16, num_selected=4, window=32)
    dtype, dev = torch.bfloat16, "cuda"
    B, Hkv, G, D, L, P, steps = 2, 2, 2, 64, 64, 60, 8
    cache = NSACache(B, Hkv, L, D, config=config, device=dev, dtype=dtype)
    q, k, v = (torch.randn(B, h, P, D, device=dev).to(dtype) for h in (Hkv * G, Hkv, Hkv))
    with torch.no_grad():
        prefill(cache, q, k, v, lengths=torch.tensor([P, P - 2], device=dev))
    held = cache.k.clone()
    static = [torch.zeros(B, h, 1, D, device=dev, dtype=dtype) for h in (Hkv * G, Hkv, Hkv)]
    keys = [torch.randn(B, Hkv, 1, D, device=dev).to(dtype) for _ in range(steps)]

    def load(i):
        static[0].copy_(torch.randn(static[0].shape, device=dev).to(dtype))
        static[1].copy_(keys[i])
        static[2].copy_(torch.randn(static[2].shape, device=dev).to(dtype))

    got = replay_steps(lambda: decode_step(cache, *static, fused=True), cache, load, steps, dim=2)
    assert torch.isfinite(got).all()
    assert cache.lengths.tolist() == [L, L]
    for b, start in enumerate((P, P - 2)):
        assert torch.equal(cache.k[b, :, :start], held[b, :, :start])
        for i in range(L - start):  # the tokens that fit; the rest went to the spare slot
            assert torch.equal(cache.k[b, :, start + i], keys[i][b, :, 0])

    counts = torch.zeros(B, dtype=torch.int64, device=dev)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cache.rewind_(counts)
    assert cache.lengths.tolist() == [L, L]  # capture ran nothing
    for n, want in (([-5, 3], [L, L - 3]), ([2, -40], [L - 2, L - 3]), ([100, 1], [0, L - 4])):
        counts.copy_(torch.tensor(n, device=dev))
        graph.replay()
        torch.cuda.synchronize()
        assert cache.lengths.tolist() == want, n
