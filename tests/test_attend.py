"""attend(): the flex backend against the reference, end to end, and its contracts."""

import pytest
import torch
from hypothesis import given, strategies as st

from nsa_flex import NSAConfig, attend, mean_compress, reference as R, select_blocks
from nsa_flex.testing import assert_causal, assert_matches_reference

from strategies import Shape, configs, make_qkv, rel_err, shapes
from test_selection import chosen_scores

TOL = 1e-10  # float64: both sides are exact softmax attention up to rounding


def extras(shape, config, seed, requires_grad=False):
    """Random gates and compressed K/V (not the mean: attend must use what it is given)."""
    g = torch.Generator().manual_seed(seed + 1)
    tc = config.num_compressed(shape.T)
    gates = torch.rand(shape.B, shape.Hq, shape.T, 3, generator=g, dtype=torch.float64)
    k_cmp = torch.randn(shape.B, shape.Hkv, tc, shape.Dk, generator=g, dtype=torch.float64)
    v_cmp = torch.randn(shape.B, shape.Hkv, tc, shape.Dv, generator=g, dtype=torch.float64)
    return [x.requires_grad_(requires_grad) for x in (gates, k_cmp, v_cmp)]


def both(q, k, v, gates, **kw):
    out, aux = attend(q, k, v, gates, return_aux=True, **kw)
    ref, ref_aux = attend(q, k, v, gates, return_aux=True, backend="reference", **kw)
    return (out, aux), (ref, ref_aux)


@given(configs(), shapes(), st.integers(0, 2**31 - 1))
def test_flex_matches_reference(config, shape, seed):
    q, k, v = make_qkv(shape, seed)
    gates, k_cmp, v_cmp = extras(shape, config, seed)
    idx = select_blocks(q, k_cmp, config=config)
    (out, aux), (ref, ref_aux) = both(q, k, v, gates, config=config, k_cmp=k_cmp, v_cmp=v_cmp, block_indices=idx)
    assert out.shape == (shape.B, shape.Hq, shape.T, shape.Dv) and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    for name, a, b in zip(("out", "o_cmp", "o_slc", "o_swa"), (out, *aux[1:]), (ref, *ref_aux[1:])):
        assert rel_err(a, b) < TOL, name
    assert aux.block_indices is idx


SCORE_MODS = {
    "softcap": lambda s, b, h, q, kv: 2.0 * torch.tanh(s / 2.0),
    "alibi": lambda s, b, h, q, kv: s - 0.05 * (h + 1) * (q - kv),
    "per_batch": lambda s, b, h, q, kv: s * (1.0 + 0.5 * b),
}


