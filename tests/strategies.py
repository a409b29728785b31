"""Hypothesis strategies shared by the test files: valid configs and problem shapes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from nsa_flex import NSAConfig


@st.composite
def configs(draw, max_block: int = 96) -> NSAConfig:
    d = draw(st.sampled_from([1, 2, 4, 8, 16]))
    l = d * draw(st.integers(1, max(1, min(4, max_block // d))))
    ls = d * draw(st.integers(1, max(1, min(6, max_block // d))))
    n = draw(st.integers(1, 8))
    num_initial = draw(st.integers(0, min(2, n)))
    num_local = draw(st.integers(0, min(3, n - num_initial)))
    window = draw(st.integers(1, 80))
    return NSAConfig(
        compress_block=l,
        compress_stride=d,
        select_block=ls,
        num_selected=n,
        num_initial=num_initial,
        num_local=num_local,
        window=window,
    )


@dataclass(frozen=True)
class Shape:
    B: int
    Hkv: int
    G: int
    T: int
    Dk: int
    Dv: int

    @property
    def Hq(self) -> int:
        return self.Hkv * self.G


@st.composite
def shapes(draw, max_t: int = 600, max_work: int = 2_000_000) -> Shape:
    """Shapes with T from 1 to ``max_t`` (block multiples and their neighbours favoured), any
    G from 1 to 8, Dk != Dv allowed; the dense ``B * Hq * T * T`` work stays under ``max_work``."""
    T = draw(
        st.one_of(
            st.integers(1, max_t),
            st.sampled_from([1, 2, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257]).filter(lambda t: t <= max_t),
        )
    )
    G = draw(st.sampled_from([1, 2, 3, 4, 6, 8]))
    Hkv = draw(st.integers(1, 3))
    B = draw(st.integers(1, 3))
    while B * Hkv * G * T * T > max_work and (B > 1 or Hkv > 1):
        B, Hkv = (B - 1, Hkv) if B > 1 else (B, Hkv - 1)
    Dk = draw(st.sampled_from([16, 24, 32, 64, 128]))
    Dv = draw(st.sampled_from([16, 32, 48, 64]))
    return Shape(B, Hkv, G, T, Dk, Dv)


def make_qkv(shape: Shape, seed: int, dtype=torch.float64, device="cpu", requires_grad=False):
    g = torch.Generator().manual_seed(seed)

    def rnd(*s):
        x = torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
        return x.requires_grad_(requires_grad)

    q = rnd(shape.B, shape.Hq, shape.T, shape.Dk)
    k = rnd(shape.B, shape.Hkv, shape.T, shape.Dk)
    v = rnd(shape.B, shape.Hkv, shape.T, shape.Dv)
    return q, k, v


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (0 when both are 0); ``ref`` may be on another
    device (the CPU reference of a GPU result)."""
    out, ref = out.detach().double(), ref.detach().double().to(out.device)
    den = ref.norm()
    num = (out - ref).norm()
    if den == 0:
        return float(num)
    return float(num / den)


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
