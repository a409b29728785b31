"""The bench's measuring tools: rows of results, the problem, timing and peak memory, inputs."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import NSAConfig
from ..flex import call as flex_call
from ..triton_support import available


@dataclass
class Row:
    part: str
    name: str
    T: int
    fwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    peak_mib: float | None = None
    rel_err_vs_flex: float | None = None  # output against the flex backend's on the same inputs
    note: str = ""


@dataclass
class Problem:
    B: int
    Hq: int
    Hkv: int
    D: int
    dtype: torch.dtype
    device: torch.device
    config: NSAConfig = field(default_factory=NSAConfig)


def _time(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median milliseconds of ``fn``."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()  # warm up (compiles, caches)
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _peak_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _measure(part, name, T, fwd, inputs, device, reps, note="", check=None) -> Row:
    """Time ``fwd()`` and ``fwd()`` plus a backward into ``inputs``.

    ``check``: ``(reference output, map of this output to its layout)``; the relative error is
    recorded before any timing. A contender that raises is recorded as failed, not fatal.
    """

    def fwd_bwd():
        out = fwd()
        grads = torch.autograd.grad(out.float().sum(), inputs)
        return grads

    row = Row(part, name, T, note=note)
    try:
        with torch.no_grad():
            if check is not None:
                ref, to_ref = check
                out = to_ref(fwd()).float()
                row.rel_err_vs_flex = float((out - ref.float()).norm() / ref.float().norm())
            row.fwd_ms = _time(fwd, device, reps)
        if device.type == "cuda":  # FlexAttention has no CPU backward through its compiled path
            row.fwd_bwd_ms = _time(fwd_bwd, device, reps)
            row.peak_mib = _peak_mib(fwd_bwd, device)
    except (RuntimeError, AssertionError, ValueError, TypeError) as e:
        row.note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return row


def _full_flex(device: torch.device) -> Callable:
    """FlexAttention as a contender: compiled on CUDA; eager on the CPU, where PyTorch's advice
    to compile it is no news (the bench knows, and says so in its header)."""
    from torch.nn.attention.flex_attention import flex_attention

    if device.type == "cuda":
        return torch.compile(flex_attention, dynamic=False)

    def eager(*args, **kwargs):
        with flex_call.eager_flex_quietly():
            return flex_attention(*args, **kwargs)

    return eager


def _triton_timeable(device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":  # Triton's CPU interpreter is for tests; timing it means nothing
        return False, "needs CUDA"
    return available(device)


def _fla():
    try:
        from fla.ops.nsa import parallel_nsa
    except Exception:  # not installed, or installed without a usable GPU
        return None
    return parallel_nsa


def _inputs(p: Problem, T: int, seed: int = 0):
    g = torch.Generator(device=p.device).manual_seed(seed)

    grad = p.device.type == "cuda"  # backward is timed on CUDA only

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=p.device).to(p.dtype).requires_grad_(grad)

    q, k, v = rnd(p.B, p.Hq, T, p.D), rnd(p.B, p.Hkv, T, p.D), rnd(p.B, p.Hkv, T, p.D)
    gates = torch.rand(p.B, p.Hq, T, 3, generator=g, device=p.device).to(p.dtype).requires_grad_(grad)
    return q, k, v, gates


def _cuda_graph(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` captured in a CUDA graph (after a warm-up on a side stream); returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _doc_lengths(T: int, seed: int = 0) -> list[int]:
    """A fixed-seed mix of document lengths in ``[T/64, T/4]`` summing to ``T`` (the last one cut)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = max(1, T // 64), max(1, T // 4)
    lengths = []
    while sum(lengths) < T:
        n = int(torch.randint(lo, hi + 1, (1,), generator=g))
        lengths.append(min(n, T - sum(lengths)))
    return lengths


def _doc_lengths(T: int, seed: int = 0) -> list[int]:
    """A fixed-seed mix of document lengths in ``[T/64, T/4]`` summing to ``T`` (the last one cut)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = max(1, T // 64), max(1, T // 4)
    lengths = []
    while sum(lengths) < T:
        n = int(torch.randint(lo, hi + 1, (1,), generator=g))
        lengths.append(min(n, T - sum(lengths)))
    return lengths