@given(configs(), shapes(max_t=300), st.sampled_from(sorted(SCORE_MODS)), st.booleans(), st.integers(0, 2**31 - 1))
def test_mods_pass_through_every_branch(config, shape, mod_name, use_docs, seed):
    q, k, v = make_qkv(shape, seed)
    gates, _, _ = extras(shape, config, seed)
    mask_mod = None
    if use_docs:  # documents packed in a row: a query sees only keys of its own document
        doc = (torch.arange(shape.T) // max(1, shape.T // 3 + 1)).to(torch.int32)
        mask_mod = lambda b, h, qi, kv: doc[qi] == doc[kv]
    kw = dict(config=config, score_mod=SCORE_MODS[mod_name], mask_mod=mask_mod)
    (out, aux), (ref, ref_aux) = both(q, k, v, gates, **kw)
    # selection ran with the mods on both sides: equally good picks ...
    _, scores = R.select_blocks(q, mean_compress(k, config), config, shape.Dk**-0.5, kw["score_mod"], mask_mod)
    torch.testing.assert_close(chosen_scores(aux.block_indices, scores), chosen_scores(ref_aux.block_indices, scores), rtol=1e-9, atol=1e-12)
    # ... and the same attention on one selection
    out = attend(q, k, v, gates, block_indices=ref_aux.block_indices, **kw)
    assert rel_err(out, ref) < TOL
    assert torch.isfinite(out).all()


def test_issue_example_agrees_with_reference():
    # B=4, T=507, Hq=4, Hkv=2, select_block=32, num_selected=6, Dk=64, the whole pipeline
    config = NSAConfig(select_block=32, num_selected=6)
    shape = Shape(B=4, Hkv=2, G=2, T=507, Dk=64, Dv=64)
    q, k, v = make_qkv(shape, seed=507)
    gates, _, _ = extras(shape, config, 507)
    (out, aux), (ref, ref_aux) = both(q, k, v, gates, config=config)
    assert torch.equal(aux.block_indices, ref_aux.block_indices)
    assert rel_err(out, ref) < TOL


@given(configs(), shapes(max_t=200, max_work=300_000), st.integers(0, 2**31 - 1))
def test_gradients_match_reference(config, shape, seed):
    q, k, v = make_qkv(shape, seed)
    gates, k_cmp, v_cmp = extras(shape, config, seed)
    idx = select_blocks(q, k_cmp, config=config)
    # q, k, v, gates, k_cmp, v_cmp, against the reference on one random output weighting
    assert_matches_reference(attend, q, k, v, gates, grads=True, seed=seed, config=config, k_cmp=k_cmp, v_cmp=v_cmp,
                             block_indices=idx)


@given(configs(), shapes(max_t=300), st.integers(0, 2**31 - 1), st.data())
def test_causality(config, shape, seed, data):
    t = data.draw(st.integers(0, shape.T - 1))
    q, k, v = make_qkv(shape, seed)
    # the output, each branch and the selection at or before t
    assert_causal(attend, q, k, v, t=t, seed=seed, config=config)


@given(configs(), shapes(max_t=300), st.integers(0, 2**31 - 1))
def test_batch_rows_and_kv_groups_are_independent(config, shape, seed):
    q, k, v = make_qkv(shape, seed)
    out = attend(q, k, v, config=config)
    for b in range(shape.B):
        alone = attend(q[b : b + 1], k[b : b + 1], v[b : b + 1], config=config)
        assert rel_err(alone, out[b : b + 1]) < TOL
    # one KV head's group sees nothing of the other groups
    G = shape.G
    for h in range(shape.Hkv):
        alone = attend(q[:, h * G : (h + 1) * G], k[:, h : h + 1], v[:, h : h + 1], config=config)
        assert rel_err(alone, out[:, h * G : (h + 1) * G]) < TOL


@pytest.mark.parametrize("T", [1, 2, 31, 32, 33])
def test_short_sequences_are_finite(T):
    config = NSAConfig()  # compress_block 32: T < 32 has no compressed block
    q, k, v = make_qkv(Shape(1, 2, 3, T, 16, 16), seed=T)
    out, aux = attend(q, k, v, config=config, return_aux=True)
    assert torch.isfinite(out).all()
    if T < 32:
        assert (aux.o_cmp == 0).all()
    ref = attend(q, k, v, config=config, backend="reference")
    assert rel_err(out, ref) < TOL


def test_gates_none_weighs_each_branch_one():
    config = NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=3, num_initial=1, num_local=1, window=8)
    shape = Shape(2, 1, 2, 50, 16, 32)
    q, k, v = make_qkv(shape, 0)
    ones = torch.ones(2, 2, 50, 3, dtype=torch.float64)
    out, aux = attend(q, k, v, config=config, return_aux=True)
    assert torch.equal(out, attend(q, k, v, ones, config=config))
    assert rel_err(out, aux.o_cmp + aux.o_slc + aux.o_swa) < 1e-15
    assert aux.block_indices.shape == (2, 1, 50, 3) and aux.block_indices.dtype == torch.int32


def test_mean_compression_is_the_default():
    config = NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=3, num_initial=1, num_local=1, window=8)
    q, k, v = make_qkv(Shape(1, 1, 1, 40, 16, 16), 1)
    a = attend(q, k, v, config=config)
    b = attend(q, k, v, config=config, k_cmp=mean_compress(k, config), v_cmp=mean_compress(v, config))
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- bad input

CFG = NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=3, num_initial=1, num_local=1, window=8)


def _inputs():
    q, k, v = make_qkv(Shape(2, 2, 2, 40, 16, 24), 0)
    return dict(q=q, k=k, v=v)


