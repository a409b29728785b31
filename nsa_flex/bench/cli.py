"""``python -m nsa_flex.bench``'s command line: the runs, the table, the plot, ``--merge``."""

from __future__ import annotations

import argparse
import faulthandler
import json
import signal
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from ..config import NSAConfig
from ..flex import call as flex_call
from .parts import PARTS
from .peers import NAME as FLASH_NSA
from .timing import DOC_MIXES, SHAPES, Problem, Row, shape_label


def _part(r: Row) -> str:
    """The part as the table and plot show it: ``varlen:short`` for a varlen row of the short mix."""
    return f"{r.part}:{r.mix}" if r.mix else r.part


def _progress(r: Row) -> str:
    """One line about a finished contender, e.g. ``reference T=64 layer / nsa_flex flex: fwd 3.10 ms``."""
    said = [f"{label} {value:.2f} ms" for label, value in (("fwd", r.fwd_ms), ("fwd+bwd", r.fwd_bwd_ms))
            if value is not None]
    if r.peak_mib is not None:
        said.append(f"peak {r.peak_mib:.0f} MiB")
    if r.note:
        said.append(r.note)
    if r.stand_ins:
        said.append(f"[{r.stand_ins}]")
    return f"{r.shape} T={r.T} {_part(r)} / {r.name}: {', '.join(said) or 'no result'}"


def _table(rows: list[Row]) -> str:
    """One line per row: its shape, part (with the document mix), contender, times, peak memory,
    and a note: the ratio against SDPA cuDNN at the same shape and ``T`` (when measured), the
    row's note, its relative error, and in brackets, beside its times, what it runs in place of
    its own code."""
    lines = [f"{'shape':9} {'part':12} {'contender':18} {'T':>6} {'fwd ms':>9} {'fwd+bwd ms':>11} {'peak MiB':>9}  ratios / note"]
    base = {}  # (shape, T) -> SDPA cuDNN row, the bar every ratio is taken against
    for r in rows:
        if r.part == "full" and r.name == "SDPA cuDNN" and r.fwd_ms:
            base[(r.shape, r.T)] = r
    for r in rows:
        fmt = lambda x, w: f"{x:>{w}.2f}" if x is not None else f"{'-':>{w}}"
        note = r.note
        b = base.get((r.shape, r.T))
        if b and r.fwd_ms and r is not b and r.part != "decode":  # decode rows hold their own ratio
            ratio = f"cuDNN/this: fwd {b.fwd_ms / r.fwd_ms:.2f}x"
            if b.fwd_bwd_ms and r.fwd_bwd_ms:
                ratio += f", fwd+bwd {b.fwd_bwd_ms / r.fwd_bwd_ms:.2f}x"
            note = f"{ratio}  {note}".strip()
        if r.rel_err_vs_flex is not None:
            note = f"{note}  rel err vs flex {r.rel_err_vs_flex:.1e}".strip()
        if r.stand_ins and (r.fwd_ms or r.fwd_bwd_ms):  # beside its numbers
            note = f"{note}  [{r.stand_ins}]".strip()
        lines.append(f"{r.shape or '-':9} {_part(r):12} {r.name:18} {r.T:>6} {fmt(r.fwd_ms, 9)} {fmt(r.fwd_bwd_ms, 11)} "
                     f"{fmt(r.peak_mib, 9)}  {note}")
    return "\n".join(lines)


# The plot's panels: a row's field and the panel's title. A panel is drawn only when some row
# has that time (on the CPU the bench times no backward).
PANELS = (("fwd_ms", "forward"), ("fwd_bwd_ms", "forward + backward"))


