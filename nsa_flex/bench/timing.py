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
    shape: str = ""  # a name of SHAPES
    mix: str = ""  # the varlen part's document mix, a name of DOC_MIXES
    stand_ins: str = ""  # what the contender runs in place of its own code, or leaves out


@dataclass
class Problem:
    B: int
    Hq: int
    Hkv: int
    D: int
    dtype: torch.dtype
    device: torch.device
    config: NSAConfig = field(default_factory=NSAConfig)
    name: str = "reference"  # a name of SHAPES


# The shapes ``--shapes`` takes: (B, Hq, Hkv, D), bf16 on CUDA. "reference" is docs/semantics.md's;
# "gqa4-*" have Llama-3 8B's heads (G = 4); "tiny" is --quick's default.
SHAPES = {
    "reference": (1, 64, 4, 128),
    "gqa4-d128": (1, 32, 8, 128),
    "gqa4-d64": (1, 32, 8, 64),
    "small": (4, 6, 2, 64),
    "tiny": (1, 4, 2, 32),
}


def shape_label(name: str) -> str:
    """``"reference B=1 Hq=64 Hkv=4 D=128"``."""
    B, Hq, Hkv, D = SHAPES[name]
    return f"{name} B={B} Hq={Hq} Hkv={Hkv} D={D}"


def failure(e: BaseException, width: int = 120) -> str:
    """``"RuntimeError: its first line"``, cut to ``width``; an exception may have no message
    (a bare ``assert`` in a peer's code)."""
    line = (str(e).splitlines() or [""])[0][:width]
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


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


def _measure(part, name, T, fwd, inputs, device, reps, note="", check=None, stand_ins="") -> Row:
    """Time ``fwd()`` and ``fwd()`` plus a backward into ``inputs``.

    ``check``: ``(reference output, map of this output to its layout)``; the relative error is
    recorded before any timing. A contender that raises is recorded as failed, not fatal.
    """

    def fwd_bwd():
        out = fwd()
        grads = torch.autograd.grad(out.float().sum(), inputs)
        return grads

    row = Row(part, name, T, note=note, stand_ins=stand_ins)
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
        row.note = f"failed: {failure(e)}"
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


# The document mixes of the varlen part: each document's length lies in ``[lo, hi]`` tokens.
DOC_MIXES = {"short": (1024, 4096), "mix": (4096, 15360), "long": (16384, 32768)}


def doc_lengths(T: int, lo: int, hi: int, seed: int = 0) -> list[int]:
    """Document lengths drawn with a fixed seed, each in ``[lo, hi]``, summing to ``T``.

    Each length is uniform in ``[lo, hi]``, narrowed so that what remains is either none or at
    least ``lo``, and the last document takes the rest once it is at most ``hi``. That needs
    ``hi >= 2 * lo - 1`` (true of :data:`DOC_MIXES`, at any scale).

    Raises:
        ValueError: if ``T < lo`` (no document fits), or ``lo``/``hi`` admit no split.
    """
    if not 1 <= lo <= hi or hi < 2 * lo - 1:
        raise ValueError(f"document lengths [{lo}, {hi}] need 1 <= lo and 2 * lo - 1 <= hi")
    if T < lo:
        raise ValueError(f"T = {T} is shorter than the shortest document ({lo} tokens)")
    g = torch.Generator().manual_seed(seed)
    lengths, left = [], T
    while left > hi:
        n = int(torch.randint(lo, min(hi, left - lo) + 1, (1,), generator=g))
        lengths.append(n)
        left -= n
    return lengths + [left]
