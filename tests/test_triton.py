"""The triton backend's selected-branch kernels against the reference.

On the CPU they run under Triton's interpreter (conftest sets TRITON_INTERPRET=1 when there is
no GPU), so the shapes stay tiny; tests/test_gpu_triton.py runs the large ones on a GPU.
"""

import pytest
import torch

from nsa_flex import NSAConfig, attend, mean_compress, reference as R, select_blocks, triton_backend, tuning
from nsa_flex.ops import selected as ops_selected
from nsa_flex.triton_backend import available, invert_selection, selected_attention
from nsa_flex.varlen import documents

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


@pytest.fixture
def short_segments(monkeypatch):
    """Segments of 4 queries, so that tiny shapes take the dK/dV split: later segments summed
    into scratch slots by one kernel, added up in order by the other."""
    monkeypatch.setattr(tuning, "SEGMENT", 4)
    monkeypatch.setattr(tuning, "MAX_SLOTS", 1 << 30)


def crowded_selection(B, Hkv, T, select_block, seed):
    """Block 0 for every query (a list T long), the query's own block and one earlier block at
    random (-1 where there is none)."""
    own = (torch.arange(T) // select_block).view(1, 1, T, 1).expand(B, Hkv, T, 1)
    earlier = (torch.rand(B, Hkv, T, 1, generator=torch.Generator().manual_seed(seed)) * own).long()
    idx = torch.cat([torch.zeros_like(own), own, torch.where(own > 1, earlier, -1)], -1)
    return idx.to(torch.int32)


def assert_split(idx, select_block, T):
    # the selection does take the split path at the patched segment size
    qlist, qstart = invert_selection(triton_backend.kernel_indices(idx, select_block, T), -(-T // select_block))
    slots, slot_block = ops_selected._segments(qstart, qlist.shape[-1], tuning.dkdv_segment(qlist.shape[-1]))
    assert slots[..., -1].min() > 0 and (slot_block == slots.shape[-1] - 1).any(), "no split, or no surplus slot"


SPLIT_CASES = [
    # (shape, select_block): G = 1 (64 queries a step), 3 (21 queries, 63 of 64 rows), 16 (4
    # queries: several steps per segment at segment 8); Dk != Dv; two key tiles per block
    (Shape(1, 1, 1, 40, 16, 24), 8),
    (Shape(2, 2, 3, 37, 16, 16), 8),
    (Shape(1, 1, 16, 24, 16, 16), 8),
    (Shape(1, 1, 2, 70, 16, 16), 24),
]


@pytest.mark.parametrize("shape, select_block", SPLIT_CASES, ids=[f"G{s.G}-T{s.T}-l{l}" for s, l in SPLIT_CASES])
def test_split_lists_match_reference(short_segments, monkeypatch, shape, select_block):
    if shape.G == 16:
        monkeypatch.setattr(tuning, "SEGMENT", 8)
    idx = crowded_selection(shape.B, shape.Hkv, shape.T, select_block, shape.T)
    assert_split(idx, select_block, shape.T)
    (o, _, grads), (ref, ref_grads) = run(shape, idx, select_block, torch.float32, seed=2)
    assert rel_err(o, ref) < 1e-5
    for name, a, b in zip("qkv", grads, ref_grads):
        assert rel_err(a, b) < 1e-5, name


def test_split_backward_is_deterministic(short_segments):
    shape, select_block = Shape(1, 1, 3, 48, 16, 16), 8
    idx = crowded_selection(1, 1, 48, select_block, 1)
    (_, _, grads), _ = run(shape, idx, select_block, torch.float32, seed=4)
    (_, _, again), _ = run(shape, idx, select_block, torch.float32, seed=4)
    for a, b in zip(grads, again):
        assert torch.equal(a, b), "two backward runs differ"


@pytest.mark.parametrize("G", [1, 3])
def test_split_lists_packed_match_reference(short_segments, G):
    # a packed row: every document's block 0 chosen by all its queries, so the lists of the
    # documents' first blocks split; doc-local indices, blocks numbered across documents
    from test_varlen import cu_of, packed_selected_and_reference

    lengths, ls = [13, 0, 1, 25, 9], 4
    T = sum(lengths)
    cu = cu_of(lengths)
    docs = documents(cu)
    pos = docs.pos.long().view(1, 1, T, 1)
    g = torch.Generator().manual_seed(G)
    idx = torch.cat([torch.zeros_like(pos), pos // ls, (torch.rand(1, 1, T, 1, generator=g) * (pos // ls)).long()], -1)
    idx = idx.to(torch.int32)
    o, grads, ref, ref_grads = packed_selected_and_reference(G, idx, ls, cu, g)
    assert rel_err(o, ref) < 1e-5
    for name, a, b in zip("qkv", grads, ref_grads):
        assert rel_err(a, b) < 1e-5, name


def test_segments():
    # lists of 0, 1, 4, 5, 9 and 12 queries at segment 4: later segments 0, 0, 0, 1, 2, 2
    counts = torch.tensor([0, 1, 4, 5, 9, 12])
    qstart = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32).view(1, 1, 7)
    slots, slot_block = ops_selected._segments(qstart, 31, 4)
    assert slots.tolist() == [[[0, 0, 0, 0, 1, 3, 5]]]
    assert slot_block.tolist() == [[[3, 4, 4, 5, 5, 6, 6]]]  # 31 // 4 = 7 slots, 2 surplus


def test_dkdv_settings_override():
    # the tuning entry (scripts/profile_selected.py): other tiles and segments, same gradients
    shape, select_block = Shape(1, 1, 3, 40, 16, 16), 8
    idx = triton_backend.kernel_indices(crowded_selection(1, 1, 40, select_block, 0), select_block, 40).to(DEVICE)
    q, k, v = make_qkv(shape, 0, dtype=torch.float32, device=DEVICE)
    o, lse = selected_attention(q, k, v, idx, select_block, 0.3)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    delta = (do * o).sum(-1).contiguous()
    qlist, qstart = invert_selection(idx, 5)
    base = ops_selected.launch_dkdv(q, k, v, do, lse, delta, qlist, qstart, select_block, 0.3)
    meta = dict(tuning.selected_kernel_meta(3, 16, 16, select_block, torch.float32, "dkdv"), BLOCK_R=16, num_warps=2)
    for other in (ops_selected.launch_dkdv(q, k, v, do, lse, delta, qlist, qstart, select_block, 0.3, meta=meta, segment=2),
                  ops_selected.launch_dkdv(q, k, v, do, lse, delta, qlist, qstart, select_block, 0.3, segment=8)):
        for a, b in zip(other, base):
            assert rel_err(a, b) < 1e-6
    with pytest.raises(ValueError, match="power of two"):
        ops_selected.launch_dkdv(q, k, v, do, lse, delta, qlist, qstart, select_block, 0.3, segment=6)


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


def test_selected_attention_at_an_offset_equals_the_rows_of_the_whole():
    """Queries ``s ..`` over the whole K/V (``q_offset=s``, and the default for a shorter q):
    the rows ``s ..`` of one call over the whole sequence, forward and gradients."""
    shape, select_block = Shape(1, 2, 3, 45, 16, 16), 8
    config = config_for(select_block)
    q, k, v = make_qkv(shape, 7, dtype=torch.float32, device=DEVICE, requires_grad=True)
    idx = select_blocks(q.detach(), mean_compress(k.detach(), config), config=config)
    w = torch.randn(1, 6, 45, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    s = 21  # within a selection block
    whole, lse = selected_attention(q, k, v, idx, select_block, 0.3)
    want = torch.autograd.grad((whole[:, :, s:] * w[:, :, s:]).sum(), (q, k, v))
    for q_offset in (s, None):
        part, part_lse = selected_attention(q[:, :, s:], k, v, idx[:, :, s:], select_block, 0.3, q_offset=q_offset)
        assert rel_err(part, whole[:, :, s:]) < 1e-6 and torch.equal(part_lse.isfinite(), lse[:, :, s:].isfinite())
        got = torch.autograd.grad((part * w[:, :, s:]).sum(), (q, k, v))
        for name, a, b in zip("qkv", got, want):
            assert rel_err(a, b) < 1e-6, name
    # a query at an offset sees only keys up to its position: later keys change nothing
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, 30:], v2[:, :, 30:] = 100.0, -100.0
    early, _ = selected_attention(q[:, :, s:30].detach(), k2, v2, idx[:, :, s:30], select_block, 0.3, q_offset=s)
    assert rel_err(early, whole[:, :, s:30].detach()) < 1e-6


def test_selected_attention_refuses_bad_offsets():
    q, k, v = make_qkv(Shape(1, 2, 2, 40, 16, 16), 0, dtype=torch.float32, device=DEVICE)
    idx = torch.zeros(1, 2, 10, 3, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="q_offset"):
        selected_attention(q[:, :, :10], k, v, idx, 8, 0.3, q_offset=35)  # queries past the keys
    with pytest.raises(ValueError, match="q_offset"):
        selected_attention(q[:, :, :10], k, v, idx, 8, 0.3, q_offset=-1)
    with pytest.raises(TypeError, match="q_offset"):
        selected_attention(q[:, :, :10], k, v, idx, 8, 0.3, q_offset=2.0)
    with pytest.raises(ValueError, match="cu_seqlens"):
        selected_attention(q[:, :, :10], k, v, idx, 8, 0.3, cu_seqlens=torch.tensor([0, 40], device=DEVICE))
    with pytest.raises(ValueError, match="sequence lengths differ"):
        selected_attention(q, k[:, :, :20], v, torch.zeros(1, 2, 40, 3, dtype=torch.int32, device=DEVICE), 8, 0.3)


@pytest.mark.parametrize("shape, select_block", [(Shape(1, 2, 3, 70, 16, 24), 16), (Shape(2, 1, 16, 50, 32, 16), 16)])
def test_flex_forward_with_triton_backward(shape, select_block):
    # The flex backend's selected branch for half-precision CUDA training: FlexAttention's
    # forward (one-token tiles), the Triton backward from its output and log-sum-exp. Run
    # here in float32 on the CPU (FlexAttention eager, Triton interpreted).
    from nsa_flex.flex.branches import selected_branch_triton_backward as _flex_forward_triton_backward

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
