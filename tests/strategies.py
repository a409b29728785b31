"""Strategies and helpers shared by the test files: the public kit ``nsa_flex.testing``, which
every test drawing configs, shapes or inputs from here exercises, plus the suite's compile
helpers."""

from __future__ import annotations

import torch

from nsa_flex import NSAConfig, testing
from nsa_flex.testing import TOLERANCES, configs, rel_err, shapes, tolerance  # noqa: F401


# Three small configs, each unlike the others: a stride below the block or equal to it, a
# selection block of 6 (not a power of two), no initial block, windows of 5 to 12. The offset
# and chunked-prefill tests draw from them.
SMALL_CONFIGS = [
    NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=3, window=8),
    NSAConfig(compress_block=8, compress_stride=8, select_block=16, num_selected=2, num_initial=0, num_local=1,
              window=5),
    NSAConfig(compress_block=4, compress_stride=2, select_block=6, num_selected=4, num_initial=2, num_local=1,
              window=12),
]


def Shape(B: int, Hkv: int, G: int, T: int, Dk: int, Dv: int) -> testing.Shape:
    """The kit's :class:`nsa_flex.testing.Shape`, written as the suite writes shapes: ``G``
    query heads per KV head rather than ``Hq``."""
    return testing.Shape(B, Hkv * G, Hkv, T, Dk, Dv)


def make_qkv(shape: testing.Shape, seed: int, dtype=torch.float64, device="cpu", requires_grad=False):
    """``q, k, v`` of :func:`nsa_flex.testing.make_inputs` (its gates dropped)."""
    q, k, v, _ = testing.make_inputs(shape, seed, dtype=dtype, device=device, requires_grad=requires_grad)
    return q, k, v


def compile_counted(fn, backend: str):
    """``fn`` under ``torch.compile(fullgraph=True)`` with ``backend``, and the counter that holds
    the Dynamo graphs it made."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend(backend)
    return torch.compile(fn, backend=counter, fullgraph=True), counter


def ops_in(counter) -> set[str]:
    """Names of the nsa_flex custom ops called in the counter's Dynamo graphs."""
    return {
        str(node.target).split(".")[1]
        for graph in counter.graphs
        for node in graph.graph.nodes
        if node.op == "call_function" and str(node.target).startswith("nsa_flex.")
    }
