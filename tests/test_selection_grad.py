"""Gradients through the selection (attend(..., selection_grad=True)): a straight-through
weight on the selected branch's scores, exactly 1 forward, with the importance's gradient."""

import pytest
import torch

from nsa_flex import NSAConfig, SparseAttention, attend, block_scores, reference as R, select_blocks

from strategies import Shape, make_qkv, rel_err

CONFIG = NSAConfig(compress_block=8, compress_stride=4, select_block=16, num_selected=3, num_initial=1, num_local=1, window=16)
SHAPE = Shape(1, 2, 2, 70, 8, 8)


def inputs(seed=0):
    q, k, v = make_qkv(SHAPE, seed, requires_grad=True)
    g = torch.Generator().manual_seed(seed + 1)
    tc = CONFIG.num_compressed(SHAPE.T)
    k_cmp = torch.randn(SHAPE.B, SHAPE.Hkv, tc, SHAPE.Dk, generator=g, dtype=torch.float64, requires_grad=True)
    v_cmp = torch.randn(SHAPE.B, SHAPE.Hkv, tc, SHAPE.Dv, generator=g, dtype=torch.float64, requires_grad=True)
    return q, k, v, k_cmp, v_cmp


def surrogate(q, k, v, k_cmp, idx, imp0):
    """The selected branch with scores times ``imp(q, k_cmp) - imp0 + 1``: at the point where
    ``imp0`` was taken it equals the plain branch, and its ordinary derivative is what the
    straight-through weight promises. Written apart from the library's code."""
    _, p_cmp = R.compressed_attention(q, k_cmp, k_cmp.new_zeros(*k_cmp.shape[:-1], 1), CONFIG, 0.3)
    w = R.selection_scores(p_cmp, CONFIG, SHAPE.Hkv) - imp0 + 1
    G, ls = SHAPE.G, CONFIG.select_block
    return R.selected_attention(q, k, v, idx, CONFIG, 0.3, score_mod=lambda s, b, h, t, kv: s * w[b, h // G, t, kv // ls])


def test_forward_is_unchanged():
    q, k, v, k_cmp, v_cmp = inputs()
    for backend in ("reference", "flex"):
        plain = attend(q, k, v, config=CONFIG, k_cmp=k_cmp, v_cmp=v_cmp, scale=0.3, backend=backend)
        st = attend(q, k, v, config=CONFIG, k_cmp=k_cmp, v_cmp=v_cmp, scale=0.3, backend=backend, selection_grad=True)
        assert torch.equal(plain, st), backend


def test_straight_through_gradient_is_the_surrogates_derivative():
    q, k, v, k_cmp, v_cmp = inputs(1)
    idx = select_blocks(q, k_cmp, config=CONFIG, scale=0.3)
    with torch.no_grad():
        _, p0 = R.compressed_attention(q, k_cmp, k_cmp.new_zeros(*k_cmp.shape[:-1], 1), CONFIG, 0.3)
        imp0 = R.selection_scores(p0, CONFIG, SHAPE.Hkv)
    # the surrogate's autograd derivative agrees with finite differences ...
    assert torch.autograd.gradcheck(lambda q, kc: surrogate(q, k.detach(), v.detach(), kc, idx, imp0), (q, k_cmp))
    # ... and attend's straight-through gradient of the selected branch is that derivative
    w = torch.randn(SHAPE.B, SHAPE.Hq, SHAPE.T, SHAPE.Dv, dtype=torch.float64)
    want = torch.autograd.grad((surrogate(q, k, v, k_cmp, idx, imp0) * w).sum(), (q, k_cmp))
    for backend in ("reference", "flex"):
        _, aux = attend(q, k, v, config=CONFIG, k_cmp=k_cmp, v_cmp=v_cmp, scale=0.3, block_indices=idx,
                        backend=backend, selection_grad=True, return_aux=True)
        got = torch.autograd.grad((aux.o_slc * w).sum(), (q, k_cmp))
        for name, a, b in zip(("q", "k_cmp"), got, want):
            assert rel_err(a, b) < 1e-10, f"{backend} {name}"


def test_without_it_the_selected_branch_gives_k_cmp_no_gradient():
    # the reason for the option: top-n cuts the path from o_slc to the compressed keys
    q, k, v, k_cmp, v_cmp = inputs(2)
    _, aux = attend(q, k, v, config=CONFIG, k_cmp=k_cmp, v_cmp=v_cmp, scale=0.3, return_aux=True)
    assert torch.autograd.grad(aux.o_slc.sum(), k_cmp, allow_unused=True)[0] is None
    _, aux = attend(q, k, v, config=CONFIG, k_cmp=k_cmp, v_cmp=v_cmp, scale=0.3, return_aux=True, selection_grad=True)
    assert torch.autograd.grad(aux.o_slc.square().sum(), k_cmp)[0].abs().sum() > 0


def test_block_scores_match_the_reference_with_gradients():
    q, _, _, k_cmp, _ = inputs(3)
    got = block_scores(q, k_cmp, config=CONFIG, scale=0.3, chunk_size=17)  # chunks meet inside the row
    _, p_cmp = R.compressed_attention(q, k_cmp, k_cmp.new_zeros(*k_cmp.shape[:-1], 1), CONFIG, 0.3)
    want = R.selection_scores(p_cmp, CONFIG, SHAPE.Hkv)
    assert rel_err(got, want) < 1e-12
    w = torch.randn(want.shape, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((got * w).sum(), (q, k_cmp)), torch.autograd.grad((want * w).sum(), (q, k_cmp))):
        assert rel_err(a, b) < 1e-12


def test_module_compression_learns_through_the_selection():
    torch.manual_seed(0)
    layer = SparseAttention(32, heads=4, kv_heads=2, dim_head=8, config=CONFIG).double()
    x = torch.randn(1, SHAPE.T, 32, dtype=torch.float64)

    def grads(selection_grad):
        layer.selection_grad = selection_grad
        layer.zero_grad()
        out = layer(x)
        out.square().sum().backward()
        return out.detach(), layer.compress_k.mlp[0].weight.grad.clone()

    out_plain, g_plain = grads(False)
    out_st, g_st = grads(True)
    assert torch.equal(out_plain, out_st)
    assert rel_err(g_st, g_plain) > 1e-6  # the selected branch now adds to the compressor's gradient


def test_selection_grad_is_validated():
    q, k, v, _, _ = inputs()
    with pytest.raises(TypeError, match="selection_grad"):
        attend(q, k, v, config=CONFIG, selection_grad=1)
    with pytest.raises(ValueError, match="selection_grad"):
        attend(q, k, v, config=CONFIG, selection_grad=True, cu_seqlens=torch.tensor([0, 30, 70]))
    with pytest.raises(TypeError, match="selection_grad"):
        SparseAttention(32, heads=4, selection_grad="yes")
    from nsa_flex.triton_backend import available

    if available(q.device)[0]:  # the Triton interpreter on the CPU (conftest), or CUDA
        with pytest.raises(ValueError, match="selection_grad"):
            attend(q.float(), k.float(), v.float(), config=CONFIG, backend="triton", selection_grad=True)


def test_only_the_compressed_keys_need_gradients():
    # frozen q/k/v (only a key compressor training): the backward runs for the importance the
    # selected branch's score_mod captures, so the mask must carry what a backward reads
    q, k, v, k_cmp, v_cmp = inputs(4)
    q, k, v = q.detach(), k.detach(), v.detach()
    grads = []
    for backend in ("reference", "flex"):
        _, aux = attend(q, k, v, config=CONFIG, k_cmp=k_cmp, v_cmp=v_cmp, scale=0.3, backend=backend,
                        selection_grad=True, return_aux=True)
        grads.append(torch.autograd.grad(aux.o_slc.square().sum(), k_cmp)[0])
    assert grads[0].abs().sum() > 0 and rel_err(grads[1], grads[0]) < 1e-10
