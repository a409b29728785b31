"""The triton backend's selected-branch kernels against the reference.

On the CPU they run under Triton's interpreter (conftest sets TRITON_INTERPRET=1 when there is
no GPU), so the shapes stay tiny; tests/test_gpu_triton.py runs the large ones on a GPU.
"""

import pytest
import torch

from nsa_flex import NSAConfig, attend, mean_compress, reference as R, select_blocks
from nsa_flex.triton_backend import available, invert_selection, selected_attention

from strategies import Shape, make_qkv, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not available(torch.device(DEVICE))[0], reason="no CUDA and no Triton interpreter")


def config_for(select_block, n=3):
    return NSAConfig(compress_block=8, compress_stride=4, select_block=select_block, num_selected=n, num_initial=1, num_local=1, window=8)


def run(shape, idx, select_block, dtype, seed=0, scale=0.3):
    q, k, v = make_qkv(shape, seed, dtype=dtype, device=DEVICE, requires_grad=True)
    o, lse = selected_attention(q, k, v, idx.to(DEVICE), select_block, scale)
    w = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(DEVICE)
    grads = torch.autograd.grad((o.double() * w).sum(), (q, k, v))
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = R.selected_attention(*ref_in, idx.to(DEVICE), config_for(select_block, idx.shape[-1]), scale)
    ref_grads = torch.autograd.grad((ref * w).sum(), ref_in)
    return (o, lse, grads), (ref, ref_grads)


CASES = [
    # (shape, select_block, dtype): G = 1, 3, 4; Dk != Dv; T no multiple of the block; l' no
    # power of 2; a block of two key tiles; float16; D=256 in float32 (narrower key tiles)
    (Shape(1, 1, 3, 40, 16, 24), 8, torch.float32),
    (Shape(2, 1, 1, 37, 32, 16), 16, torch.float32),
    (Shape(1, 2, 4, 29, 16, 16), 12, torch.float32),
    (Shape(1, 1, 2, 200, 16, 16), 96, torch.float32),
    (Shape(1, 1, 2, 40, 32, 16), 8, torch.float16),
    (Shape(1, 1, 1, 24, 256, 256), 8, torch.float32),
]
TOLS = {torch.float32: 1e-5, torch.float16: 2e-3}


@pytest.mark.parametrize("shape, select_block, dtype", CASES, ids=[f"G{s.G}-T{s.T}-l{l}-D{s.Dk}-{str(d)[6:]}" for s, l, d in CASES])
def test_forward_and_gradients_match_reference(shape, select_block, dtype):
    config = config_for(select_block)
    q, k, _ = make_qkv(shape, 1)
    idx = select_blocks(q, mean_compress(k, config), config=config)
    (o, lse, grads), (ref, ref_grads) = run(shape, idx, select_block, dtype)
    assert rel_err(o, ref) < TOLS[dtype]
    for name, a, b in zip("qkv", grads, ref_grads):
        assert rel_err(a, b) < TOLS[dtype], name
    assert torch.isfinite(lse).all()


def test_padding_repeats_and_empty_rows():
    # -1 anywhere, a block listed twice (counts once), and rows that select nothing: output 0
    shape = Shape(1, 1, 2, 33, 16, 16)
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(-1, 5, (1, 1, 33, 4), generator=gen, dtype=torch.int32)
    idx[0, 0, :, 1] = idx[0, 0, :, 0]
    idx[0, 0, 5] = -1
    (o, lse, grads), (ref, ref_grads) = run(shape, idx, 8, torch.float32)
    assert rel_err(o, ref) < 1e-5
    assert (o[0, :, 5] == 0).all() and (lse[0, :, 5] == float("-inf")).all()
    for a, b in zip(grads, ref_grads):
        assert torch.isfinite(a).all() and rel_err(a, b) < 1e-5


def test_high_contention_is_deterministic():
    # every query selects the same blocks: many queries per block in the dK/dV gather
    shape = Shape(1, 1, 3, 48, 16, 16)
    idx = torch.tensor([0, 2, 5], dtype=torch.int32).expand(1, 1, 48, 3).contiguous()
    (o, _, grads), (ref, ref_grads) = run(shape, idx, 8, torch.float32, seed=4)
    assert rel_err(o, ref) < 1e-5
    for a, b in zip(grads, ref_grads):
        assert rel_err(a, b) < 1e-5
    (_, _, again), _ = run(shape, idx, 8, torch.float32, seed=4)
    for a, b in zip(grads, again):
        assert torch.equal(a, b), "two backward runs differ"


def test_invert_selection():
    idx = torch.tensor([[[[0, 1], [0, -1], [1, 2], [2, -1]]]], dtype=torch.int32)
    qlist, qstart = invert_selection(idx, 3)
    assert qstart.tolist() == [[[0, 2, 4, 6]]]
    assert qlist[0, 0, :6].tolist() == [0, 1, 0, 2, 2, 3]


