"""``python -m nsa_flex.bench --quick`` runs where the tests run and writes its results."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_quick_bench_runs_and_writes_results(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "nsa_flex.bench", "--quick", "--out", str(tmp_path), "--reps", "1"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["rows"]
    assert {r["part"] for r in rows} == {"selected", "layer", "full"}
    assert {r["T"] for r in rows} == {64, 128}
    flex = [r for r in rows if r["name"] == "nsa_flex flex"]
    assert flex and all(r["fwd_ms"] > 0 for r in flex)
    if not torch.cuda.is_available():
        skipped = [r for r in rows if r["name"] in ("SDPA cuDNN", "fla parallel_nsa", "nsa_flex triton")]
        assert skipped and all(r["fwd_ms"] is None and r["note"].startswith("skipped") for r in skipped)
        assert "skipped" in proc.stdout
    assert "contender" in proc.stdout  # the table
    # the table once, no raw row dumps; progress on stderr, a line per contender
    assert "row:" not in proc.stdout + proc.stderr
    for r in rows:
        in_table = [line for line in proc.stdout.splitlines()
                    if line.split()[:1] == [r["part"]] and f" {r['name']} " in line and f" {r['T']} " in line]
        assert len(in_table) == 1, (r, in_table)
        assert proc.stderr.count(f"T={r['T']} {r['part']} / {r['name']}: ") == 1, r
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "times.png").stat().st_size > 0


def test_measure_checks_before_timing_and_survives_failures():
    from nsa_flex.bench.timing import _measure

    x = torch.randn(8, 8)
    row = _measure("p", "twice", 8, lambda: x * 2, (), torch.device("cpu"), 1, check=(x * 2 * (1 + 1e-3), lambda o: o))
    assert row.fwd_ms > 0 and abs(row.rel_err_vs_flex - 1e-3 / (1 + 1e-3)) < 1e-6

    def broken():
        raise RuntimeError("no kernel for this shape")

    row = _measure("p", "broken", 8, broken, (), torch.device("cpu"), 1)
    assert row.fwd_ms is None and row.note.startswith("failed: RuntimeError: no kernel")


def test_quick_decode_part(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "nsa_flex.bench", "--quick", "--parts", "decode", "--out", str(tmp_path), "--reps", "1"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {r["part"] for r in rows} == {"decode"} and {r["T"] for r in rows} == {64, 128}
    names = {r["name"] for r in rows}
    assert {"nsa B=1", "nsa B=8", "sdpa B=1", "sdpa B=8", "nsa B=1 graph"} <= names
    eager = [r for r in rows if not r["name"].endswith("graph")]
    assert all(r["fwd_ms"] > 0 for r in eager), [r["note"] for r in eager]
    assert all(r["note"].startswith("full/this") for r in eager if r["name"].startswith("nsa"))
    if not torch.cuda.is_available():
        graphed = [r for r in rows if r["name"].endswith("graph")]
        assert all(r["fwd_ms"] is None and r["note"].startswith("skipped") for r in graphed)


def test_merge_joins_runs_of_other_lengths(tmp_path):
    # runs of one length each (one per GPU, say) become one table, results.json and plot
    from nsa_flex.bench import cli, timing

    for T in (64, 128):
        row = timing.Row("full", "SDPA cuDNN", T, fwd_ms=2.0 * T, fwd_bwd_ms=6.0 * T)
        mine = timing.Row("layer", "nsa_flex flex", T, fwd_ms=1.0 * T, fwd_bwd_ms=2.0 * T)
        (tmp_path / f"r{T}").mkdir()
        data = dict(meta=dict(T=T), rows=[vars(row), vars(mine)])
        (tmp_path / f"r{T}" / "results.json").write_text(json.dumps(data))
    out = tmp_path / "merged"
    assert cli.main(["--merge", str(tmp_path / "r128" / "results.json"), str(tmp_path / "r64" / "results.json"),
                       "--out", str(out)]) == 0
    merged = json.loads((out / "results.json").read_text())
    assert [(r["T"], r["name"]) for r in merged["rows"]] == [
        (64, "SDPA cuDNN"), (64, "nsa_flex flex"), (128, "SDPA cuDNN"), (128, "nsa_flex flex")]
    assert [m["T"] for m in merged["meta"]["merged"]] == [128, 64]
    table = cli._table([timing.Row(**r) for r in merged["rows"]])
    assert table.count("cuDNN/this: fwd 2.00x, fwd+bwd 3.00x") == 2  # each length against its own cuDNN row
    # one length in two files would mix two runs' rows under one cuDNN row
    with pytest.raises(ValueError, match="SDPA cuDNN at T=64 is in more than one file"):
        cli.main(["--merge", str(tmp_path / "r64" / "results.json"), str(tmp_path / "r64" / "results.json"),
                    "--out", str(out)])


def test_plot_draws_a_panel_per_time_measured(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from nsa_flex.bench import cli, timing

    fwd_only = [timing.Row("layer", "nsa_flex flex", T, fwd_ms=0.1 * T) for T in (64, 128)]
    skipped = timing.Row("layer", "nsa_flex triton", 64, note="skipped: needs CUDA")
    fig = cli._figure(fwd_only + [skipped])  # a CPU run: no backward timed
    assert [ax.get_title() for ax in fig.axes] == ["forward"]
    assert [line.get_label() for line in fig.axes[0].lines] == ["layer: nsa_flex flex"]
    plt.close(fig)
    both = fwd_only + [timing.Row("full", "SDPA cuDNN", 64, fwd_ms=1.0, fwd_bwd_ms=3.0)]
    fig = cli._figure(both)
    assert [ax.get_title() for ax in fig.axes] == ["forward", "forward + backward"]
    assert [line.get_label() for line in fig.axes[1].lines] == ["full: SDPA cuDNN"]
    plt.close(fig)
    assert cli._figure([skipped]) is None
    assert cli._plot([skipped], tmp_path / "times.png") == "nothing was timed: no plot"
    assert not (tmp_path / "times.png").exists()