def _figure(rows: list[Row]):
    """The times plot as a matplotlib figure: a row of panels per shape, a panel per measured
    time in :data:`PANELS` (a line per contender, ms against ``T``, both on log scales);
    ``None`` when no row holds a time. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(key, title) for key, title in PANELS if any(getattr(r, key) for r in rows)]
    if not panels:
        return None
    shapes = list(dict.fromkeys(r.shape for r in rows))
    # a contender keeps its colour in every panel
    contenders = list(dict.fromkeys((_part(r), r.name) for r in rows))
    palette = plt.get_cmap("tab10" if len(contenders) <= 10 else "tab20")
    colour = {c: palette(i % palette.N) for i, c in enumerate(contenders)}
    height = 4.5 * len(shapes) + 0.5
    fig, axes = plt.subplots(len(shapes), len(panels), figsize=(5.5 * len(panels) + 0.5, height), squeeze=False)
    for shape, axes_of_shape in zip(shapes, axes):
        mine = [r for r in rows if r.shape == shape]
        for ax, (key, title) in zip(axes_of_shape, panels):
            for part, name in dict.fromkeys((_part(r), r.name) for r in mine):
                pts = [(r.T, getattr(r, key)) for r in mine if (_part(r), r.name) == (part, name) and getattr(r, key)]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"{part}: {name}", color=colour[(part, name)])
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length T")
            ax.set_ylabel("ms (median)")
            ax.set_title(f"{shape}: {title}" if len(shapes) > 1 else title)
            ax.grid(True, which="both", alpha=0.3)
    # every contender of any panel, once (the forward panel may lack one the other has)
    labelled = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labelled.setdefault(label, handle)
    fig.legend(list(labelled.values()), list(labelled), loc="lower center", ncol=3, fontsize=8)
    legend_inches = 0.3 + 0.2 * -(-len(labelled) // 3)
    fig.tight_layout(rect=(0, min(0.5, legend_inches / height), 1, 1))
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


def _shape_of(meta: dict) -> str:
    """The shape of a results.json made before rows carried theirs: the name of SHAPES its
    ``B, Hq, Hkv, D`` match, else those numbers; ``""`` if its meta has none."""
    if not all(key in meta for key in ("B", "Hq", "Hkv", "D")):
        return ""
    dims = tuple(meta[key] for key in ("B", "Hq", "Hkv", "D"))
    return next((name for name, s in SHAPES.items() if s == dims), "B={} Hq={} Hkv={} D={}".format(*dims))


def _merge(paths: list[Path], out: Path) -> int:
    """The rows of several runs' ``results.json`` as one table and plot (each row keeps the
    ratios of its own run: they are taken per shape and length against that run's cuDNN row)."""
    rows, metas = [], []
    for path in paths:
        data = json.loads(Path(path).read_text())
        metas.append(dict(data["meta"], source=str(path)))
        older = _shape_of(data["meta"])
        rows += [Row(**dict(dict(shape=older), **r)) for r in data["rows"]]
    seen = set()
    for r in rows:
        key = (r.shape, r.part, r.mix, r.name, r.T)
        if key in seen:
            raise ValueError(f"--merge: {r.shape} {_part(r)} / {r.name} at T={r.T} is in more than one file; "
                             "each length's ratios need its own run's rows alone")
        seen.add(key)
    order = {shape: i for i, shape in enumerate(dict.fromkeys(r.shape for r in rows))}
    rows.sort(key=lambda r: (order[r.shape], r.T))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(dict(meta=dict(merged=metas), rows=[asdict(r) for r in rows]), indent=1))
    print(_table(rows))
    print(f"results: {out / 'results.json'}")
    print(_plot(rows, out / "times.png"))
    return 0


