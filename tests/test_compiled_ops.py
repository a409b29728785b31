"""The custom operators of nsa_flex.ops: torch.library.opcheck, and the Triton paths inside
torch.compile(fullgraph=True) against eager, float32, forward and gradients.

On the CPU the kernels run under Triton's interpreter (tiny shapes), and the graphs compile
with backend="aot_eager": Inductor's CPU FlexAttention refuses backward, and the point here
is the trace (no graph break, the ops in the graph, AOTAutograd's backward through
register_autograd), not Inductor's code. Training the whole layer compiled on the CPU also
needs FlexAttention's refusal of CPU gradients relaxed (the cpu_flex_backward fixture). The fast
paths are picked unasked only on CUDA (nsa_flex.dispatch._picks_kernels); tests that need them on
the CPU patch that one seam. tests/test_gpu_compile.py runs the real thing with Inductor on a GPU.
"""

import copy

import pytest
import torch

from nsa_flex import NSAConfig, SparseAttention, attend, dispatch, mean_compress, ops, select_blocks, triton_backend
from nsa_flex.api import _selected_branch
from nsa_flex.block_indices import kernel_indices
from nsa_flex.varlen import documents

import strategies
from strategies import Shape, make_qkv, ops_in, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.compiled,
    pytest.mark.skipif(not triton_backend.available(torch.device(DEVICE))[0], reason="no CUDA and no Triton interpreter"),
]

CONFIG = NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=3, num_initial=1, num_local=1, window=8)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compile_counted(fn):
    """On the CPU the graphs run through AOTAutograd only (see the module docstring)."""
    return strategies.compile_counted(fn, "aot_eager")


def inputs(shape, seed=0, requires_grad=True):
    return make_qkv(shape, seed, dtype=torch.float32, device=DEVICE, requires_grad=requires_grad)


def selection_for(q, k, config=CONFIG):
    return select_blocks(q.detach(), mean_compress(k.detach(), config), config=config)


def fwd_bwd(fn, q, k, v, *rest):
    """``fn(q, k, v, *rest)`` and the gradients of a weighted sum of its (first) output in
    ``q, k, v`` and the rest that requires grad."""
    result = fn(q, k, v, *rest)
    out = result[0] if isinstance(result, tuple) else result
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    wrt = [q, k, v] + [x for x in rest if isinstance(x, torch.Tensor) and x.requires_grad]
    return result, torch.autograd.grad((out * w).sum(), wrt)


def assert_same(a, b):
    # the float32 tolerance (docs/semantics.md): on the CPU both sides run the same kernels and
    # agree to the last bits; on a GPU eager FlexAttention is Inductor's kernel, aot_eager's the
    # unfused one
    assert a.shape == b.shape and rel_err(a, b) < 1e-5


def assert_compiles_like_eager(fn, q, k, v, idx, op):
    """``fn(q, k, v, idx)`` compiled in one graph that calls the custom op ``op``, with the
    output and the gradients of eager ``fn``."""
    compiled, counter = compile_counted(fn)
    out, grads = fwd_bwd(compiled, q, k, v, idx)
    ref, ref_grads = fwd_bwd(fn, q, k, v, idx)
    assert counter.frame_count == 1 and ops_in(counter) == {op}
    assert_same(out, ref)
    for a, b in zip(grads, ref_grads):
        assert_same(a, b)


# --------------------------------------------------------------------------------- opcheck


def _opcheck_cases():
    shape = Shape(1, 1, 2, 24, 16, 16)
    q, k, v = inputs(shape, 1)
    Hq, T, D = shape.Hq, shape.T, shape.Dv
    k_cmp = mean_compress(k.detach(), CONFIG)
    idx = kernel_indices(selection_for(q, k), CONFIG.select_block, T)
    gen = torch.Generator().manual_seed(2)
    o, lse, do = (torch.randn(*s, generator=gen).to(DEVICE) for s in ((1, Hq, T, D), (1, Hq, T), (1, Hq, T, D)))
    frozen = [x.detach() for x in (q, k, v)]
    # a packed row: documents of 10 and 14 tokens, doc-local indices
    docs = documents(torch.tensor([0, 10, 24]), device=DEVICE)
    first_block, block_start, block_end = docs.selection_blocks(CONFIG.select_block)
    packed = (docs.start.contiguous(), first_block.view(1, 1, T, 1), block_start, block_end)
    pos = docs.pos.view(1, 1, T, 1)
    local = kernel_indices(torch.where(idx * 8 <= pos, idx, -1), 8, T)  # as triton_backend._run makes them
    return {
        "selected_attention": (ops.selected_attention_op, (q, k, v, idx, 8, 0.3)),
        "selected_attention_packed": (ops.selected_attention_op, (q, k, v, local, 8, 0.3, *packed)),
        "selected_attention_backward": (ops.selected_attention_backward_op, (*frozen, idx, o, lse, do, 8, 0.3)),
        "attach_selected_backward": (
            ops.attach_selected_backward_op, (q, k, v, idx, o.view(1, 1, T * Hq, D), lse, 8, 0.3)
        ),
        "select_blocks_fused": (ops.select_blocks_fused_op, (frozen[0], k_cmp, 8, 4, 8, 3, 1, 1, 0.3, None)),
        "select_blocks_fused_lse": (
            ops.select_blocks_fused_op, (frozen[0], k_cmp, 8, 4, 8, 3, 1, 1, 0.3, None, torch.randn_like(lse))
        ),
        "select_blocks_fused_packed": (
            ops.select_blocks_fused_op,
            (frozen[0], mean_compress(k.detach(), CONFIG, docs), 8, 4, 8, 3, 1, 1, 0.3, None, torch.randn_like(lse), 0,
             *docs.scoring_tables(CONFIG), docs.num_select_blocks(CONFIG)),
        ),
    }


