"""``python -m nsa_flex.bench --quick`` runs where the tests run and writes its results."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nsa_flex.bench.timing import DOC_MIXES, SHAPES, doc_lengths

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
    assert {r["shape"] for r in rows} == {"tiny"}  # --quick's shape
    assert results["meta"]["shapes"] == {"tiny": dict(zip(("B", "Hq", "Hkv", "D"), SHAPES["tiny"]))}
    # flash_nsa is a contender of the layer part, skipped with the reason when it cannot run
    peer = [r for r in rows if r["name"] == "flash_nsa"]
    assert [r["part"] for r in peer] == ["layer", "layer"]
    if importlib.util.find_spec("flash_nsa") is None:
        assert all(r["note"] == "skipped: import flash_nsa: No module named 'flash_nsa'" for r in peer), peer
    if not torch.cuda.is_available():
        skipped = [r for r in rows if r["name"] in ("SDPA cuDNN", "fla parallel_nsa", "nsa_flex triton", "flash_nsa")]
        assert skipped and all(r["fwd_ms"] is None and r["note"].startswith("skipped") for r in skipped)
        assert "skipped" in proc.stdout
    assert "contender" in proc.stdout  # the table
    # the table once, no raw row dumps; progress on stderr, a line per contender
    assert "row:" not in proc.stdout + proc.stderr
    for r in rows:
        in_table = [line for line in proc.stdout.splitlines()
                    if line.split()[:2] == [r["shape"], r["part"]] and f" {r['name']} " in line and f" {r['T']} " in line]
        assert len(in_table) == 1, (r, in_table)
        assert proc.stderr.count(f"{r['shape']} T={r['T']} {r['part']} / {r['name']}: ") == 1, r
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

    def bare_assert():  # a peer's `assert x` carries no message
        raise AssertionError()

    row = _measure("p", "bare", 8, bare_assert, (), torch.device("cpu"), 1, stand_ins="window: none")
    assert row.fwd_ms is None and row.note == "failed: AssertionError" and row.stand_ins == "window: none"


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
    assert {"nsa B=1", "nsa B=8", "sdpa B=1", "sdpa B=8", "nsa B=1 graph", "nsa spec m=4 B=8"} <= names
    eager = [r for r in rows if not r["name"].endswith("graph")]
    assert all(r["fwd_ms"] > 0 for r in eager), [r["note"] for r in eager]
    assert all(r["note"].startswith("full/this") for r in eager if r["name"].startswith("nsa") and "spec" not in r["name"])
    fused = [r for r in eager if r["name"].startswith("nsa fused")]
    assert all("GB/s of" in r["note"] for r in fused), [r["note"] for r in fused]
    if not torch.cuda.is_available():
        graphed = [r for r in rows if r["name"].endswith("graph")]
        assert all(r["fwd_ms"] is None and r["note"].startswith("skipped") for r in graphed)


def test_decode_options_are_checked():
    from nsa_flex.bench.cli import main

    for bad in (["--decode-batches", "0"], ["--spec-tokens", "0"]):
        with pytest.raises(SystemExit):
            main(["--quick", "--parts", "decode", *bad])


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
    # a row of panels per shape, a contender in the same colour in each
    two = [timing.Row("layer", "nsa_flex flex", T, fwd_ms=0.1 * T, fwd_bwd_ms=0.3 * T, shape=shape)
           for shape in ("reference", "small") for T in (64, 128)]
    fig = cli._figure(two)
    assert [ax.get_title() for ax in fig.axes] == ["reference: forward", "reference: forward + backward",
                                                   "small: forward", "small: forward + backward"]
    assert len({line.get_color() for ax in fig.axes for line in ax.lines}) == 1
    plt.close(fig)
    assert cli._figure([skipped]) is None
    assert cli._plot([skipped], tmp_path / "times.png") == "nothing was timed: no plot"
    assert not (tmp_path / "times.png").exists()


# ------------------------------------------------------------------ shapes and document mixes


def test_shapes_are_parsed_run_and_labelled(tmp_path, monkeypatch, capfd):
    from nsa_flex.bench import cli

    seen = []
    full = cli.PARTS["full"]

    def recording(p, T, reps):
        seen.append((p.name, p.B, p.Hq, p.Hkv, p.D, T))
        return full(p, T, reps)

    monkeypatch.setitem(cli.PARTS, "full", recording)
    assert cli.main(["--quick", "--shapes", "tiny", "small", "--parts", "full", "--seq-lens", "32",
                     "--reps", "1", "--out", str(tmp_path)]) == 0
    assert seen == [("tiny", *SHAPES["tiny"], 32), ("small", *SHAPES["small"], 32)]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["meta"]["shapes"] == {name: dict(zip(("B", "Hq", "Hkv", "D"), SHAPES[name])) for name in ("tiny", "small")}
    rows = results["rows"]
    assert [r["shape"] for r in rows] == ["tiny"] * 3 + ["small"] * 3
    out = capfd.readouterr().out  # capfd: the bench's faulthandler needs stderr's file descriptor
    assert "shapes: tiny B=1 Hq=4 Hkv=2 D=32; small B=4 Hq=6 Hkv=2 D=64" in out
    table = out[out.index("contender"):]
    flex_lines = [line.split()[:3] for line in table.splitlines() if " FlexAttention " in line]
    assert flex_lines == [["tiny", "full", "FlexAttention"], ["small", "full", "FlexAttention"]]


def test_the_issue_shapes_are_known():
    # the shapes of issue 16's targets, by name
    assert SHAPES["reference"] == (1, 64, 4, 128)
    assert SHAPES["gqa4-d128"] == (1, 32, 8, 128)
    assert SHAPES["gqa4-d64"] == (1, 32, 8, 64)
    assert SHAPES["small"] == (4, 6, 2, 64)


@pytest.mark.parametrize("flag, bad", [("--shapes", "huge"), ("--doc-mix", "medium"), ("--parts", "everything")])
def test_an_unknown_name_is_an_argparse_error(flag, bad, capsys):
    from nsa_flex.bench import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--quick", flag, bad])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and f"invalid choice: '{bad}'" in err


@given(T=st.integers(1, 200_000), mix=st.sampled_from(sorted(DOC_MIXES)), scale=st.sampled_from([1, 256]),
       seed=st.integers(0, 2**31))
def test_doc_lengths_sum_to_T_within_their_mix(T, mix, scale, seed):
    lo, hi = (n // scale for n in DOC_MIXES[mix])
    if T < lo:
        with pytest.raises(ValueError, match="shorter than the shortest document"):
            doc_lengths(T, lo, hi, seed)
        return
    lengths = doc_lengths(T, lo, hi, seed)
    assert sum(lengths) == T
    assert all(lo <= n <= hi for n in lengths), lengths
    assert doc_lengths(T, lo, hi, seed) == lengths  # the seed fixes them


def test_doc_lengths_vary_with_the_seed_and_refuse_unsplittable_ranges():
    lo, hi = DOC_MIXES["short"]
    assert len({tuple(doc_lengths(65536, lo, hi, seed)) for seed in range(4)}) == 4
    assert doc_lengths(20000, *DOC_MIXES["long"]) == [20000]  # one document when it fits
    with pytest.raises(ValueError, match="2 \\* lo - 1 <= hi"):
        doc_lengths(100, 10, 15)  # 25 tokens could not be split


def test_varlen_part_packs_each_row_of_each_mix(monkeypatch):
    from nsa_flex import NSAConfig
    from nsa_flex.bench import parts, timing

    calls = []

    def fake_peer(part, p, T, q, k, v, gates, lengths, reps, ref=None, note=""):
        calls.append((q.shape, lengths))
        return timing.Row(part, "flash_nsa", T, note="skipped: a test")

    monkeypatch.setattr(parts, "flash_nsa_row", fake_peer)
    p = timing.Problem(2, 4, 2, 16, torch.float32, torch.device("cpu"),
                       NSAConfig(select_block=32, num_selected=4, window=64), name="two-rows")
    rows = parts.bench_varlen(p, 64, 1, mixes={"short": (4, 16), "huge": (100, 200)}, seed=3)
    assert {r.mix for r in rows} == {"short", "huge"}
    huge = [r for r in rows if r.mix == "huge"]
    assert len(huge) == 1 and huge[0].note.startswith("skipped: huge (100..200 tokens): T = 64 is shorter")
    (shape, lengths), = calls
    assert tuple(shape) == (1, 4, 128, 16)  # the two rows, one packed row
    assert lengths == doc_lengths(64, 4, 16, 3) + doc_lengths(64, 4, 16, 4)  # row b has seed + b
    short = {r.name: r for r in rows if r.mix == "short"}
    assert short["nsa_flex flex"].fwd_ms > 0 and short["FlexAttention doc"].fwd_ms > 0
    assert "2 rows of 64 as one packed row of 128" in short["nsa_flex flex"].note
    assert short["fla parallel_nsa"].stand_ins == parts.FLA_STAND_INS


def test_table_shows_stand_ins_beside_numbers_and_ratios_per_shape():
    from nsa_flex.bench import cli, parts, peers, timing

    rows = [timing.Row("full", "SDPA cuDNN", 64, fwd_ms=4.0, shape="a"),
            timing.Row("full", "SDPA cuDNN", 64, fwd_ms=8.0, shape="b"),
            timing.Row("layer", "flash_nsa", 64, fwd_ms=2.0, stand_ins=peers.STAND_INS, shape="a"),
            timing.Row("layer", "fla parallel_nsa", 64, fwd_ms=2.0, stand_ins=parts.FLA_STAND_INS, shape="b"),
            timing.Row("varlen", "flash_nsa", 64, note="skipped: needs CUDA", stand_ins=peers.STAND_INS,
                       shape="b", mix="short")]
    lines = cli._table(rows).splitlines()[1:]
    assert lines[2].split()[:3] == ["a", "layer", "flash_nsa"]
    assert "cuDNN/this: fwd 2.00x" in lines[2] and lines[2].endswith("[window: compiled FlexAttention stand-in for flash-attn]")
    assert "cuDNN/this: fwd 4.00x" in lines[3] and lines[3].endswith("[window: none (fla's needs flash-attn)]")
    assert lines[4].split()[:2] == ["b", "varlen:short"] and lines[4].endswith("skipped: needs CUDA")


def test_merge_labels_older_files_with_their_shape(tmp_path):
    from nsa_flex.bench import cli, timing

    old = dict(meta=dict(B=1, Hq=64, Hkv=4, D=128), rows=[dict(part="layer", name="nsa_flex flex", T=64, fwd_ms=1.0)])
    odd = dict(meta=dict(B=2, Hq=8, Hkv=8, D=16), rows=[dict(part="layer", name="nsa_flex flex", T=64, fwd_ms=1.0)])
    new = dict(meta=dict(shapes={}), rows=[vars(timing.Row("layer", "nsa_flex flex", 64, fwd_ms=1.0, shape="small"))])
    paths = []
    for name, data in (("old", old), ("odd", odd), ("new", new)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(data))
    assert cli.main(["--merge", *map(str, paths), "--out", str(tmp_path / "m")]) == 0
    rows = json.loads((tmp_path / "m" / "results.json").read_text())["rows"]
    assert [r["shape"] for r in rows] == ["reference", "B=2 Hq=8 Hkv=8 D=16", "small"]


def test_each_mix_is_saved_before_the_next_runs(tmp_path, monkeypatch):
    # a run stopped at its time limit keeps the mixes it finished
    from nsa_flex.bench import cli, timing

    calls = []

    def fake_varlen(p, T, reps, mixes, seed):
        saved = tmp_path / "results.json"
        done = [r["mix"] for r in json.loads(saved.read_text())["rows"]] if saved.exists() else []
        calls.append((mixes, seed, done))
        return [timing.Row("varlen", "x", T, fwd_ms=1.0, mix=name) for name in mixes]

    monkeypatch.setitem(cli.PARTS, "varlen", fake_varlen)
    assert cli.main(["--quick", "--parts", "varlen", "--doc-mix", "long", "short", "--doc-seed", "7",
                     "--seq-lens", "64", "--out", str(tmp_path)]) == 0
    # --quick's mixes are 1/256 of the full ones
    assert calls == [({"long": (64, 128)}, 7, []), ({"short": (4, 16)}, 7, ["long"])]
    meta = json.loads((tmp_path / "results.json").read_text())["meta"]
    assert meta["doc_mixes"] == {"long": [64, 128], "short": [4, 16]} and meta["doc_seed"] == 7
