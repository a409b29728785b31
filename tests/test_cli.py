"""What the command lines print: ``python -m nsa_flex`` (the demo) and ``examples/train_lm.py``
answer bad options with one usage line, show their defaults, and the demo prints no stray
warnings."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nsa_flex.__main__ import blocks_per_query, parse_args
from nsa_flex.config import NSAConfig

ROOT = Path(__file__).resolve().parents[1]


def usage_error(capsys, argv) -> str:
    """The demo's argument parsing of ``argv``: it must exit 2 with a usage message and no
    traceback; returns the error line."""
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("usage: python -m nsa_flex")
    assert lines[-1].startswith("python -m nsa_flex: error: ")
    return lines[-1]


@pytest.mark.parametrize("name", ["foo", "mps", "cuda:x"])
def test_demo_refuses_a_device_it_cannot_name(capsys, name):
    assert usage_error(capsys, ["--device", name]).endswith(f"--device must be cpu, cuda or cuda:N, got {name!r}")


def test_demo_refuses_cuda_without_a_gpu(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a function, not torch's config
    assert "--device cuda: no CUDA device is available here" in usage_error(capsys, ["--device", "cuda"])
    assert "--device cuda:0: no CUDA device is available here" in usage_error(capsys, ["--device", "cuda:0"])


def test_demo_refuses_a_gpu_index_past_the_last(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert usage_error(capsys, ["--device", "cuda:2"]).endswith("--device cuda:2: this machine has 2 CUDA devices")
    assert parse_args(["--device", "cuda:1"]).device == torch.device("cuda:1")


def test_demo_refuses_nonpositive_counts(capsys):
    assert usage_error(capsys, ["--reps", "0"]).endswith("--reps must be >= 1, got 0")
    assert usage_error(capsys, ["--seq-len", "0"]).endswith("--seq-len must be >= 1, got 0")


def test_demo_defaults():
    args = parse_args(["--device", "cpu"])
    assert args.device == torch.device("cpu") and args.seed == 0
    expected = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert parse_args([]).device == expected


def test_demo_help_has_text_and_a_default_for_every_option(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = capsys.readouterr().out
    options = out.split("options:")[1]
    for flag in ("--device", "--seq-len", "--dtype", "--compile", "--reps", "--seed"):
        entry = options.split(flag, 1)[1].split("\n  --")[0]
        assert "default" in entry, (flag, entry)
    assert "(default: 0)" in options.split("--seed", 1)[1]


def test_blocks_per_query_says_min_of_n_and_the_blocks():
    config = NSAConfig(select_block=64, num_selected=8, window=128)
    assert blocks_per_query(config, 1024) == "each query takes at most 8 of the 16 blocks"
    assert blocks_per_query(config, 512) == "each query takes at most 8 of the 8 blocks"
    assert blocks_per_query(config, 128) == (
        "each query takes at most 2 blocks: T=128 has 2 blocks of 64 tokens, fewer than num_selected=8")
    assert blocks_per_query(config, 64) == (
        "each query takes at most 1 block: T=64 has 1 block of 64 tokens, fewer than num_selected=8")


def test_demo_prints_no_warnings():
    proc = subprocess.run([sys.executable, "-m", "nsa_flex", "--device", "cpu", "--seq-len", "128", "--reps", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == "", proc.stderr[-3000:]
    assert "each query takes at most 2 blocks: T=128 has 2 blocks of 64 tokens" in proc.stdout


def _train_lm():
    spec = importlib.util.spec_from_file_location("train_lm", ROOT / "examples" / "train_lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_lm_explains_every_option_and_shows_defaults():
    ap = _train_lm().parser()
    for action in ap._actions:
        assert action.help, action.option_strings
    text = " ".join(ap.format_help().split())  # unwrapped
    for shown in ("(default: 600)", "(default: 0.001)", "(default: 0)", "(default: runs/train_lm)", "(default: both)"):
        assert shown in text, shown
    assert "(default: None)" not in text and "(default: False)" not in text
