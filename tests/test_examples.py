"""The examples run: a few training steps of examples/train_lm.py on the CPU."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_lm_runs_both_models(tmp_path):
    cmd = [
        sys.executable, str(ROOT / "examples" / "train_lm.py"), "--device", "cpu", "--steps", "3",
        "--seq-len", "128", "--layers", "1", "--dim", "64", "--heads", "4", "--kv-heads", "2",
        "--batch", "2", "--eval-every", "2", "--eval-batches", "1", "--max-bytes", "200000",
        "--window", "64", "--select-block", "32", "--num-selected", "4", "--out", str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = json.loads((tmp_path / "log.json").read_text())
    runs = {r["attention"]: r for r in log["runs"]}
    assert set(runs) == {"nsa", "sdpa"}
    for r in runs.values():
        assert len(r["train_loss"]) == 3 and all(math.isfinite(x) for x in r["train_loss"])
        assert r["val_steps"] == [2, 3] and math.isfinite(r["final_val_loss"])
        assert r["tokens_per_s"] > 0
        # a byte model starts near ln(256) = 5.55 nats and must not start far above it
        assert r["train_loss"][0] < 7.0
    # each NSA layer's mean gate per branch, at the start and at every evaluation
    for gates in [runs["nsa"]["gates_at_start"], *runs["nsa"]["gates"]]:
        assert len(gates) == 1 and len(gates[0]) == 3 and all(0 < g < 1 for g in gates[0])
    assert len(runs["nsa"]["gates"]) == 2 and runs["sdpa"]["gates"] == [[], []]
    assert "final val loss" in proc.stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_train_lm_with_selection_grad(tmp_path):
    cmd = [
        sys.executable, str(ROOT / "examples" / "train_lm.py"), "--device", "cpu", "--steps", "2",
        "--seq-len", "96", "--layers", "1", "--dim", "32", "--heads", "2", "--kv-heads", "1",
        "--batch", "1", "--eval-every", "2", "--eval-batches", "1", "--max-bytes", "100000",
        "--window", "32", "--select-block", "16", "--num-selected", "3", "--attention", "nsa",
        "--selection-grad", "--out", str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = json.loads((tmp_path / "log.json").read_text())["runs"]
    assert run["attention"] == "nsa" and all(math.isfinite(x) for x in run["train_loss"])


def test_train_lm_time_limit_and_merged_plot(tmp_path):
    """``--time-limit`` stops a run early and says so; ``--plot`` merges separate runs."""
    common = [
        sys.executable, str(ROOT / "examples" / "train_lm.py"), "--device", "cpu", "--seq-len", "96",
        "--layers", "1", "--dim", "32", "--heads", "2", "--kv-heads", "1", "--batch", "1", "--eval-every", "50",
        "--eval-batches", "1", "--max-bytes", "100000", "--window", "32", "--select-block", "16",
        "--num-selected", "3",
    ]
    runs = {"sdpa": ["--attention", "sdpa", "--steps", "2"],
            "nsa": ["--attention", "nsa", "--steps", "400", "--time-limit", "0"]}
    for name, extra in runs.items():
        proc = subprocess.run(common + extra + ["--out", str(tmp_path / name)], capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    (nsa,) = json.loads((tmp_path / "nsa" / "log.json").read_text())["runs"]
    assert nsa["stopped_early"] and nsa["steps"] == [1] and nsa["val_steps"] == [1]
    assert "stopped early at step 1" in proc.stdout
    merged = tmp_path / "both"
    proc = subprocess.run(common + ["--plot", str(tmp_path / "sdpa" / "log.json"), str(tmp_path / "nsa" / "log.json"),
                                    "--out", str(merged)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    labels = [r["label"] for r in json.loads((merged / "log.json").read_text())["runs"]]
    assert labels == ["sdpa", "nsa"]
    assert "sdpa  : final val loss" in proc.stdout and "nsa   : final val loss" in proc.stdout
