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
