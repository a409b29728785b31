"""``python -m nsa_flex.bench``: time nsa_flex against full attention and the peer NSA kernel.

Every contender runs in this one process on the same inputs, at the reference shape of
docs/semantics.md (``B=1, Hq=64, Hkv=4, Dk=Dv=128``, bf16, default config) and ``T`` in 8k..64k:

- ``selected``: the selected branch alone on one set of ``block_indices``: the flex backend, the
  triton backend, and flash-linear-attention's ``parallel_nsa`` selection kernel when ``fla`` is
  importable (``pip install fla-core``; it takes ``-1``-padded indices with per-query counts).
- ``layer``: the whole layer (compression, scoring, top-n, three branches, gates): both
  backends, and ``parallel_nsa`` with its own compression and top-n (no window branch: fla's
  needs flash-attn).
- ``full``: full causal attention through SDPA's cuDNN and flash backends and FlexAttention.
- ``decode`` (not run unless asked, ``--parts decode``): the latency of one decode step
  (:func:`nsa_flex.decode_step`, one new token per row) with ``T`` tokens already cached, for
  B=1 and B=8, eagerly and replayed from a CUDA graph: the PyTorch step (``nsa B=.. [graph]``,
  ``fused=False``) and the split Triton kernels (``nsa fused B=.. [graph]``, ``fused=True``,
  with its relative error against the PyTorch step), against full-attention decoding (``sdpa
  B=.. [graph]``: SDPA of one query over the whole cache); ``full/this`` is SDPA's time over
  the step's. Each timed NSA step includes the one subtraction that rewinds the rows.
- ``varlen`` (not run by default; ``--parts varlen``): ``T`` tokens packed from documents of
  mixed lengths (a fixed-seed mix of ``T/64 .. T/4`` tokens, 1k..16k at 64k): the whole layer
  with ``cu_seqlens`` on both backends, fla's varlen ``parallel_nsa`` (its own compression and
  top-n, with ``cu_seqlens``), and full causal attention within documents: FlexAttention with a
  document mask, and SDPA called once per document (SDPA has no document mask that keeps
  its fast kernels).

Times are ``triton.testing.do_bench`` medians on CUDA (forward, and forward+backward), peak
memory is measured around one forward+backward. ``--quick`` runs tiny sizes, and on the CPU skips
what needs CUDA and says so. Results: a line on stderr per contender as each part finishes, the
table on stdout at the end, ``results.json`` (rewritten after every part) and ``times.png`` (with
matplotlib: a panel for each time measured, forward and forward+backward) under ``--out``. ``--merge A/results.json B/results.json ...`` joins the rows of
separate runs (one length each, on separate GPUs, say) into one table and plot.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import math
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import attend, flex_backend, select_blocks, triton_backend
from .compression import mean_compress
from .config import NSAConfig


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
        with flex_backend._eager_flex_quietly():
            return flex_attention(*args, **kwargs)

    return eager


def _triton_timeable(device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":  # Triton's CPU interpreter is for tests; timing it means nothing
        return False, "needs CUDA"
    return triton_backend.available(device)


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


def bench_selected(p: Problem, T: int, reps: int) -> list[Row]:
    q, k, v, _ = _inputs(p, T)
    config, scale = p.config, p.D**-0.5
    idx = select_blocks(q.detach(), mean_compress(k.detach(), config), config=config)
    flex = lambda: flex_backend.selected_branch(q, k, v, idx, config, scale)
    with torch.no_grad():
        ref = flex()
    same = (ref, lambda o: o)
    rows = [_measure("selected", "nsa_flex flex", T, flex, (q, k, v), p.device, reps)]
    ok, why = _triton_timeable(p.device)
    if ok:
        rows.append(_measure("selected", "nsa_flex triton", T,
                             lambda: triton_backend.selected_branch(q, k, v, idx, config, scale), (q, k, v), p.device, reps,
                             check=same))
    else:
        rows.append(Row("selected", "nsa_flex triton", T, note=f"skipped: {why}"))
    fla = _fla()
    if fla is None or p.device.type != "cuda":
        rows.append(Row("selected", "fla parallel_nsa", T, note="skipped: needs fla-core and CUDA"))
    else:
        # fla's layout is (B, T, H, D); padding counts as -1 there too, told apart by counts
        qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        idx_t = idx.transpose(1, 2).long().contiguous()
        counts = (idx_t >= 0).sum(-1)
        rows.append(_measure(
            "selected", "fla parallel_nsa", T,
            lambda: fla(qt, kt, vt, block_indices=idx_t, block_counts=counts, block_size=config.select_block, scale=scale),
            (qt, kt, vt), p.device, reps, check=(ref, lambda o: o.transpose(1, 2)),
        ))
    return rows


def bench_layer(p: Problem, T: int, reps: int) -> list[Row]:
    q, k, v, gates = _inputs(p, T)
    config = p.config
    rows = []
    with torch.no_grad():
        ref = attend(q, k, v, gates, config=config)
    for backend in ("flex", "triton"):
        ok, why = (True, "") if backend == "flex" else _triton_timeable(p.device)
        if not ok:
            rows.append(Row("layer", f"nsa_flex {backend}", T, note=f"skipped: {why}"))
            continue
        rows.append(_measure("layer", f"nsa_flex {backend}", T,
                             lambda b=backend: attend(q, k, v, gates, config=config, backend=b),
                             (q, k, v, gates), p.device, reps,
                             check=None if backend == "flex" else (ref, lambda o: o)))
    fla = _fla()
    if fla is None or p.device.type != "cuda":
        rows.append(Row("layer", "fla parallel_nsa", T, note="skipped: needs fla-core and CUDA"))
    else:
        qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        g = gates.detach().transpose(1, 2).contiguous()
        rows.append(_measure(
            "layer", "fla parallel_nsa", T,
            lambda: fla(qt, kt, vt, g_cmp=g[..., 0], g_slc=g[..., 1], block_counts=config.num_selected,
                        block_size=config.select_block),
            (qt, kt, vt), p.device, reps,
            note="compression (l=d=64) + top-n + selection; no window branch (needs flash-attn)",
        ))
    return rows


def bench_full(p: Problem, T: int, reps: int) -> list[Row]:
    q, k, v, _ = _inputs(p, T)
    rows = []
    if p.device.type != "cuda":
        for name in ("SDPA cuDNN", "SDPA flash"):
            rows.append(Row("full", name, T, note="skipped: needs CUDA"))
    else:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for name, kind in (("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION), ("SDPA flash", SDPBackend.FLASH_ATTENTION)):

            def sdpa(kind=kind):
                with sdpa_kernel(kind):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

            try:
                rows.append(_measure("full", name, T, sdpa, (q, k, v), p.device, reps))
            except RuntimeError as e:  # a backend that refuses this shape or GQA
                rows.append(Row("full", name, T, note=f"failed: {str(e).splitlines()[0][:100]}"))
    from torch.nn.attention.flex_attention import create_block_mask

    mask = create_block_mask(lambda b, h, qi, kv: kv <= qi, None, None, T, T, device=p.device)
    fn = _full_flex(p.device)
    rows.append(_measure("full", "FlexAttention", T,
                         lambda: fn(q, k, v, block_mask=mask, enable_gqa=True), (q, k, v), p.device, reps))
    return rows


def _decode_rows(p: Problem, T: int, reps: int, batches=(1, 8)) -> list[Row]:
    """One decode step with ``T`` tokens cached: NSA (eager and CUDA graph) against SDPA over
    the whole cache. The cache is filled with random K/V (a step's cost does not depend on
    what it holds); each timed step decodes position ``T`` and rewinds, so it can repeat."""
    from .cache import NSACache, decode_step

    rows = []
    for B in batches:
        g = torch.Generator(device=p.device).manual_seed(T)

        def rnd(*shape):
            return torch.randn(*shape, generator=g, device=p.device).to(p.dtype)

        try:
            cache = NSACache(B, p.Hkv, T + 1, p.D, config=p.config, device=p.device, dtype=p.dtype)
            cache.k[:, :, :T] = rnd(B, p.Hkv, T, p.D)
            cache.v[:, :, :T] = rnd(B, p.Hkv, T, p.D)
            tc = p.config.num_compressed(T)
            cache.k_cmp[:, :, :tc] = mean_compress(cache.k[:, :, :T], p.config)
            cache.v_cmp[:, :, :tc] = mean_compress(cache.v[:, :, :T], p.config)
            cache.lengths.fill_(T)
            q, k1, v1 = rnd(B, p.Hq, 1, p.D), rnd(B, p.Hkv, 1, p.D), rnd(B, p.Hkv, 1, p.D)
            gates = torch.rand(B, p.Hq, 1, 3, generator=g, device=p.device).to(p.dtype)
            k_full, v_full = rnd(B, p.Hkv, T + 1, p.D), rnd(B, p.Hkv, T + 1, p.D)
        except (RuntimeError, ValueError) as e:  # out of memory, most likely
            rows.append(Row("decode", f"B={B}", T, note=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}"))
            continue

        def nsa():
            out = decode_step(cache, q, k1, v1, gates, fused=False)
            cache.lengths.sub_(1)  # rewind: one small kernel (rewind_ would add a clamp)
            cache._bound = T
            return out

        def nsa_fused():
            out = decode_step(cache, q, k1, v1, gates, fused=True)
            cache.lengths.sub_(1)
            cache._bound = T
            return out

        def sdpa():
            return F.scaled_dot_product_attention(q, k_full, v_full, enable_gqa=True)

        times = {}
        contenders = [("nsa", nsa), ("sdpa", sdpa)]
        fused_err = None
        if _triton_timeable(p.device)[0]:
            contenders.insert(1, ("nsa fused", nsa_fused))
            with torch.no_grad():  # the same step both ways, checked before any timing
                want, got = nsa().float(), nsa_fused().float()
            fused_err = float((got - want).norm() / want.norm())
        for name, fn in contenders:
            for graphed in (False, True):
                label = f"{name} B={B}" + (" graph" if graphed else "")
                row = Row("decode", label, T)
                if graphed and p.device.type != "cuda":
                    row.note = "skipped: CUDA graphs need CUDA"
                    rows.append(row)
                    continue
                try:
                    with torch.no_grad():
                        run = _cuda_graph(fn) if graphed else fn
                        row.fwd_ms = _time(run, p.device, reps)
                    times[(name, graphed)] = row.fwd_ms
                except (RuntimeError, AssertionError, ValueError, TypeError) as e:
                    row.note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                rows.append(row)
        for row in rows[-2 * len(contenders):]:
            graphed = row.name.endswith("graph")
            full = times.get(("sdpa", graphed))
            if row.name.startswith("nsa") and row.fwd_ms and full:
                row.note = f"full/this: {full / row.fwd_ms:.2f}x"
            if row.name.startswith("nsa fused") and fused_err is not None:
                row.note = f"{row.note}  rel err vs the PyTorch step {fused_err:.1e}".strip()
        del cache, k_full, v_full
    return rows


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


def bench_varlen(p: Problem, T: int, reps: int) -> list[Row]:
    from torch.nn.attention.flex_attention import and_masks, create_block_mask

    from . import masks, varlen

    q, k, v, gates = _inputs(p, T)
    config = p.config
    lengths = _doc_lengths(T)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=p.device)
    docs = varlen.documents(cu)  # the one host read of cu_seqlens, outside the timings
    note = f"{len(lengths)} docs, {min(lengths)}..{max(lengths)} tokens"
    rows = []
    with torch.no_grad():
        ref = attend(q, k, v, gates, config=config, cu_seqlens=docs)
    for backend in ("flex", "triton"):
        ok, why = (True, "") if backend == "flex" else _triton_timeable(p.device)
        if not ok:
            rows.append(Row("varlen", f"nsa_flex {backend}", T, note=f"skipped: {why}"))
            continue
        rows.append(_measure("varlen", f"nsa_flex {backend}", T,
                             lambda b=backend: attend(q, k, v, gates, config=config, backend=b, cu_seqlens=docs),
                             (q, k, v, gates), p.device, reps, note=note,
                             check=None if backend == "flex" else (ref, lambda o: o)))
    fla = _fla()
    if fla is None or p.device.type != "cuda":
        rows.append(Row("varlen", "fla parallel_nsa", T, note="skipped: needs fla-core and CUDA"))
    else:
        qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        g = gates.detach().transpose(1, 2).contiguous()
        try:
            rows.append(_measure(
                "varlen", "fla parallel_nsa", T,
                lambda: fla(qt, kt, vt, g_cmp=g[..., 0], g_slc=g[..., 1], block_counts=config.num_selected,
                            block_size=config.select_block, cu_seqlens=cu.long()),
                (qt, kt, vt), p.device, reps,
                note=f"{note}; compression (l=d=64) + top-n + selection; no window branch",
            ))
        except Exception as e:  # an fla version whose varlen path refuses this setup
            rows.append(Row("varlen", "fla parallel_nsa", T, note=f"failed: {type(e).__name__}: {str(e)[:100]}"))
    doc_causal = and_masks(masks.causal_mask, masks.document_mask(docs.doc_id))
    mask = create_block_mask(doc_causal, None, None, T, T, device=p.device)
    fn = _full_flex(p.device)
    rows.append(_measure("varlen", "FlexAttention doc", T,
                         lambda: fn(q, k, v, block_mask=mask, enable_gqa=True), (q, k, v), p.device, reps,
                         note=f"full causal attention within documents; {note}"))

    bounds = [(s, s + n) for s, n in zip(docs.starts, docs.lengths) if n]  # on the host

    def sdpa_per_document():
        outs = [F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True, enable_gqa=True)
                for s, e in bounds]
        return torch.cat(outs, dim=2)

    rows.append(_measure("varlen", "SDPA per document", T, sdpa_per_document, (q, k, v), p.device, reps,
                         note=f"one SDPA call per document (default backend); {note}"))
    return rows


PARTS = {
    "selected": bench_selected,
    "layer": bench_layer,
    "full": bench_full,
    "decode": _decode_rows,
    "varlen": bench_varlen,
}


def _progress(r: Row) -> str:
    """One line about a finished contender, e.g. ``T=64 layer / nsa_flex flex: fwd 3.10 ms``."""
    said = [f"{label} {value:.2f} ms" for label, value in (("fwd", r.fwd_ms), ("fwd+bwd", r.fwd_bwd_ms))
            if value is not None]
    if r.peak_mib is not None:
        said.append(f"peak {r.peak_mib:.0f} MiB")
    if r.note:
        said.append(r.note)
    return f"T={r.T} {r.part} / {r.name}: {', '.join(said) or 'no result'}"


def _table(rows: list[Row]) -> str:
    lines = [f"{'part':9} {'contender':18} {'T':>6} {'fwd ms':>9} {'fwd+bwd ms':>11} {'peak MiB':>9}  ratios / note"]
    base = {}  # (T) -> SDPA cuDNN row, the bar every ratio is taken against
    for r in rows:
        if r.part == "full" and r.name == "SDPA cuDNN" and r.fwd_ms:
            base[r.T] = r
    for r in rows:
        fmt = lambda x, w: f"{x:>{w}.2f}" if x is not None else f"{'-':>{w}}"
        note = r.note
        b = base.get(r.T)
        if b and r.fwd_ms and r is not b and r.part != "decode":  # decode rows hold their own ratio
            ratio = f"cuDNN/this: fwd {b.fwd_ms / r.fwd_ms:.2f}x"
            if b.fwd_bwd_ms and r.fwd_bwd_ms:
                ratio += f", fwd+bwd {b.fwd_bwd_ms / r.fwd_bwd_ms:.2f}x"
            note = f"{ratio}  {note}".strip()
        if r.rel_err_vs_flex is not None:
            note = f"{note}  rel err vs flex {r.rel_err_vs_flex:.1e}".strip()
        lines.append(f"{r.part:9} {r.name:18} {r.T:>6} {fmt(r.fwd_ms, 9)} {fmt(r.fwd_bwd_ms, 11)} {fmt(r.peak_mib, 9)}  {note}")
    return "\n".join(lines)


# The plot's panels: a row's field and the panel's title. A panel is drawn only when some row
# has that time (on the CPU the bench times no backward).
PANELS = (("fwd_ms", "forward"), ("fwd_bwd_ms", "forward + backward"))


def _figure(rows: list[Row]):
    """The times plot as a matplotlib figure, one panel per measured time in :data:`PANELS`
    (a line per contender, ms against ``T``, both on log scales); ``None`` when no row holds a
    time. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(key, title) for key, title in PANELS if any(getattr(r, key) for r in rows)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + 0.5, 4.5), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for part, name in dict.fromkeys((r.part, r.name) for r in rows):
            pts = [(r.T, getattr(r, key)) for r in rows if (r.part, r.name) == (part, name) and getattr(r, key)]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{part}: {name}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("ms (median)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    # every contender of any panel, once (the forward panel may lack one the other has)
    labelled = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labelled.setdefault(label, handle)
    fig.legend(list(labelled.values()), list(labelled), loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return fig


def _plot(rows: list[Row], path: Path) -> str:
    """Write :func:`_figure` to ``path``; returns the line to print about it."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    fig = _figure(rows)
    if fig is None:
        return "nothing was timed: no plot"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"


def _merge(paths: list[Path], out: Path) -> int:
    """The rows of several runs' ``results.json`` as one table and plot (each row keeps the
    ratios of its own run: they are taken per length against that run's cuDNN row)."""
    rows, metas = [], []
    for path in paths:
        data = json.loads(Path(path).read_text())
        metas.append(dict(data["meta"], source=str(path)))
        rows += [Row(**r) for r in data["rows"]]
    seen = set()
    for r in rows:
        if (r.part, r.name, r.T) in seen:
            raise ValueError(f"--merge: {r.part} / {r.name} at T={r.T} is in more than one file; "
                             "each length's ratios need its own run's rows alone")
        seen.add((r.part, r.name, r.T))
    rows.sort(key=lambda r: r.T)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(dict(meta=dict(merged=metas), rows=[asdict(r) for r in rows]), indent=1))
    print(_table(rows))
    print(f"results: {out / 'results.json'}")
    print(_plot(rows, out / "times.png"))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nsa_flex.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (runs on the CPU)")
    ap.add_argument("--out", type=Path, default=Path("bench_out"), help="folder for results.json and times.png")
    ap.add_argument("--seq-lens", type=int, nargs="+", help="sequence lengths (default 8k..64k, or tiny with --quick)")
    ap.add_argument("--parts", nargs="+", choices=sorted(PARTS), default=["selected", "layer", "full"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions on the CPU (CUDA uses do_bench)")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                    help="measure nothing: join the rows of these results.json files (runs of other lengths, "
                         "say) into one table, results.json and plot under --out")
    args = ap.parse_args(argv)
    if args.merge:
        return _merge(args.merge, args.out)

    device = torch.device(args.device)
    # `kill -USR1` (or `timeout -s USR1`) prints where a long run is, and it carries on
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    if args.quick:
        p = Problem(1, 4, 2, 32, torch.float32 if device.type == "cpu" else torch.bfloat16, device,
                    NSAConfig(select_block=32, num_selected=4, window=64))
        lens = args.seq_lens or [64, 128]
    else:
        p = Problem(1, 64, 4, 128, torch.bfloat16, device)
        lens = args.seq_lens or [8192, 16384, 32768, 65536]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # bf16 run; nothing here is float32 math
    print(f"nsa_flex.bench: device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, B={p.B} Hq={p.Hq} Hkv={p.Hkv} D={p.D} {p.dtype}, {p.config}")
    if device.type != "cuda":
        print("no CUDA: SDPA cuDNN/flash, fla and all backward timings are skipped")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(device=str(device), torch=torch.__version__, dtype=str(p.dtype), B=p.B, Hq=p.Hq, Hkv=p.Hkv,
                D=p.D, config=asdict(p.config), argv=sys.argv[1:])
    if device.type == "cuda":
        import triton

        meta.update(gpu=torch.cuda.get_device_name(device), triton=triton.__version__)
    rows: list[Row] = []
    for T in lens:
        for part in args.parts:
            # Every contender, length and grad mode is its own graph of the bench's own
            # torch.compile(flex_attention) calls too; past Dynamo's limit (8 per function) they
            # would run FlexAttention unfused, materialising the scores (over 100 GiB at 16k):
            # the limits the flex backend raises for its eager calls cover them.
            with flex_backend._room_to_recompile():
                new_rows = PARTS[part](p, T, args.reps)
            rows += new_rows
            if device.type == "cuda":
                torch.cuda.empty_cache()
            for r in new_rows:  # progress, on stderr: stdout has the table once, at the end
                print(_progress(r), file=sys.stderr, flush=True)
            # after every part, so that a run stopped at a time limit keeps what it measured
            (args.out / "results.json").write_text(json.dumps(dict(meta=meta, rows=[asdict(r) for r in rows]), indent=1))
    print(_table(rows))
    print(f"results: {args.out / 'results.json'}")
    print(_plot(rows, args.out / "times.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
