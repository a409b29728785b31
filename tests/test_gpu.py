"""On a CUDA device: the flex backend (compiled FlexAttention kernels) against the float64
reference, forward and backward, and torch.compile(fullgraph=True) without graph breaks.

Tolerances (docs/semantics.md): relative error below 1e-5 in float32 (TF32 off), below 2e-2 in bf16.
"""

import pytest
import torch

from nsa_flex import NSAConfig, attend, mean_compress, reference as R, select_blocks

from conftest import dynamo_limits
from strategies import Shape, rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("gpu_numerics")]

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def inputs(shape, config, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g, device="cuda", dtype=torch.float32).to(dtype).requires_grad_()

    q = rnd(shape.B, shape.Hq, shape.T, shape.Dk)
    k = rnd(shape.B, shape.Hkv, shape.T, shape.Dk)
    v = rnd(shape.B, shape.Hkv, shape.T, shape.Dv)
    gates = torch.rand(shape.B, shape.Hq, shape.T, 3, generator=g, device="cuda").to(dtype).requires_grad_()
    return q, k, v, gates


CASES = [
    # (shape, config): G in {1, 4, 16}, lengths that are and are not block multiples
    (Shape(1, 1, 16, 8192, 128, 128), NSAConfig()),
    (Shape(2, 2, 4, 4099, 64, 64), NSAConfig()),
    (Shape(1, 2, 1, 3000, 192, 128), NSAConfig(select_block=32, num_selected=8, window=256)),
    (Shape(2, 1, 3, 1000, 64, 32), NSAConfig(compress_block=16, compress_stride=8, select_block=48, num_selected=5, window=100)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape, config", CASES, ids=[f"T{s.T}-G{s.G}-D{s.Dk}x{s.Dv}" for s, _ in CASES])
def test_flex_forward_backward_against_reference(shape, config, dtype):
    q, k, v, gates = inputs(shape, config, dtype, seed=shape.T)
    k_cmp = mean_compress(k, config)
    idx = select_blocks(q.detach(), k_cmp.detach(), config=config)
    out, aux = attend(q, k, v, gates, config=config, block_indices=idx, return_aux=True)
    w = torch.randn_like(out, dtype=torch.float32)
    grads = torch.autograd.grad((out.float() * w).sum(), (q, k, v, gates))

    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v, gates)]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ref = R.attend(*ref_in, config=config, block_indices=idx)
    ref_grads = torch.autograd.grad((ref.out * w.double()).sum(), ref_in)
    # the float64 reference goes through query chunks, recomputed in the backward: a few GiB
    # at most (unchunked, T=8192 with G=16 held 47 GiB, issue 13)
    assert torch.cuda.max_memory_allocated() - before < 6 * 2**30

    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, ref.out) < TOL[dtype]
    for name, a, b in zip(("o_cmp", "o_slc", "o_swa"), aux[1:], ref[2:5]):
        assert rel_err(a, b) < TOL[dtype], name
    for name, a, b in zip("q k v gates".split(), grads, ref_grads):
        assert rel_err(a, b) < TOL[dtype], f"grad {name}"


def test_selection_on_gpu_matches_reference():
    config = NSAConfig()
    shape = Shape(1, 2, 4, 4096, 64, 64)
    q, k, _, _ = inputs(shape, config, torch.float32, seed=1)
    q, k = q.detach().double(), k.detach().double()
    k_cmp = mean_compress(k, config)
    idx = select_blocks(q, k_cmp, config=config)
    ref_idx, scores = R.select_blocks(q, k_cmp, config, q.shape[-1] ** -0.5)

    def chosen(i):
        vals = torch.where(i >= 0, scores.gather(-1, i.clamp_min(0).long()), -1.0)
        return vals.sort(-1).values

    torch.testing.assert_close(chosen(idx), chosen(ref_idx), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_selection_kernel_matches_reference(dtype):
    # CUDA's default select_blocks path: the Triton scoring kernel, against float64 scores
    # of the same (rounded) inputs; equally good picks, up to float32 summation order
    config = NSAConfig()
    shape = Shape(1, 2, 16, 4096, 128, 128)
    q, k, _, _ = inputs(shape, config, dtype, seed=2)
    q, k = q.detach(), k.detach()
    k_cmp = mean_compress(k, config)
    idx = select_blocks(q, k_cmp, config=config)
    ref_idx, scores = R.select_blocks(q.double(), k_cmp.double(), config, 128**-0.5)
    assert torch.equal((idx >= 0).sum(-1), (ref_idx >= 0).sum(-1))

    def chosen(i):
        vals = torch.where(i >= 0, scores.gather(-1, i.clamp_min(0).long()), -1.0)
        return vals.sort(-1).values

    torch.testing.assert_close(chosen(idx), chosen(ref_idx), rtol=1e-4, atol=1e-7)


def test_selection_memory_at_64k():
    # the reference shape (docs/semantics.md) at T=65536: extra memory of select_blocks under ~2 GiB
    config = NSAConfig()
    T = 65536
    q = torch.randn(1, 64, T, 128, device="cuda", dtype=torch.bfloat16)
    k_cmp = torch.randn(1, 4, config.num_compressed(T), 128, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    idx = select_blocks(q, k_cmp, config=config)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert idx.shape == (1, 4, T, 16)
    assert extra < 2 * 2**30, f"select_blocks took {extra / 2**30:.2f} GiB extra"


class TinyModel(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.qkv = torch.nn.Linear(256, 3 * 256)
        self.gate = torch.nn.Linear(256, 4 * 3)

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, 4, 64).permute(2, 0, 3, 1, 4)
        k, v = k[:, :2], v[:, :2]  # GQA: 4 query heads, 2 KV heads
        g = torch.sigmoid(self.gate(x)).view(B, T, 4, 3).transpose(1, 2)
        o = attend(q, k, v, g, config=self.config)
        return o.transpose(1, 2).reshape(B, T, 256)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compile_fullgraph_no_graph_breaks(dtype):
    torch._dynamo.reset()
    config = NSAConfig(select_block=32, num_selected=6)
    model = TinyModel(config).cuda().to(dtype)
    x = torch.randn(2, 1500, 256, device="cuda", dtype=dtype)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    eager = model(x)
    assert rel_err(out, eager) < TOL[dtype]


def test_a_users_compiled_flex_attention_does_not_use_up_ours():
    """Dynamo's recompile limit counts per function: a user's torch.compile(flex_attention) that
    reaches it (each length is a graph) must leave the flex backend compiling its own."""
    from torch.nn.attention.flex_attention import flex_attention

    from nsa_flex.flex import call as flex_call

    theirs = torch.compile(flex_attention, backend="eager", dynamic=False)
    with dynamo_limits(8, 4096):
        for T in range(16, 16 * 11, 16):  # more lengths than the limit of 8
            x = torch.randn(1, 1, T, 16, device="cuda")
            theirs(x, x, x)
    counters = torch._dynamo.utils.counters
    before = counters["stats"]["unique_graphs"]
    config = NSAConfig(compress_block=16, compress_stride=16, select_block=16, num_selected=4, window=16)
    q, k, v = (torch.randn(1, h, 200, 16, device="cuda") for h in (2, 1, 1))
    with torch.no_grad():
        out = attend(q, k, v, config=config)
    assert counters["stats"]["unique_graphs"] > before  # ours compiled
    ref = R.attend(q.double(), k.double(), v.double(), config=config).out
    assert rel_err(out, ref) < TOL[torch.float32]
    assert flex_call._compiled_flex()._torchdynamo_orig_callable is flex_call._flex_call