@pytest.mark.parametrize(
    "case",
    ["selected_attention", "selected_attention_packed", "selected_attention_backward", "attach_selected_backward",
     "select_blocks_fused", "select_blocks_fused_lse", "select_blocks_fused_packed"],
)
def test_opcheck(case):
    # schema, fake implementation against the real one, autograd registration, and an
    # AOTAutograd trace with dynamic shapes
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


# ------------------------------------------------------------- each fast path in a graph


def test_triton_selected_attention_compiles():
    shape = Shape(2, 1, 3, 40, 16, 24)
    q, k, v = inputs(shape)
    idx = selection_for(q, k)

    def selected(q, k, v, idx):
        return triton_backend.selected_attention(q, k, v, idx, 8, 0.3)[0]

    assert_compiles_like_eager(selected, q, k, v, idx, "selected_attention")


def _kernels_anywhere(monkeypatch):
    """The paths CUDA takes, on the CPU too (the kernels under Triton's interpreter)."""
    monkeypatch.setattr(dispatch, "_picks_kernels", lambda device: True)


def test_flex_selected_branch_with_triton_backward_compiles(monkeypatch):
    # The flex backend's selected branch for eager CUDA training, traced: FlexAttention's
    # forward in the graph, the Triton backward through attach_selected_backward. (A compiled
    # CUDA graph plans the Triton op instead; on the CPU the compiled plan is this one.)
    _kernels_anywhere(monkeypatch)
    shape = Shape(1, 2, 3, 40, 16, 24)
    q, k, v = inputs(shape, 3)
    idx = selection_for(q, k)

    def selected(q, k, v, idx):
        return _selected_branch(q, k, v, idx, CONFIG, 0.3, backend="flex")

    assert_compiles_like_eager(selected, q, k, v, idx, "attach_selected_backward")


def test_select_blocks_fused_compiles(monkeypatch):
    _kernels_anywhere(monkeypatch)
    q, k, _ = inputs(Shape(2, 2, 3, 50, 16, 16), 4, requires_grad=False)
    k_cmp = mean_compress(k, CONFIG)

    def select(q, k_cmp):
        return select_blocks(q, k_cmp, config=CONFIG)

    compiled, counter = compile_counted(select)
    idx = compiled(q, k_cmp)
    assert counter.frame_count == 1 and ops_in(counter) == {"select_blocks_fused"}
    assert torch.equal(idx, select(q, k_cmp))

    # with a score_mod the PyTorch path runs, in the graph as eagerly
    def select_mod(q, k_cmp):
        return select_blocks(q, k_cmp, config=CONFIG, score_mod=lambda s, b, h, qi, kv: s * 0.5)

    compiled, counter = compile_counted(select_mod)
    assert torch.equal(compiled(q, k_cmp), select_mod(q, k_cmp))
    assert ops_in(counter) == set()


# ------------------------------------------------------------------ the whole layer, traced


@pytest.fixture
def cpu_flex_backward(monkeypatch):
    """Let traced FlexAttention take CPU inputs that require grad. The public flex_attention
    refuses them (its ``_validate_device``) although its operator differentiates them eagerly,
    as nsa_flex.flex.call._cpu_flex_with_grad relies on; under aot_eager that operator is what runs.
    Without it, compiled training on the CPU stops at the compressed and window branches."""
    import torch.nn.attention.flex_attention as fa

    if DEVICE == "cpu":
        if not hasattr(fa, "_validate_device"):
            pytest.skip("this torch has no flex_attention._validate_device to relax")
        monkeypatch.setattr(fa, "_validate_device", lambda *args: None)


@pytest.mark.parametrize("backend, selected_op", [("triton", "selected_attention"), ("flex", "attach_selected_backward")])
def test_attend_trains_compiled(backend, selected_op, monkeypatch, cpu_flex_backward):
    _kernels_anywhere(monkeypatch)
    shape = Shape(1, 1, 2, 30, 16, 16)
    q, k, v = inputs(shape, 5)
    gates = torch.rand(1, 2, 30, 3, generator=torch.Generator().manual_seed(6)).to(DEVICE).requires_grad_()

    def layer(q, k, v, gates):
        return attend(q, k, v, gates, config=CONFIG, backend=backend, return_aux=True)

    compiled, counter = compile_counted(layer)
    (out, aux), grads = fwd_bwd(compiled, q, k, v, gates)
    (ref, ref_aux), ref_grads = fwd_bwd(layer, q, k, v, gates)
    assert counter.frame_count == 1
    assert ops_in(counter) == {"select_blocks_fused", selected_op}
    assert torch.equal(aux.block_indices, ref_aux.block_indices)
    assert_same(out, ref)
    for a, b in zip(grads, ref_grads):
        assert_same(a, b)


def test_sparse_attention_triton_backend_trains_compiled(cpu_flex_backward):
    torch.manual_seed(0)
    layer = SparseAttention(32, heads=2, kv_heads=1, dim_head=16, config=CONFIG, backend="triton").to(DEVICE)
    ref_layer = copy.deepcopy(layer)
    x = torch.randn(1, 24, 32, device=DEVICE)
    compiled, counter = compile_counted(layer)
    out = compiled(x)
    out.square().sum().backward()
    ref = ref_layer(x)
    ref.square().sum().backward()
    assert counter.frame_count == 1 and "selected_attention" in ops_in(counter)
    assert_same(out, ref)
    for (name, p), p_ref in zip(layer.named_parameters(), ref_layer.parameters()):
        assert p.grad is not None, name
        assert_same(p.grad, p_ref.grad)
