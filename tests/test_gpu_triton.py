"""The triton backend on a GPU: large shapes, determinism, contention, CUDA graphs.

Tolerances (docs/semantics.md): relative error below 1e-5 in float32, below 2e-2 in bf16.
"""

import pytest
import torch

from nsa_flex import NSAConfig, attend, mean_compress, reference as R, select_blocks
from nsa_flex.api import _selected_branch
from nsa_flex.triton_backend import selected_attention

from strategies import Shape, rel_err

pytestmark = pytest.mark.gpu

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


@pytest.fixture(autouse=True)
def no_tf32_and_room_to_recompile(gpu_numerics):
    yield


def inputs(shape, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g, device="cuda").to(dtype).requires_grad_()

    return rnd(shape.B, shape.Hq, shape.T, shape.Dk), rnd(shape.B, shape.Hkv, shape.T, shape.Dk), rnd(shape.B, shape.Hkv, shape.T, shape.Dv)


def selection(q, k, config):
    return select_blocks(q.detach(), mean_compress(k.detach(), config), config=config)


def fwd_bwd(fn, q, k, v, w):
    out = fn(q, k, v)
    return out, torch.autograd.grad((out.float() * w).sum(), (q, k, v))


SHAPES = [Shape(1, 1, 1, 4096, 64, 64), Shape(1, 2, 3, 4096, 64, 64), Shape(2, 1, 4, 3001, 64, 32), Shape(1, 1, 16, 4096, 192, 128)]


@DTYPES
@pytest.mark.parametrize("shape", SHAPES, ids=[f"G{s.G}-T{s.T}-D{s.Dk}x{s.Dv}" for s in SHAPES])
def test_triton_against_reference(shape, dtype):
    config = NSAConfig()
    q, k, v = inputs(shape, dtype, shape.T + shape.G)
    idx = selection(q, k, config)
    scale = shape.Dk ** -0.5
    w = torch.randn(shape.B, shape.Hq, shape.T, shape.Dv, device="cuda")
    out, grads = fwd_bwd(lambda q, k, v: selected_attention(q, k, v, idx, 64, scale)[0], q, k, v, w)
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref, ref_grads = fwd_bwd(lambda q, k, v: R.selected_attention(q, k, v, idx, config, scale), *ref_in, w.double())
    assert rel_err(out, ref) < TOL[dtype]
    for name, a, b in zip("qkv", grads, ref_grads):
        assert rel_err(a, b) < TOL[dtype], name


@DTYPES
def test_triton_against_flex_at_16k(dtype):
    config = NSAConfig()
    shape = Shape(1, 1, 16, 16384, 128, 128)
    q, k, v = inputs(shape, dtype, 16)
    idx = selection(q, k, config)
    scale = 128**-0.5
    w = torch.randn(1, 16, 16384, 128, device="cuda")
    out, grads = fwd_bwd(lambda q, k, v: selected_attention(q, k, v, idx, 64, scale)[0], q, k, v, w)
    ref, ref_grads = fwd_bwd(lambda q, k, v: _selected_branch(q, k, v, idx, config, scale, backend="flex"), q, k, v, w)
    assert rel_err(out, ref) < TOL[dtype]
    for name, a, b in zip("qkv", grads, ref_grads):
        assert rel_err(a, b) < TOL[dtype], name


def test_backward_is_deterministic_under_contention():
    # every query selects the same 16 blocks: the most queries per block the gather can see
    config = NSAConfig()
    shape = Shape(1, 2, 8, 8192, 128, 128)
    q, k, v = inputs(shape, torch.bfloat16, 7)
    idx = torch.arange(16, dtype=torch.int32, device="cuda").expand(1, 2, 8192, 16).contiguous()
    w = torch.randn(1, 16, 8192, 128, device="cuda")
    fn = lambda q, k, v: selected_attention(q, k, v, idx, 64, 128**-0.5)[0]
    out, g1 = fwd_bwd(fn, q, k, v, w)
    _, g2 = fwd_bwd(fn, q, k, v, w)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    ref, ref_grads = fwd_bwd(lambda q, k, v: _selected_branch(q, k, v, idx, config, 128**-0.5, backend="flex"), q, k, v, w)
    assert rel_err(out, ref) < 2e-2
    for a, b in zip(g1, ref_grads):
        assert rel_err(a, b) < 2e-2


def test_cuda_graph_capture():
    config = NSAConfig()
    shape = Shape(1, 1, 4, 2048, 64, 64)
    q, k, v = inputs(shape, torch.bfloat16, 9)
    idx = selection(q, k, config)
    grad = torch.randn(1, 4, 2048, 64, device="cuda", dtype=torch.bfloat16)

    def step():
        # Fresh leaves each time: a leaf first used on the default stream would tie its
        # gradient accumulation to that stream, which capture forbids (PyTorch's rule, not ours).
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        out, _ = selected_attention(*leaves, idx, 64, 0.125)
        return (out,) + torch.autograd.grad(out, leaves, grad)

    eager = step()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm up: compile the kernels outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager):
        assert torch.equal(a, b)


@DTYPES
def test_attend_triton_whole_layer(dtype):
    config = NSAConfig(select_block=32, num_selected=8)
    shape = Shape(1, 2, 6, 2500, 64, 64)
    q, k, v = inputs(shape, dtype, 11)
    gates = torch.rand(1, 12, 2500, 3, device="cuda", dtype=dtype)
    out, aux = attend(q, k, v, gates, config=config, backend="triton", return_aux=True)
    ref = attend(q, k, v, gates, config=config, backend="flex", block_indices=aux.block_indices)
    assert rel_err(out, ref) < TOL[dtype]
