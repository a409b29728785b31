"""A few fixed shapes through torch.compile(fullgraph=True) on the CPU (inference only there).

Compiled FlexAttention reads the BlockMask's block lists, which eager FlexAttention ignores,
so these are the CPU tests in which a wrong tile list would show. Each shape compiles once
(~10-25 s).
"""

import pytest
import torch
from torch._dynamo.utils import counters

from nsa_flex import NSAConfig, SparseAttention, attend
from nsa_flex.buckets import bucket_length

from strategies import Shape, make_qkv, rel_err

pytestmark = pytest.mark.compiled


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # Each case compiles from scratch: Inductor (torch 2.13, CPU) has asserted
    # ("FakeTensorUpdater cannot update this argument") when a second FlexAttention graph
    # followed another in one process.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()

CASES = [
    # the example: B=4, T=507, Hq=4, Hkv=2, select_block=32, num_selected=6, Dk=64
    (Shape(4, 2, 2, 507, 64, 64), NSAConfig(select_block=32, num_selected=6), False),
    # G=3, Dk != Dv, a length that is no multiple of any block, small tiles of every kind, mods
    (Shape(2, 1, 3, 333, 32, 48), NSAConfig(compress_block=16, compress_stride=8, select_block=48, num_selected=4, window=100), True),
    # no mods, so full tiles are used: a window shorter than T, selection blocks of a whole
    # 128-wide tile, and G=5 so that tiles of folded rows cut tokens
    (Shape(1, 1, 5, 700, 32, 32), NSAConfig(select_block=128, num_selected=3, window=200), False),
]


@pytest.mark.parametrize("shape, config, mods", CASES)
def test_compiled_flex_matches_reference(shape, config, mods):
    q, k, v = make_qkv(shape, seed=shape.T, dtype=torch.float32)
    gates = torch.rand(shape.B, shape.Hq, shape.T, 3, generator=torch.Generator().manual_seed(1))
    kw = dict(config=config)
    if mods:
        doc = (torch.arange(shape.T) >= 200).to(torch.int32)
        kw["score_mod"] = lambda s, b, h, qi, kv: 3.0 * torch.tanh(s / 3.0) - 0.01 * h * (qi - kv)
        kw["mask_mod"] = lambda b, h, qi, kv: doc[qi] == doc[kv]
    fn = torch.compile(lambda q, k, v, g: attend(q, k, v, g, return_aux=True, **kw), fullgraph=True)
    with torch.no_grad():
        out, aux = fn(q, k, v, gates)
        ref, ref_aux = attend(
            q.double(), k.double(), v.double(), gates.double(), return_aux=True,
            block_indices=aux.block_indices, backend="reference", **kw,
        )
    for name, a, b in zip(("out", "o_cmp", "o_slc", "o_swa"), (out, *aux[1:]), (ref, *ref_aux[1:])):
        assert rel_err(a, b) < 1e-5, name
    # the compiled selection is the eager one
    eager_idx = attend(q, k, v, gates, return_aux=True, **kw)[1].block_indices
    assert torch.equal(aux.block_indices, eager_idx)


# ------------------------------------------------------------------------- length buckets


class _Block(torch.nn.Module):
    """A residual block around a bucketed SparseAttention: the parts outside the attention see
    the symbolic length too."""

    def __init__(self, buckets):
        super().__init__()
        config = NSAConfig(compress_block=16, compress_stride=8, select_block=32, num_selected=4, num_local=1, window=64)
        self.norm = torch.nn.LayerNorm(32)
        self.attn = SparseAttention(32, heads=4, kv_heads=2, dim_head=16, config=config, length_buckets=buckets)
        self.out = torch.nn.Linear(32, 32)

    def forward(self, x):
        return self.out(x + self.attn(self.norm(x)))


@pytest.mark.parametrize(
    "dynamic, lengths",
    [
        # Dynamo's default: the first length compiles static, the next ones symbolic per bucket
        (None, (100, 120, 128, 200, 129, 256, 300, 512)),
        (True, (100, 128, 129, 256)),
    ],
)
def test_length_buckets_bound_the_recompiles(dynamic, lengths):
    """Lengths 100..512 over buckets 128/256/512 compile at most one graph per bucket (plus the
    first, static, one under automatic dynamic shapes); each graph's output is the eager one."""
    buckets = (128, 256, 512)
    torch.manual_seed(0)
    model = _Block(buckets)
    compiled = torch.compile(model, fullgraph=True, dynamic=dynamic)
    xs = [torch.randn(2, T, 32, generator=torch.Generator().manual_seed(T)) for T in lengths]
    with torch.no_grad():
        # eager first: on the CPU eager FlexAttention runs through Dynamo too, and would count
        expected = [model(x) for x in xs]
        before = counters["stats"]["unique_graphs"]
        outs = [compiled(x) for x in xs]
        graphs = counters["stats"]["unique_graphs"] - before
    for T, out, ref in zip(lengths, outs, expected):
        assert rel_err(out, ref) < 1e-5, T
    touched = len({bucket_length(T, buckets) for T in lengths})
    print(f"RECOMPILES dynamic={dynamic} lengths={','.join(map(str, lengths))} buckets={touched} graphs={graphs}")
    assert graphs <= touched + (1 if dynamic is None else 0)


def test_dynamic_true_without_buckets():
    """``dynamic=True`` leaves every size of ``x`` symbolic; SparseAttention makes them static
    at its entry (a symbolic batch size failed in Inductor's CPU FlexAttention lowering,
    "'Min' object has no attribute 'get_name'", torch 2.13)."""
    torch.manual_seed(0)
    model = _Block(None)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    x = torch.randn(2, 100, 32)
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < 1e-5