BAD = [
    ("q rank", lambda d: d.update(q=d["q"][0]), ValueError, "q must have 4"),
    ("k rank", lambda d: d.update(k=d["k"][..., 0]), ValueError, "k must have 4"),
    ("q not tensor", lambda d: d.update(q=d["q"].tolist()), TypeError, "q must be a torch.Tensor"),
    ("int q", lambda d: d.update(q=d["q"].long()), TypeError, "q must have a floating"),
    ("dtype mismatch", lambda d: d.update(k=d["k"].float()), TypeError, "k has dtype"),
    ("heads", lambda d: d.update(q=d["q"][:, :3]), ValueError, "multiple of k's heads"),
    ("k/v heads", lambda d: d.update(v=d["v"][:, :1]), ValueError, "k has 2 heads but v has 1"),
    ("batch", lambda d: d.update(k=d["k"][:1]), ValueError, "batch sizes"),
    ("length", lambda d: d.update(v=d["v"][:, :, :30]), ValueError, "sequence lengths"),
    ("Dk", lambda d: d.update(k=d["k"][..., :8]), ValueError, "head dim"),
    ("empty", lambda d: d.update(q=d["q"][:, :, :0], k=d["k"][:, :, :0], v=d["v"][:, :, :0]), ValueError, "T >= 1"),
    ("no rows", lambda d: d.update(q=d["q"][:0], k=d["k"][:0], v=d["v"][:0]), ValueError, "B >= 1"),
    ("Dv > 256", lambda d: d.update(v=torch.randn(2, 2, 40, 264, dtype=torch.float64)), ValueError, "head dims up to 256"),
    ("gates shape", lambda d: d.update(gates=torch.rand(2, 4, 40, 2, dtype=torch.float64)), ValueError, "gates must have shape"),
    ("gates int", lambda d: d.update(gates=torch.ones(2, 4, 40, 3, dtype=torch.long)), TypeError, "gates must have a floating"),
    ("k_cmp Tc", lambda d: d.update(k_cmp=torch.randn(2, 2, 5, 16, dtype=torch.float64)), ValueError, "k_cmp must hold Tc = 9"),
    ("v_cmp Dv", lambda d: d.update(v_cmp=torch.randn(2, 2, 9, 16, dtype=torch.float64)), ValueError, "v_cmp must have head dim 24"),
    ("k_cmp heads", lambda d: d.update(k_cmp=torch.randn(2, 1, 9, 16, dtype=torch.float64)), ValueError, "k_cmp has 1 heads"),
    ("indices float", lambda d: d.update(block_indices=torch.zeros(2, 2, 40, 3)), TypeError, "block_indices must have an integer|block_indices must be int32"),
    ("indices shape", lambda d: d.update(block_indices=torch.zeros(2, 2, 40, 4, dtype=torch.int32)), ValueError, "block_indices must have shape"),
    ("indices high", lambda d: d.update(block_indices=torch.full((2, 2, 40, 3), 5, dtype=torch.int32)), ValueError, r"block_indices must lie in \[-1, 5\)"),
    ("indices low", lambda d: d.update(block_indices=torch.full((2, 2, 40, 3), -2, dtype=torch.int32)), ValueError, "block_indices must lie"),
    ("config", lambda d: d.update(config={"window": 3}), TypeError, "config must be an NSAConfig"),
    ("scale", lambda d: d.update(scale="0.1"), TypeError, "scale must be"),
    ("scale nan", lambda d: d.update(scale=float("nan")), ValueError, "scale must be finite"),
    ("score_mod", lambda d: d.update(score_mod=3), TypeError, "score_mod must be callable"),
    ("mask_mod", lambda d: d.update(mask_mod="x"), TypeError, "mask_mod must be callable"),
    ("backend", lambda d: d.update(backend="cuda"), ValueError, "backend must be one of"),
    ("return_aux", lambda d: d.update(return_aux=1), TypeError, "return_aux must be a bool"),
]


@pytest.mark.parametrize("name, mutate, exc, match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_named(name, mutate, exc, match):
    d = _inputs()
    d.setdefault("config", CFG)
    mutate(d)
    q, k, v = d.pop("q"), d.pop("k"), d.pop("v")
    with pytest.raises(exc, match=match):
        attend(q, k, v, **d)


def test_device_mismatch_is_named():
    q, k, v = make_qkv(Shape(1, 1, 1, 8, 16, 16), 0)
    with pytest.raises(ValueError, match="k is on meta"):
        attend(q, k.to("meta"), v, config=CFG)


def test_no_grad_with_inputs_that_require_grad():
    # on the CPU, the public flex_attention refuses such inputs even under no_grad
    q, k, v = make_qkv(Shape(1, 1, 2, 40, 16, 16), 2, requires_grad=True)
    with torch.no_grad():
        out = attend(q, k, v, config=CFG)
    assert not out.requires_grad
    assert rel_err(out, attend(q, k, v, config=CFG, backend="reference")) < TOL


def test_tensors_captured_by_score_mod_get_gradients():
    # a learned per-head ALiBi slope: its gradient must match the reference's, on every path
    config = NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=3, num_initial=1, num_local=1, window=16)
    q, k, v = make_qkv(Shape(1, 1, 2, 40, 16, 16), 8, requires_grad=True)
    grads = []
    for backend in ("flex", "reference"):
        slope = torch.tensor([0.3, 0.1], dtype=torch.float64, requires_grad=True)
        mod = lambda s, b, h, qi, kv: s - slope[h] * (qi - kv)
        out = attend(q, k, v, config=config, backend=backend, score_mod=mod)
        grads.append(torch.autograd.grad(out.square().sum(), (slope, q)))
    assert rel_err(grads[0][0], grads[1][0]) < TOL and rel_err(grads[0][1], grads[1][1]) < TOL
