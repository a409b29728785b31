"""torch.compile(fullgraph=True) with Inductor over the Triton paths on a GPU.

attend() on the triton and flex backends, forward and backward, against eager; and proof that
the compiled graphs take the fast paths through the custom ops of nsa_flex.ops (the fused
selection, the Triton selected forward, the Triton backward) rather than a traced fallback:
the ops appear in Dynamo's graph, and the launch functions behind them run.
"""

import collections
import copy

import pytest
import torch

from nsa_flex import NSAConfig, SparseAttention, attend
from nsa_flex.ops import scoring as ops_scoring, selected as ops_selected

import strategies
from strategies import Shape, ops_in, rel_err

pytestmark = pytest.mark.gpu

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
DTYPES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
SHAPE = Shape(1, 2, 4, 4096, 64, 64)


@pytest.fixture(autouse=True)
def fresh_dynamo(gpu_numerics):
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def launches(monkeypatch):
    """How often each launch function behind the ops ran, by name (the op bodies look them up
    in their own modules, nsa_flex.ops.scoring and nsa_flex.ops.selected, when they run, so the
    patched ones are counted)."""
    calls = collections.Counter()

    def count(module, name):
        fn = getattr(module, name)

        def counted(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    count(ops_scoring, "launch_scoring")
    count(ops_selected, "launch_selected_forward")
    count(ops_selected, "launch_selected_backward")
    return calls


def compile_counted(fn):
    return strategies.compile_counted(fn, "inductor")


def layer_inputs(shape, config, dtype, seed):
    """``q, k, v, gates, k_cmp, v_cmp``, all requiring grad. ``k_cmp``/``v_cmp`` are given so
    that eager and compiled calls select from bitwise-equal inputs (the same kernel then picks
    the same blocks)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    tc = config.num_compressed(shape.T)

    def rnd(*s):
        return torch.randn(*s, generator=g, device="cuda").to(dtype).requires_grad_()

    B, Hq, Hkv, T = shape.B, shape.Hq, shape.Hkv, shape.T
    gates = torch.rand(B, Hq, T, 3, generator=g, device="cuda").to(dtype).requires_grad_()
    return (
        rnd(B, Hq, T, shape.Dk), rnd(B, Hkv, T, shape.Dk), rnd(B, Hkv, T, shape.Dv), gates,
        rnd(B, Hkv, tc, shape.Dk), rnd(B, Hkv, tc, shape.Dv),
    )


@DTYPES
@pytest.mark.parametrize("backend", ["triton", "flex"])
def test_compiled_training_takes_the_triton_paths(backend, dtype, launches):
    config = NSAConfig()
    inputs = layer_inputs(SHAPE, config, dtype, seed=11)

    def layer(q, k, v, gates, k_cmp, v_cmp):
        return attend(q, k, v, gates, config=config, k_cmp=k_cmp, v_cmp=v_cmp, backend=backend, return_aux=True)

    compiled, counter = compile_counted(layer)
    w = torch.randn(SHAPE.B, SHAPE.Hq, SHAPE.T, SHAPE.Dv, device="cuda")
    out, aux = compiled(*inputs)
    grads = torch.autograd.grad((out.float() * w).sum(), inputs)
    ran = set(launches)
    ref, ref_aux = layer(*inputs)
    ref_grads = torch.autograd.grad((ref.float() * w).sum(), inputs)

    assert counter.frame_count == 1
    # on both backends the selected branch of a compiled CUDA graph is the Triton op, forward
    # and backward (nsa_flex.dispatch.selected_path says why)
    assert ops_in(counter) == {"select_blocks_fused", "selected_attention"}
    assert ran == {"launch_scoring", "launch_selected_forward", "launch_selected_backward"}
    assert torch.equal(aux.block_indices, ref_aux.block_indices)
    assert rel_err(out, ref) < TOL[dtype]
    for name, a, b in zip(("q", "k", "v", "gates", "k_cmp", "v_cmp"), grads, ref_grads):
        assert rel_err(a, b) < TOL[dtype], name


def test_compiled_inference_takes_the_fused_selection(launches):
    # no backward: the selected branch is the Triton forward op alone
    config = NSAConfig()
    inputs = [x.detach() for x in layer_inputs(SHAPE, config, torch.bfloat16, seed=12)]

    def layer(q, k, v, gates, k_cmp, v_cmp):
        return attend(q, k, v, gates, config=config, k_cmp=k_cmp, v_cmp=v_cmp)

    compiled, counter = compile_counted(layer)
    with torch.no_grad():
        out = compiled(*inputs)
        ran = set(launches)
        ref = layer(*inputs)
    assert ops_in(counter) == {"select_blocks_fused", "selected_attention"}
    assert ran == {"launch_scoring", "launch_selected_forward"}
    assert rel_err(out, ref) < TOL[torch.bfloat16]


def test_compiled_sparse_attention_on_the_triton_backend(launches):
    # The whole module, learned compression included, trained compiled. Inductor may round the
    # compressed keys differently from eager in the last bits, which can flip a near-tie in the
    # selection of a few queries: outputs are compared where both chose alike.
    torch.manual_seed(0)
    layer = SparseAttention(256, heads=8, kv_heads=2, dim_head=64, backend="triton").cuda()
    ref_layer = copy.deepcopy(layer)
    x = torch.randn(1, 2048, 256, device="cuda")
    compiled, counter = compile_counted(layer)
    out, aux = compiled(x, return_aux=True)
    out.square().mean().backward()
    ran = set(launches)
    ref, ref_aux = ref_layer(x, return_aux=True)
    ref.square().mean().backward()

    assert counter.frame_count == 1
    assert ops_in(counter) == {"select_blocks_fused", "selected_attention"}
    assert ran == {"launch_scoring", "launch_selected_forward", "launch_selected_backward"}
    same = (aux.block_indices == ref_aux.block_indices).all(-1).all(1)  # (B, T)
    assert same.float().mean() > 0.99
    assert rel_err(out[same], ref[same]) < 1e-4
    for (name, p), p_ref in zip(layer.named_parameters(), ref_layer.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert rel_err(p.grad, p_ref.grad) < 1e-2, name
