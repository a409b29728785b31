"""Queries at an offset over a longer K/V (``attend(..., q_offset=)``): the output, the
selection and every gradient equal the rows ``q_offset .. q_offset + Tq - 1`` of ``attend`` on
the full-length queries, on every backend; the mods see absolute positions; bad offsets raise.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nsa_flex
from nsa_flex import attend, dispatch, masks
from nsa_flex.triton_support import triton_missing

from strategies import SMALL_CONFIGS as CONFIGS, rel_err


def _inputs(B, Hq, Hkv, T, Dk, Dv, seed, dtype=torch.float64, config=None):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)

    q, k, v = r(B, Hq, T, Dk), r(B, Hkv, T, Dk), r(B, Hkv, T, Dv)
    gates = torch.rand(B, Hq, T, 3, generator=g, dtype=torch.float64).to(dtype)
    tc = config.num_compressed(T)
    return q, k, v, gates, r(B, Hkv, tc, Dk), r(B, Hkv, tc, Dv)


def _check_rows(config, B, Hq, Hkv, T, Dk, Dv, off, tq, tk, seed, backend="flex", dtype=torch.float64, tol=1e-10,
                score_mod=None, mask_mod=None, given_cmp=True, given_indices=False, selection_grad=False):
    """attend over q's rows off .. off+tq-1 and k/v's first tk positions equals those rows of the
    full call, forward and every gradient (the k_cmp/v_cmp of the short call: the blocks of tk)."""
    q, k, v, gates, k_cmp, v_cmp = _inputs(B, Hq, Hkv, T, Dk, Dv, seed, dtype, config=config)
    full_in = [x.clone().requires_grad_() for x in (q, k, v, gates, k_cmp, v_cmp)]
    kw = dict(config=config, backend=backend, score_mod=score_mod, mask_mod=mask_mod, return_aux=True,
              selection_grad=selection_grad)
    indices = None
    if given_indices:
        g = torch.Generator().manual_seed(seed + 1)
        ns = config.num_select_blocks(T)
        indices = torch.randint(-1, ns, (B, Hkv, T, config.num_selected), generator=g, dtype=torch.int32)
    cmp_full = dict(k_cmp=full_in[4], v_cmp=full_in[5]) if given_cmp else {}
    full, aux = attend(*full_in[:4], block_indices=indices, **cmp_full, **kw)

    tc = config.num_compressed(tk)
    rows = slice(off, off + tq)
    part_in = [x.detach()[:, :, s].clone().requires_grad_() for x, s in zip(
        full_in, (rows, slice(0, tk), slice(0, tk), rows, slice(0, tc), slice(0, tc)))]
    cmp_part = dict(k_cmp=part_in[4], v_cmp=part_in[5]) if given_cmp else {}
    ns_tk = config.num_select_blocks(tk)
    part_indices = None
    if indices is not None:
        # blocks past the short K/V's last one select nothing there (they lie after every query)
        part_indices = torch.where(indices[:, :, rows] < ns_tk, indices[:, :, rows], -1)
    out, aux_p = attend(*part_in[:4], block_indices=part_indices, q_offset=off, **cmp_part, **kw)

    assert out.shape == (B, Hq, tq, Dv)
    assert rel_err(out, full[:, :, rows]) < tol
    if indices is None:
        assert torch.equal(aux_p.block_indices, aux.block_indices[:, :, rows])
    else:
        assert aux_p.block_indices is part_indices
    for a, b in zip(aux_p[1:], aux[1:]):
        assert rel_err(a, b[:, :, rows]) < tol
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64).to(dtype)
    used = [0, 1, 2, 3] + ([4, 5] if given_cmp else [])
    # (allow_unused: the reference leaves empty k_cmp/v_cmp, Tc = 0, out of the graph)
    grads_full = torch.autograd.grad((full[:, :, rows] * w).sum(), [full_in[i] for i in used], allow_unused=True)
    grads_part = torch.autograd.grad((out * w).sum(), [part_in[i] for i in used], allow_unused=True)
    grads_full = [torch.zeros_like(full_in[i]) if g is None else g for i, g in zip(used, grads_full)]
    grads_part = [torch.zeros_like(part_in[i]) if g is None else g for i, g in zip(used, grads_part)]
    cut = (rows, slice(0, tk), slice(0, tk), rows, slice(0, tc), slice(0, tc))
    for i, a, b in zip(used, grads_full, grads_part):
        # (a gradient may be 0 exactly, e.g. q's with one key in sight: an absolute floor)
        a_cut = a[:, :, cut[i]]
        assert (b - a_cut).norm() <= tol * (a_cut.norm() + 1e-3), "q k v gates k_cmp v_cmp".split()[i]
        rest = torch.ones(a.shape[2], dtype=torch.bool)
        rest[cut[i]] = False
        if i in (1, 2, 4, 5):  # keys (and blocks) past tk get nothing in the full call either
            assert torch.count_nonzero(a[:, :, rest]) == 0


@settings(max_examples=15)
@given(
    config=st.sampled_from(CONFIGS),
    sizes=st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(1, 3)),
    T=st.integers(1, 50),
    data=st.data(),
    backend=st.sampled_from(["flex", "reference"]),
    given_cmp=st.booleans(),
    given_indices=st.booleans(),
)
def test_offset_rows_equal_the_full_call(config, sizes, T, data, backend, given_cmp, given_indices):
    B, Hkv, G = sizes
    tk = data.draw(st.integers(1, T), label="Tk")
    tq = data.draw(st.integers(1, tk), label="Tq")
    off = data.draw(st.sampled_from([0, tk - tq, data.draw(st.integers(0, tk - tq), label="any")]), label="q_offset")
    _check_rows(config, B, Hkv * G, Hkv, T, 8, 4, off, tq, tk, seed=T * 7 + off, backend=backend,
                given_cmp=given_cmp, given_indices=given_indices)


@pytest.mark.parametrize("backend", ["flex", "reference"])
@pytest.mark.parametrize("off,tq,tk", [(0, 10, 45), (13, 20, 45), (25, 20, 45), (37, 1, 38), (3, 5, 8)])
def test_mods_see_absolute_positions(backend, off, tq, tk):
    # a position-dependent score_mod and mask_mod: with relative positions the rows would differ
    slopes = torch.tensor([0.3, 0.1, 0.05, 0.2], dtype=torch.float64)

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx) + 0.01 * q_idx

    def mask(b, h, q_idx, kv_idx):
        return (q_idx % 3 != 1) | (kv_idx % 2 == 0)

    _check_rows(CONFIGS[0], 1, 4, 2, 45, 8, 8, off, tq, tk, seed=off, backend=backend, score_mod=alibi,
                mask_mod=mask)


@pytest.mark.parametrize("backend", ["flex", "reference"])
def test_selection_grad_at_an_offset(backend):
    _check_rows(CONFIGS[0], 1, 4, 2, 40, 8, 8, 17, 12, 35, seed=5, backend=backend, given_cmp=True,
                selection_grad=True)


def test_none_means_the_last_queries_and_zero_offset_is_todays_call():
    config = CONFIGS[0]
    q, k, v, gates, _, _ = _inputs(2, 4, 2, 30, 8, 8, 0, config=config)
    base = attend(q, k, v, gates, config=config)
    assert torch.equal(attend(q, k, v, gates, config=config, q_offset=0), base)
    assert torch.equal(attend(q, k, v, gates, config=config, q_offset=None), base)
    # None: the queries are the last Tq positions
    a = attend(q[:, :, 20:], k, v, gates[:, :, 20:], config=config)
    b = attend(q[:, :, 20:], k, v, gates[:, :, 20:], config=config, q_offset=20)
    assert torch.equal(a, b)
    assert rel_err(a, base[:, :, 20:]) < 1e-12
    # keys past the last query are invisible: an explicit offset ignores them
    c = attend(q[:, :, 5:15], k, v, gates[:, :, 5:15], config=config, q_offset=5)
    assert rel_err(c, base[:, :, 5:15]) < 1e-12


def test_the_plan_is_the_full_calls():
    # the same facts, the same paths: an offset changes no dispatch decision
    q, k, v, *_ = _inputs(1, 4, 2, 30, 8, 8, 0, config=CONFIGS[0])
    kw = dict(backend="flex", score_mod=None, mask_mod=None, docs=None, block_indices=None, selection_grad=False)
    assert dispatch.plan(q[:, :, 10:20], k[:, :, :20], v[:, :, :20], **kw) == dispatch.plan(q, k, v, **kw)


@pytest.mark.parametrize(
    "q_offset,exc,match",
    [
        (True, TypeError, "q_offset must be an int"),
        (1.0, TypeError, "q_offset must be an int"),
        (torch.tensor(1), TypeError, "q_offset must be an int"),
        ("1", TypeError, "q_offset must be an int"),
        (-1, ValueError, "q_offset must be >= 0"),
        (21, ValueError, "q_offset \\+ Tq must be <= Tk"),
    ],
)
def test_bad_offsets_raise(q_offset, exc, match):
    q, k, v, *_ = _inputs(1, 2, 1, 30, 8, 8, 0, config=CONFIGS[0])
    with pytest.raises(exc, match=match):
        attend(q[:, :, :10], k, v, config=CONFIGS[0], q_offset=q_offset)


def test_more_queries_than_keys_raise():
    q, k, v, *_ = _inputs(1, 2, 1, 30, 8, 8, 0, config=CONFIGS[0])
    with pytest.raises(ValueError, match="sequence lengths differ"):
        attend(q, k[:, :, :20], v[:, :, :20], config=CONFIGS[0])
    with pytest.raises(ValueError, match="q_offset \\+ Tq must be <= Tk"):
        attend(q, k[:, :, :20], v[:, :, :20], config=CONFIGS[0], q_offset=0)
    with pytest.raises(ValueError, match="sequence lengths differ"):
        attend(q[:, :, :10], k, v[:, :, :20], config=CONFIGS[0])


def test_shapes_follow_the_keys():
    config = CONFIGS[0]
    q, k, v, gates, k_cmp, v_cmp = _inputs(1, 2, 1, 30, 8, 8, 0, config=config)
    # k_cmp holds the blocks of Tk, gates and block_indices Tq rows
    with pytest.raises(ValueError, match="k_cmp must hold Tc = 6"):
        attend(q[:, :, :10], k, v, config=config, q_offset=3, k_cmp=k_cmp[:, :, :3])
    with pytest.raises(ValueError, match="gates must have shape"):
        attend(q[:, :, :10], k, v, gates, config=config, q_offset=3)
    idx = torch.zeros(1, 1, 30, config.num_selected, dtype=torch.int32)
    with pytest.raises(ValueError, match="block_indices must have shape"):
        attend(q[:, :, :10], k, v, config=config, q_offset=3, block_indices=idx)
    with pytest.raises(ValueError, match="block_indices must lie in"):
        attend(q[:, :, :10], k, v, config=config, q_offset=3, block_indices=idx[:, :, :10] + 4)
    out = attend(q[:, :, :10], k, v, gates[:, :, :10], config=config, q_offset=3, k_cmp=k_cmp, v_cmp=v_cmp,
                 block_indices=idx[:, :, :10] + 3)
    assert out.shape == (1, 2, 10, 8)


@pytest.mark.parametrize("backend", ["flex", "reference"])
@pytest.mark.parametrize("bounds", [(0, 12, 30), (0, 5, 5, 21, 30), (0, 30)])
@pytest.mark.parametrize("off,tq", [(0, 30), (10, 20), (3, 6), (12, 9), (29, 1)])
def test_packed_rows_at_an_offset(backend, bounds, off, tq):
    # cu_seqlens describes the keys' row; the queries' rows of the full packed call, forward,
    # aux and gradients, with doc-local given block indices and mods in packed positions
    config = CONFIGS[0]
    q, k, v, gates, *_ = _inputs(1, 4, 2, 30, 8, 8, off, config=config)
    cu = torch.tensor(bounds)
    tc = int(nsa_flex.varlen.compressed_cu_seqlens(cu, config)[-1])
    g = torch.Generator().manual_seed(1)
    k_cmp, v_cmp = torch.randn(1, 2, tc, 8, generator=g, dtype=torch.float64), torch.randn(1, 2, tc, 8, generator=g, dtype=torch.float64)

    def alibi(score, b, h, q_idx, kv_idx):
        return score - 0.1 * (q_idx - kv_idx) + 0.01 * q_idx

    full_in = [x.clone().requires_grad_() for x in (q, k, v, gates, k_cmp, v_cmp)]
    kw = dict(config=config, backend=backend, cu_seqlens=cu, score_mod=alibi, return_aux=True)
    full, aux = attend(*full_in[:4], k_cmp=full_in[4], v_cmp=full_in[5], **kw)
    rows = slice(off, off + tq)
    part_in = [x.detach().clone().requires_grad_() for x in (q[:, :, rows], k, v, gates[:, :, rows], k_cmp, v_cmp)]
    out, aux_p = attend(*part_in[:4], k_cmp=part_in[4], v_cmp=part_in[5], q_offset=off, **kw)
    assert rel_err(out, full[:, :, rows]) < 1e-10
    assert torch.equal(aux_p.block_indices, aux.block_indices[:, :, rows])
    for a, b in zip(aux_p[1:], aux[1:]):
        assert rel_err(a, b[:, :, rows]) < 1e-10
    given = attend(*[x.detach() for x in part_in[:4]], k_cmp=k_cmp, v_cmp=v_cmp, q_offset=off,
                   block_indices=aux.block_indices[:, :, rows], **kw)[0]
    assert rel_err(given, full[:, :, rows]) < 1e-10
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    # (allow_unused: the reference leaves blocks no query reaches out of the graph)
    gf = torch.autograd.grad((full[:, :, rows] * w).sum(), full_in, allow_unused=True)
    gp = torch.autograd.grad((out * w).sum(), part_in, allow_unused=True)
    gf = [torch.zeros_like(x) if d is None else d for x, d in zip(full_in, gf)]
    gp = [torch.zeros_like(x) if d is None else d for x, d in zip(part_in, gp)]
    for i, (a, b) in enumerate(zip(gf, gp)):
        a = a[:, :, rows] if i in (0, 3) else a
        assert (b - a).norm() <= 1e-10 * (a.norm() + 1e-3), i


def test_packed_rows_at_an_offset_check_local_indices():
    config = CONFIGS[0]
    q, k, v, *_ = _inputs(1, 2, 1, 30, 8, 8, 0, config=config)
    idx = torch.full((1, 1, 10, config.num_selected), -1, dtype=torch.int32)
    idx[0, 0, 5, 0] = 2  # token 15 lies in the document 12..29 of 18 tokens: blocks 0..2, fine
    attend(q[:, :, 10:20], k, v, config=config, cu_seqlens=torch.tensor([0, 12, 30]), q_offset=10, block_indices=idx)
    idx[0, 0, 1, 0] = 2  # token 11 lies in the document 0..11: blocks 0..1 only
    with pytest.raises(ValueError, match="token 11 lies in a document of 12 tokens"):
        attend(q[:, :, 10:20], k, v, config=config, cu_seqlens=torch.tensor([0, 12, 30]), q_offset=10,
               block_indices=idx)


def test_block_masks_at_an_offset():
    # the BlockMask builders' q_offset: the masks of the rows off .. off+tq-1 of the full ones
    from torch.nn.attention.flex_attention import flex_attention

    config, off, tq = CONFIGS[0], 17, 20
    T = off + tq
    q, k, v, *_ = _inputs(1, 2, 2, T, 8, 8, 3, config=config)
    for full_mask, part_mask, kv in (
        (masks.sliding_window_block_mask(T, 8, block_size=(16, 16)),
         masks.sliding_window_block_mask(tq, 8, q_offset=off, block_size=(16, 16)), k),
        (masks.compressed_block_mask(T, config, block_size=(16, 16)),
         masks.compressed_block_mask(tq, config, q_offset=off, block_size=(16, 16)), k[:, :, : config.num_compressed(T)]),
    ):
        assert part_mask.shape[-2:] == (tq, kv.shape[2])
        full = flex_attention(q, kv, kv, block_mask=full_mask)
        part = flex_attention(q[:, :, off:], kv, kv, block_mask=part_mask)
        assert rel_err(part, full[:, :, off:]) < 1e-12
    with pytest.raises(ValueError, match="q_offset must be >= 0"):
        masks.sliding_window_block_mask(tq, 8, q_offset=-1)
    with pytest.raises(TypeError, match="q_offset must be an int"):
        masks.compressed_block_mask(tq, config, q_offset=1.5)


def test_compiled_offsets_fullgraph():
    # under torch.compile an int q_offset is a guard: a second value recompiles once, then the
    # offset is dynamic (automatic dynamic shapes) and further values reuse that graph
    from torch._dynamo.testing import CompileCounter

    config = CONFIGS[0]
    q, k, v, gates, *_ = _inputs(1, 4, 2, 48, 16, 16, 1, dtype=torch.float32, config=config)

    def run(q, k, v, gates, off):
        return attend(q, k, v, gates, config=config, q_offset=off)

    counter = CompileCounter()
    compiled = torch.compile(run, backend=counter, fullgraph=True)
    torch._dynamo.reset()
    full = attend(q, k, v, gates, config=config)
    for off in (8, 16, 24):
        out = compiled(q[:, :, off : off + 16], k, v, gates[:, :, off : off + 16], off)
        assert rel_err(out, full[:, :, off : off + 16]) < 1e-5
    assert counter.frame_count == 2


@pytest.mark.skipif(bool(triton_missing()), reason="needs the triton package")
@pytest.mark.parametrize("off,tq,tk", [(0, 7, 30), (13, 9, 30), (29, 1, 30)])
def test_triton_backend_at_an_offset(off, tq, tk):
    # the Triton selected-branch kernels (forward, dQ, dK/dV) with the queries' positions
    _check_rows(CONFIGS[0], 1, 4, 2, 30, 16, 16, off, tq, tk, seed=off, backend="triton", dtype=torch.float32,
                tol=1e-5)


@pytest.mark.skipif(bool(triton_missing()), reason="needs the triton package")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_paths_at_an_offset(monkeypatch, dtype):
    # The paths CUDA takes, on the CPU: the scoring kernel ("triton"; float16: "triton_lse", fed
    # the compressed branch's log-sum-exp) and FlexAttention's forward with the Triton backward.
    monkeypatch.setattr(dispatch, "_picks_kernels", lambda device: True)
    config = CONFIGS[0]
    q, k, v, gates, _, _ = _inputs(1, 4, 2, 30, 16, 16, 9, dtype=torch.float32, config=config)
    plan = dispatch.plan(q.to(dtype).requires_grad_(), k.to(dtype), v.to(dtype), backend="flex", score_mod=None,
                         mask_mod=None, docs=None, block_indices=None, selection_grad=False)
    assert plan.scoring == ("triton" if dtype == torch.float32 else "triton_lse")
    assert plan.selected == "flex_fwd_triton_bwd"
    off, tq = 11, 12
    full_in = [x.to(dtype).requires_grad_() for x in (q, k, v, gates)]
    _, full_aux = attend(*full_in, config=config, return_aux=True)
    part_in = [x.detach()[:, :, s].clone().requires_grad_() for x, s in
               zip(full_in, (slice(off, off + tq), slice(None), slice(None), slice(off, off + tq)))]
    out, aux = attend(*part_in, config=config, q_offset=off, return_aux=True)
    assert torch.equal(aux.block_indices, full_aux.block_indices[:, :, off : off + tq])
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    # against the reference with the same selection (near-ties may differ between the paths)
    with torch.no_grad():
        same = attend(q.double(), k.double(), v.double(), gates.double(), config=config, backend="reference",
                      block_indices=full_aux.block_indices)
    assert rel_err(out, same[:, :, off : off + tq]) < tol
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad((out.float() * w).sum(), part_in[:3])
    ref_in = [x.double().requires_grad_() for x in (q, k, v)]
    r = attend(*ref_in, gates.double(), config=config, backend="reference", block_indices=full_aux.block_indices)
    ref_grads = torch.autograd.grad((r[:, :, off : off + tq] * w.double()).sum(), ref_in)
    for name, a, b in zip("qkv", grads, ref_grads):
        b = b[:, :, off : off + tq] if name == "q" else b
        assert rel_err(a, b) < tol, name


@pytest.mark.skipif(bool(triton_missing()), reason="needs the triton package")
def test_triton_backend_packed_rows_at_an_offset():
    config = CONFIGS[0]
    q, k, v, gates, *_ = _inputs(1, 4, 2, 30, 16, 16, 2, dtype=torch.float32, config=config)
    cu = torch.tensor([0, 11, 30])
    full = attend(q, k, v, gates, config=config, cu_seqlens=cu, backend="triton")
    part = attend(q[:, :, 8:20], k, v, gates[:, :, 8:20], config=config, cu_seqlens=cu, backend="triton", q_offset=8)
    assert rel_err(part, full[:, :, 8:20]) < 1e-5