def test_attend_triton_backend_matches_reference():
    config = config_for(8)
    shape = Shape(1, 1, 2, 30, 16, 16)
    q, k, v = make_qkv(shape, 5, dtype=torch.float32, device=DEVICE)
    gates = torch.rand(1, 2, 30, 3, device=DEVICE)
    out, aux = attend(q, k, v, gates, config=config, backend="triton", return_aux=True)
    ref = attend(q.double(), k.double(), v.double(), gates.double(), config=config, backend="reference", block_indices=aux.block_indices)
    assert rel_err(out, ref) < 1e-5


def test_triton_backend_refuses_what_it_cannot_run():
    config = config_for(8)
    q, k, v = make_qkv(Shape(1, 1, 1, 20, 16, 16), 0, dtype=torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match="no score_mod or mask_mod"):
        attend(q, k, v, config=config, backend="triton", score_mod=lambda s, b, h, qi, kv: s)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        attend(q.double(), k.double(), v.double(), config=config, backend="triton")


def test_sparse_attention_module_on_triton_backend():
    from nsa_flex import SparseAttention

    torch.manual_seed(0)
    layer = SparseAttention(32, heads=2, kv_heads=1, dim_head=16, config=config_for(8), backend="triton").to(DEVICE)
    ref = __import__("copy").deepcopy(layer).double()
    ref.backend = "reference"
    x = torch.randn(1, 24, 32, device=DEVICE)
    y = layer(x)
    y.square().sum().backward()
    assert rel_err(y, ref(x.double())) < 1e-5
    assert all(p.grad is not None for p in layer.parameters())


@pytest.mark.parametrize(
    "dtype, D, select_block, block_n",
    [(torch.bfloat16, 128, 64, 64), (torch.bfloat16, 256, 64, 64), (torch.float32, 128, 64, 64),
     (torch.float32, 256, 64, 32), (torch.float32, 192, 64, 32), (torch.bfloat16, 64, 8, 16), (torch.bfloat16, 64, 48, 64)],
)
def test_tiles_fit_shared_memory(dtype, D, select_block, block_n):
    from nsa_flex.triton_backend import _meta

    meta = _meta(16, D, D, select_block, dtype)
    assert meta["BLOCK_N"] == block_n
    size = torch.empty((), dtype=dtype).element_size()
    g, n, dk, dv, stages = meta["BLOCK_G"], meta["BLOCK_N"], meta["BLOCK_DK"], meta["BLOCK_DV"], meta["num_stages"]
    # an upper bound on each kernel's shared memory if every loop-carried load were pipelined:
    # forward/dQ stream K and V tiles past resident q (and dO); dK/dV streams q and dO rows
    # past resident K and V tiles
    fwd = (g * dk + g * dv) * size + stages * n * (dk + dv) * size
    dkdv = n * (dk + dv) * size + stages * g * (dk + dv) * size
    assert max(fwd, dkdv) <= 200 * 2**10  # the H200 has 227 KiB per block


def test_selected_attention_validates():
    q, k, v = make_qkv(Shape(1, 2, 2, 40, 16, 16), 0, dtype=torch.float32, device=DEVICE)
    good = torch.zeros(1, 2, 40, 3, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="block_indices must have shape"):
        selected_attention(q, k, v, good[:, :, :20], 8, 0.3)
    with pytest.raises(ValueError, match="block_indices must lie"):
        selected_attention(q, k, v, good + 5, 8, 0.3)
    with pytest.raises(ValueError, match="multiple of k's heads"):
        selected_attention(q[:, :3], k, v, good, 8, 0.3)
    with pytest.raises(ValueError, match="select_block"):
        selected_attention(q, k, v, good, 0, 0.3)
    if DEVICE == "cpu":
        with pytest.raises(TypeError, match="not bfloat16"):
            selected_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), good, 8, 0.3)


@pytest.mark.parametrize("shape, select_block", [(Shape(1, 2, 3, 70, 16, 24), 16), (Shape(2, 1, 16, 50, 32, 16), 16)])
def test_flex_forward_with_triton_backward(shape, select_block):
    # The flex backend's selected branch for half-precision CUDA training: FlexAttention's
    # forward (one-token tiles), the Triton backward from its output and log-sum-exp. Run
    # here in float32 on the CPU (FlexAttention eager, Triton interpreted).
    from nsa_flex.flex_backend import _flex_forward_triton_backward

    config = config_for(select_block)
    q, k, _ = make_qkv(shape, 2)
    idx = select_blocks(q, mean_compress(k, config), config=config)
    idx[0, 0, -1, -1] = idx[0, 0, -1, 0]  # a repeat: counts once on both sides
    q, k, v = make_qkv(shape, 3, dtype=torch.float32, device=DEVICE, requires_grad=True)
    out = _flex_forward_triton_backward(q, k, v, idx.to(DEVICE), config, 0.3)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(DEVICE)
    grads = torch.autograd.grad((out.double() * w).sum(), (q, k, v))
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = R.selected_attention(*ref_in, idx.to(DEVICE), config, 0.3)
    ref_grads = torch.autograd.grad((ref * w).sum(), ref_in)
    assert rel_err(out, ref) < 1e-5
    for name, a, b in zip("qkv", grads, ref_grads):
        assert rel_err(a, b) < 1e-5, name
