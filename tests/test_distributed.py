"""nsa_flex.distributed on gloo groups of 2 and 4 CPU processes: sharded attention equals
``attend`` on the whole sequence, forward and backward, and so does the sharded layer.

The processes are started once per group size and kept for the session (tests/cp_pool.py); each
Hypothesis example is one job on every rank. The reference computations run here, in the test
process, while the ranks work.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cp_jobs
from cp_pool import Pool
from nsa_flex import attend
from nsa_flex.config import NSAConfig
from nsa_flex.distributed import LAYOUTS, _rank_chunks, context_parallel_attend, shard_sequence, unshard_sequence
from nsa_flex.module import SparseAttention
from nsa_flex.testing import Shape, configs, cu_seqlens, make_inputs, rel_err, shapes

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")

SMALL = NSAConfig(compress_block=4, compress_stride=2, select_block=4, num_selected=3, num_initial=1,
                  num_local=1, window=5)
# Small problems: every block size and the window well below T, T never a multiple of anything.
CONFIGS = configs(max_block=12, max_selected=4, max_window=16)
SHAPES = shapes(max_t=64, max_batch=2, max_kv_heads=2, groups=range(1, 9), head_dims=(4, 8), value_dims=(4, 6, 8),
                max_work=60_000)


@pytest.fixture(scope="session")
def pools():
    """One pool per group size for the whole session (each costs a few seconds to start)."""
    made = {}

    def get(world: int) -> Pool:
        if world not in made:
            made[world] = Pool(world)
        return made[world]

    yield get
    for p in made.values():
        p.close()


@pytest.fixture(scope="session", params=[2, 4], ids=["2ranks", "4ranks"])
def pool(request, pools):
    return pools(request.param)


@pytest.fixture(scope="session")
def pool2(pools):
    return pools(2)


def _inputs(shape, seed, gates: bool, dtype=torch.float64) -> dict:
    q, k, v, g = make_inputs(shape, seed, dtype=dtype)
    dout = torch.randn(shape.B, shape.Hq, shape.T, shape.Dv, generator=torch.Generator().manual_seed(seed + 1),
                       dtype=torch.float64).to(dtype)
    return {"q": q, "k": k, "v": v, "gates": g if gates else None, "dout": dout}


def _single_process(full: dict, kwargs: dict) -> dict:
    """``attend`` on the whole sequence (float64 reference): the output and the gradients of
    ``(out * dout).sum()``."""
    leaves = {n: x.double().clone().requires_grad_() for n, x in full.items() if n != "dout" and x is not None}
    out = attend(leaves["q"], leaves["k"], leaves["v"], leaves.get("gates"), backend="reference", **kwargs)
    (out * full["dout"].double()).sum().backward()
    return {"out": out.detach(), **{n: x.grad for n, x in leaves.items()}}


def _check_attend(pool, full, kwargs, layout, backend, tol):
    pool.start(cp_jobs.attend_job, full, kwargs, layout, backend)
    want = _single_process(full, kwargs)  # meanwhile
    got = pool.collect()[0]
    assert set(got) == set(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        assert rel_err(got[name], want[name]) < tol, (name, rel_err(got[name], want[name]))


@settings(max_examples=10)
@given(shape=SHAPES, config=CONFIGS, layout=st.sampled_from(LAYOUTS), gates=st.booleans(), packed=st.booleans(),
       selection_grad=st.booleans(), seed=st.integers(0, 2**16), data=st.data())
def test_sharded_attend_equals_attend_reference(pool, shape, config, layout, gates, packed, selection_grad, seed,
                                                data):
    kwargs = {"config": config}
    if selection_grad and not packed:  # gradients through the selection too
        kwargs["selection_grad"] = True
    if packed:
        shape = Shape(1, shape.Hq, shape.Hkv, shape.T, shape.Dk, shape.Dv)
        kwargs["cu_seqlens"] = data.draw(cu_seqlens(shape.T), label="cu_seqlens")
    _check_attend(pool, _inputs(shape, seed, gates), kwargs, layout, "reference", 1e-10)


@settings(max_examples=2)
@given(shape=SHAPES, config=CONFIGS, layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**16))
def test_sharded_attend_equals_attend_flex(pool2, shape, config, layout, seed):
    _check_attend(pool2, _inputs(shape, seed, True), {"config": config}, layout, "flex", 1e-10)


def test_sharded_attend_equals_attend_triton(pool2):
    pytest.importorskip("triton")
    shape = Shape(1, 2, 1, 13, 16, 16)  # one tiny problem: Triton's interpreter is slow
    _check_attend(pool2, _inputs(shape, 3, True, dtype=torch.float32), {"config": SMALL}, "zigzag", "triton", 1e-5)


@pytest.mark.parametrize("T", [1, 3, 7])
def test_short_sequences_leave_shards_empty(pool, T):
    """``T < 2R``: some ranks hold no token, yet take part in both collectives."""
    shape = Shape(1, 2, 1, T, 4, 4)
    for layout in LAYOUTS:
        _check_attend(pool, _inputs(shape, T, True), {"config": SMALL}, layout, "reference", 1e-10)


# ----------------------------------------------------------------------------------- the layer


@settings(max_examples=5)
@given(G=st.integers(1, 8), kv_heads=st.integers(1, 2), T=st.integers(1, 50), layout=st.sampled_from(LAYOUTS),
       packed=st.booleans(), data=st.data())
def test_sharded_layer_equals_layer(pool, G, kv_heads, T, layout, packed, data):
    """Outputs and ``x``'s gradient equal the single-process layer's; the parameters' gradients
    summed over the ranks equal its parameter gradients. With RoPE (the default), so that the
    tokens' global positions matter."""
    args = dict(dim=12, heads=G * kv_heads, kv_heads=kv_heads, dim_head=4, config=SMALL, backend="reference")
    torch.manual_seed(T)
    layer = SparseAttention(**args).double()
    x = torch.randn(1, T, 12, dtype=torch.float64)
    dy = torch.randn(1, T, 12, dtype=torch.float64)
    cu = data.draw(cu_seqlens(T), label="cu_seqlens") if packed else None
    pool.start(cp_jobs.module_job, args, layer.state_dict(), x, dy, layout, cu)
    x_ref = x.clone().requires_grad_()
    (layer(x_ref, cu_seqlens=cu) * dy).sum().backward()
    y_ref = layer(x, cu_seqlens=cu).detach()
    got = pool.collect()
    assert rel_err(got[0]["y"], y_ref) < 1e-10
    assert rel_err(got[0]["dx"], x_ref.grad) < 1e-10
    for name, p in layer.named_parameters():
        total = sum(r["grads"][name] for r in got)
        want = torch.zeros_like(p) if p.grad is None else p.grad  # None: the reference with Tc = 0
        assert rel_err(total, want) < 1e-10, name
    if pool.world > 1 and T >= 2 * pool.world:  # each rank's part alone is not the whole gradient
        assert rel_err(got[0]["grads"]["to_q.weight"], layer.to_q.weight.grad) > 1e-3


