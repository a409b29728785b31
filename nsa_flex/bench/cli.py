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
from .timing import Problem, Row


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
    description = sys.modules[__package__].__doc__.split("\n\n")[0]
    ap = argparse.ArgumentParser(prog="python -m nsa_flex.bench", description=description)
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
            with flex_call.room_to_recompile():
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