def _parser() -> argparse.ArgumentParser:
    description = sys.modules[__package__].__doc__.split("\n\n")[0]
    shapes = "; ".join(shape_label(name) for name in SHAPES)
    mixes = ", ".join(f"{name} ({lo}..{hi} tokens)" for name, (lo, hi) in DOC_MIXES.items())
    ap = argparse.ArgumentParser(
        prog="python -m nsa_flex.bench", description=description,
        epilog=f"{FLASH_NSA} (mdy666/Scalable-Flash-Native-Sparse-Attention) is timed in the layer and varlen parts "
               f"when `import {FLASH_NSA}` works (put the folder holding {FLASH_NSA}/ on PYTHONPATH), with its window "
               "branch, which needs flash-attn, replaced by a compiled FlexAttention window; fla's parallel_nsa when "
               "fla-core is importable. Each row's brackets say what it runs in place of its own code. "
               "Commands and results: docs/benchmarks.md.")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (runs on the CPU)")
    ap.add_argument("--out", type=Path, default=Path("bench_out"), help="folder for results.json and times.png")
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), metavar="SHAPE",
                    help=f"shapes to time, each row labelled with its own (default reference; tiny with --quick): {shapes}")
    ap.add_argument("--seq-lens", type=int, nargs="+", help="sequence lengths (default 8k..64k, or tiny with --quick)")
    ap.add_argument("--parts", nargs="+", choices=sorted(PARTS), default=["selected", "layer", "full"])
    ap.add_argument("--doc-mix", nargs="+", choices=list(DOC_MIXES), default=list(DOC_MIXES), metavar="MIX",
                    help=f"document mixes of --parts varlen (default all): {mixes}; with --quick, 1/256 of these; "
                         "a mix whose shortest document exceeds T is skipped at that T")
    ap.add_argument("--doc-seed", type=int, default=0, help="seed of the varlen part's document lengths (row b: seed + b)")
    ap.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8], metavar="B",
                    help="the decode part's batch sizes (default: 1 8)")
    ap.add_argument("--spec-tokens", type=int, default=4, metavar="M",
                    help="the decode part's speculative step: M tokens per row, 1 for none (default: 4)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions on the CPU (CUDA uses do_bench)")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                    help="measure nothing: join the rows of these results.json files (runs of other lengths or "
                         "shapes, say) into one table, results.json and plot under --out")
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if min(args.decode_batches) < 1 or args.spec_tokens < 1:
        parser.error("--decode-batches and --spec-tokens take integers >= 1")
    if args.merge:
        return _merge(args.merge, args.out)

    device = torch.device(args.device)
    # `kill -USR1` (or `timeout -s USR1`) prints where a long run is, and it carries on
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    dtype = torch.float32 if args.quick and device.type == "cpu" else torch.bfloat16
    if args.quick:
        config = NSAConfig(select_block=32, num_selected=4, window=64)
        shapes = args.shapes or ["tiny"]
        lens = args.seq_lens or [64, 128]
        mixes = {name: (lo // 256, hi // 256) for name, (lo, hi) in DOC_MIXES.items()}
    else:
        config = NSAConfig()
        shapes = args.shapes or ["reference"]
        lens = args.seq_lens or [8192, 16384, 32768, 65536]
        mixes = dict(DOC_MIXES)
    mixes = {name: mixes[name] for name in args.doc_mix}
    problems = [Problem(*SHAPES[name], dtype, device, config, name=name) for name in shapes]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # bf16 run; nothing here is float32 math
    print(f"nsa_flex.bench: device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, {dtype}, {config}")
    print(f"shapes: {'; '.join(shape_label(name) for name in shapes)}")
    if "varlen" in args.parts:
        print(f"document mixes: {', '.join(f'{name} {lo}..{hi}' for name, (lo, hi) in mixes.items())} tokens, seed {args.doc_seed}")
    if device.type != "cuda":
        print(f"no CUDA: SDPA cuDNN/flash, fla, {FLASH_NSA} and all backward timings are skipped")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(device=str(device), torch=torch.__version__, dtype=str(dtype), config=asdict(config),
                shapes={p.name: dict(B=p.B, Hq=p.Hq, Hkv=p.Hkv, D=p.D) for p in problems}, argv=sys.argv[1:])
    if "varlen" in args.parts:
        meta.update(doc_mixes=mixes, doc_seed=args.doc_seed)
    if device.type == "cuda":
        import triton

        meta.update(gpu=torch.cuda.get_device_name(device), triton=triton.__version__)
    # the units of work, results.json rewritten after each: a part, or the varlen part's one mix
    units = []
    for part in args.parts:
        if part == "varlen":
            units += [(part, dict(mixes={name: span}, seed=args.doc_seed)) for name, span in mixes.items()]
        elif part == "decode":
            units.append((part, dict(batches=tuple(args.decode_batches), spec=args.spec_tokens)))
        else:
            units.append((part, {}))
    rows: list[Row] = []
    for p in problems:
        for T in lens:
            for part, extra in units:
                # Every contender, length and grad mode is its own graph of the bench's own
                # torch.compile(flex_attention) calls too; past Dynamo's limit (8 per function) they
                # would run FlexAttention unfused, materialising the scores (over 100 GiB at 16k):
                # the limits the flex backend raises for its eager calls cover them.
                with flex_call.room_to_recompile():
                    new_rows = PARTS[part](p, T, args.reps, **extra)
                for r in new_rows:
                    r.shape = p.name
                rows += new_rows
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                for r in new_rows:  # progress, on stderr: stdout has the table once, at the end
                    print(_progress(r), file=sys.stderr, flush=True)
                # after every unit, so that a run stopped at a time limit keeps what it measured
                (args.out / "results.json").write_text(json.dumps(dict(meta=meta, rows=[asdict(r) for r in rows]), indent=1))
    print(_table(rows))
    print(f"results: {args.out / 'results.json'}")
    print(_plot(rows, args.out / "times.png"))
    return 0
