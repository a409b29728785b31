"""On CUDA: a compiled two-layer model with ``length_buckets="pow2"``, trained (forward and
backward, bf16) over lengths from 1024 to 8192, compiles one graph per bucket (plus the first,
static, one under Dynamo's automatic dynamic shapes), within Dynamo's default recompile limit.

Run with ``-s`` to see the counts: each case prints ``RECOMPILES ...`` and ``COMPILE_TIME ...``
lines (docs/compile.md quotes them). A third test checks user mods under the same compiled,
changing lengths.
"""

import time

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from nsa_flex import SparseAttention
from nsa_flex.buckets import bucket_length

from strategies import rel_err

pytestmark = pytest.mark.gpu

# The first length is not a power of two, so that under automatic dynamic shapes its static
# graph and its bucket's symbolic one both appear: the bound's "+ 1".
LENGTHS = (1100, 1024, 1536, 2048, 3000, 2500, 4096, 5000, 8192, 6144, 7000)


class Block(nn.Module):
    def __init__(self, dim=512, heads=8, kv_heads=2):
        super().__init__()
        self.norm1 = nn.RMSNorm(dim)
        self.attn = SparseAttention(dim, heads, kv_heads, dim_head=64, length_buckets="pow2")  # the paper's config
        self.norm2 = nn.RMSNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic", "dynamic"])
def test_length_buckets_bound_the_recompiles_in_training(dynamic, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block()).to("cuda", torch.bfloat16)
    x_of = {T: torch.randn(2, T, 512, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(T)) for T in LENGTHS}

    # Eager references first: eager CUDA FlexAttention runs through its own torch.compile,
    # whose graphs would count too.
    check = (LENGTHS[0], 8192)
    with torch.no_grad():
        expected = {T: model(x_of[T]).float() for T in check}

    compiled = torch.compile(model, fullgraph=True, dynamic=dynamic)
    before = counters["stats"]["unique_graphs"]
    seconds = []
    for T in LENGTHS:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        out = compiled(x_of[T])
        out.float().square().mean().backward()
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        assert out.shape == (2, T, 512)
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), (T, name)
        if T in expected:
            assert rel_err(out.float(), expected[T]) < 2e-2, T
    graphs = counters["stats"]["unique_graphs"] - before
    buckets = sorted({bucket_length(T, "pow2") for T in LENGTHS})
    # One graph per bucket, plus the first (static) graph under automatic dynamic shapes, plus
    # one: Inductor itself may guard a bucket's graph on a narrower range of T (torch 2.11 on
    # the H200: "4097 <= T <= 5119", from a fusion decision, splits the 8192 bucket in two; run
    # with TORCH_LOGS=recompiles to see the guards).
    bound = len(buckets) + 1 + (1 if dynamic is None else 0)
    with capsys.disabled():
        print(
            f"\nRECOMPILES dynamic={dynamic} lengths={','.join(map(str, LENGTHS))} "
            f"buckets={','.join(map(str, buckets))} graphs={graphs} bound={bound}"
        )
        print("COMPILE_TIME " + " ".join(f"T={T}:{s:.1f}s" for T, s in zip(LENGTHS, seconds)))
    assert graphs <= bound


def test_length_buckets_with_a_document_mask_in_training():
    """A mask_mod and a score_mod capturing a per-token tensor of the largest bucket's length,
    under torch.compile with changing lengths: outputs and input gradients equal the eager,
    unpadded layer's (bf16 tolerance)."""
    torch.manual_seed(0)
    layer = SparseAttention(256, 4, 2, dim_head=64, length_buckets=(2048, 4096)).to("cuda", torch.bfloat16)
    plain = SparseAttention(256, 4, 2, dim_head=64).to("cuda", torch.bfloat16)
    plain.load_state_dict(layer.state_dict())
    doc = torch.zeros(4096, dtype=torch.int32, device="cuda")

    def same_document(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    def bias(score, b, h, q_idx, kv_idx):
        return score + 0.1 * doc[kv_idx]

    compiled = torch.compile(lambda x: layer(x, score_mod=bias, mask_mod=same_document), fullgraph=True)
    for T in (1100, 1500, 3000):
        doc.zero_()
        doc[T // 3 : T] = 1  # two documents, then the padding
        x = torch.randn(1, T, 256, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(T))
        results = []
        for fn in (compiled, lambda x: plain(x, score_mod=bias, mask_mod=same_document)):
            xi = x.clone().requires_grad_()
            out = fn(xi)
            out.float().square().mean().backward()
            results.append((out.float(), xi.grad.float()))
        (out, grad), (ref, ref_grad) = results
        assert rel_err(out, ref) < 2e-2, T
        assert rel_err(grad, ref_grad) < 5e-2, T