# -------------------------------------------------------------------------- shard and unshard


def test_layouts_cover_the_sequence_once():
    for world in (1, 2, 3, 4):
        for T in range(0, 3 * 2 * world + 2):
            for layout in LAYOUTS:
                chunks = _rank_chunks(T, world, layout)
                assert len(chunks) == world
                covered = sorted(p for c in chunks for a, b in c for p in range(a, b))
                assert covered == list(range(T))
                lengths = [sum(b - a for a, b in c) for c in chunks]
                assert max(lengths) - min(lengths) <= (1 if layout == "contiguous" else 2)
                if layout == "zigzag":  # rank r: chunks r and 2R-1-r of 2R
                    assert all(len(c) == 2 and c[0][1] <= c[1][0] for c in chunks)
                    assert [c[0] for c in chunks] + [c[1] for c in reversed(chunks)] == sorted(
                        [c[0] for c in chunks] + [c[1] for c in chunks])
    # torch.tensor_split's sizes: T = 10 over 2 ranks, zigzag chunks of 3, 3, 2, 2 tokens
    assert _rank_chunks(10, 2, "zigzag") == [[(0, 3), (8, 10)], [(3, 6), (6, 8)]]
    assert _rank_chunks(10, 4, "contiguous") == [[(0, 3)], [(3, 6)], [(6, 8)], [(8, 10)]]


@settings(max_examples=6)
@given(size=st.lists(st.integers(1, 3), min_size=1, max_size=3), T=st.integers(0, 19), where=st.integers(0, 3),
       layout=st.sampled_from(LAYOUTS), negative=st.booleans(), ids=st.booleans())
