"""On a CUDA device: chunked prefill (``prefill(..., chunk_size=)``) at 64k tokens of the reference
shape in bf16 equals one prefill of the whole prompt (outputs, cache, the next decode step), with
a lower peak of memory; and queries at an offset (``attend(..., q_offset=)``) equal the rows of
the full call on the CUDA paths (scoring kernel fed the log-sum-exp, FlexAttention forward with
the Triton backward, the triton backend).

The two sides are fast paths both: near-tied blocks may rank differently in bf16 (different
query tiles round the compressed log-sum-exp differently), moving a few rows, so the output is
held to the bf16 bound as a whole (2e-2), the raw cache exactly.
"""

import pytest
import torch

from nsa_flex import NSACache, NSAConfig, attend, decode_step, prefill

from strategies import rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("gpu_numerics")]


def _randn(*shape, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16)


def test_chunked_prefill_at_64k_equals_whole():
    # (4 chunks: each chunk's key length is a new shape for the shared compiled FlexAttention,
    # three graphs a chunk to compile once per process)
    B, Hq, Hkv, T, D, chunk = 1, 64, 4, 65536, 128, 16384
    config = NSAConfig()
    q, k, v = _randn(B, Hq, T, D, seed=0), _randn(B, Hkv, T, D, seed=1), _randn(B, Hkv, T, D, seed=2)
    gates = torch.rand(B, Hq, T, 3, device="cuda", dtype=torch.bfloat16)
    peaks, outs, caches = [], [], []
    for chunk_size in (None, chunk):
        cache = NSACache(B, Hkv, T + 8, D, config=config, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.no_grad():
            outs.append(prefill(cache, q, k, v, gates, chunk_size=chunk_size))
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        caches.append(cache)
    whole, chunked = caches
    assert rel_err(outs[1], outs[0]) < 2e-2
    assert torch.equal(chunked.k, whole.k) and torch.equal(chunked.v, whole.v)
    assert torch.equal(chunked.lengths, whole.lengths)
    assert rel_err(chunked.k_cmp, whole.k_cmp) < 1e-2 and rel_err(chunked.v_cmp, whole.v_cmp) < 1e-2
    # the attention's memory follows the chunk: well below the whole prompt's
    assert peaks[1] < 0.6 * peaks[0], peaks
    step = [_randn(B, h, 1, D, seed=10 + i) for i, h in enumerate((Hq, Hkv, Hkv))]
    assert rel_err(decode_step(chunked, *step), decode_step(whole, *step)) < 2e-2


@pytest.mark.parametrize("backend", ["flex", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_offset_rows_on_cuda(backend, dtype):
    B, Hq, Hkv, T, D, off, tq = 2, 8, 2, 3000, 64, 1100, 700
    config = NSAConfig(num_selected=8, window=256)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, h, T, D, generator=g, device="cuda").to(dtype) for h in (Hq, Hkv, Hkv))
    full_in = [x.clone().requires_grad_() for x in (q, k, v)]
    full, aux = attend(*full_in, config=config, backend=backend, return_aux=True)
    part_in = [q[:, :, off : off + tq].clone().requires_grad_(), k.clone().requires_grad_(), v.clone().requires_grad_()]
    # the same selection on both sides, so that a near-tie cannot change which keys they attend
    idx = aux.block_indices[:, :, off : off + tq]
    out = attend(*part_in, config=config, backend=backend, q_offset=off, block_indices=idx)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(out, full[:, :, off : off + tq]) < tol
    _, aux_p = attend(*[x.detach() for x in part_in], config=config, backend=backend, q_offset=off, return_aux=True)
    agree = (aux_p.block_indices == idx).all(-1).float().mean()
    assert agree > 0.99  # selections of the same rows (near-ties aside)
    w = torch.randn(out.shape, generator=g, device="cuda").to(dtype)
    gf = torch.autograd.grad((full[:, :, off : off + tq] * w).sum(), full_in)
    gp = torch.autograd.grad((out * w).sum(), part_in)
    assert rel_err(gp[0], gf[0][:, :, off : off + tq]) < tol
    for a, b in zip(gp[1:], gf[1:]):
        assert rel_err(a, b) < tol