def test_shard_unshard_round_trip(pool, size, T, where, layout, negative, ids):
    """Any dim, float or integer (token ids): exact, and the backward sums over ranks."""
    where = min(where, len(size))
    shape = size[:where] + [T] + size[where:]
    x = torch.randint(100, shape) if ids else torch.randn(shape, dtype=torch.float64)
    dim = where - len(shape) if negative else where
    got = pool.run(cp_jobs.round_trip_job, x, dim, layout)
    for rank, (back, length, grad, positions) in enumerate(got):
        assert torch.equal(back, x)
        mine = _rank_chunks(T, pool.world, layout)[rank]
        assert length == sum(b - a for a, b in mine)
        assert positions.tolist() == [p for a, b in mine for p in range(a, b)]
        if ids:
            continue
        # unshard's backward sums the ranks' gradients (all ones): R at this rank's tokens
        held = torch.zeros(T, dtype=torch.bool)
        for a, b in mine:
            held[a:b] = True
        want = torch.zeros(T, dtype=torch.float64)
        want[held] = pool.world
        g = grad.movedim(dim, 0)
        assert torch.equal(g, want.view(T, *[1] * (x.dim() - 1)).expand_as(g))


# ---------------------------------------------------------------------------------- validation


def test_arguments_checked_without_a_group():
    x = torch.randn(1, 2, 8, 4)
    with pytest.raises(TypeError, match="group"):
        shard_sequence(x, None)
    with pytest.raises(TypeError, match="group"):
        unshard_sequence(x, "world")
    with pytest.raises(TypeError, match="group"):
        context_parallel_attend(x, x[:, :1], x[:, :1], group=2)
    with pytest.raises(TypeError, match="group"):
        SparseAttention(8, heads=2, dim_head=4, group=object())
    with pytest.raises(ValueError, match="layout"):
        SparseAttention(8, heads=2, dim_head=4, layout="ring")


def test_errors_name_the_argument(pool2):
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    P = cp_jobs.PerRank
    cpa = context_parallel_attend
    layer = dict(dim=8, heads=2, kv_heads=1, dim_head=4, config=SMALL)
    calls = [
        (cpa, (q, k, v), dict(group="GROUP", layout="spiral")),
        (cpa, (q, k, v, torch.rand(1, 2, 4, 3)), dict(group="GROUP")),
        (cpa, (q, k, v), dict(group="GROUP", backend="fast")),
        (shard_sequence, (q, "GROUP"), dict(dim=4)),
        (shard_sequence, (q, "GROUP"), dict(dim=2.0)),
        (unshard_sequence, (q, "GROUP"), dict(total_len=9)),
        (unshard_sequence, (q, "GROUP"), dict(total_len=-1)),
        # found by the ranks together, raised on every rank:
        (cpa, (P(q[:, :, :2], q), P(k[:, :, :2], k), P(v[:, :, :2], v)), dict(group="GROUP")),  # 2 + 3 tokens
        (cpa, (P(q, q.repeat(1, 2, 1, 1)), k, v), dict(group="GROUP")),
        (cpa, (q, k, v), dict(group="GROUP", config=P(SMALL, NSAConfig()))),
        (cpa, (q, k, v), dict(group="GROUP", cu_seqlens=P(torch.tensor([0, 6]), torch.tensor([0, 2, 6])))),
        (unshard_sequence, (P(q, q[:, :, :1]), "GROUP"), {}),
        (unshard_sequence, (P(q, q[:, :1]), "GROUP"), {}),
        (cp_jobs.module_forward, ("GROUP", layer, dict(length_buckets="pow2")), {}),
        (cp_jobs.module_forward, ("GROUP", layer, {}), dict(return_aux=True)),
        (cpa, (q, k, v), dict(group="GROUP", cu_seqlens=torch.tensor([0, 6]), selection_grad=True)),
    ]
    want = [
        ("ValueError", "layout"), ("ValueError", "gates"), ("ValueError", "backend"), ("ValueError", "dim"),
        ("TypeError", "dim"), ("ValueError", "total_len"), ("ValueError", "total_len"),
        ("ValueError", "layout='zigzag'"), ("ValueError", "q's heads differs"), ("ValueError", "config differs"),
        ("ValueError", "cu_seqlens differs"), ("ValueError", "layout='zigzag'"),
        ("ValueError", "x's other dimensions differs"), ("ValueError", "length_buckets"), ("ValueError", "return_aux"),
        ("ValueError", "selection_grad"),
    ]
    for rank, seen in enumerate(pool2.run(cp_jobs.errors_job, calls)):
        for i, (got, (kind, text)) in enumerate(zip(seen, want)):
            assert got is not None and got[0] == kind and text in got[1], (rank, i, got)
