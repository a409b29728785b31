"""examples/generate.py on the CPU at tiny sizes: both attentions end to end, its --check of the
decode logits against the full forward (and that the check sees a wrong step), the progress
bar with and without tqdm, and its argument errors. Not timed: the numbers are only checked
to be finite and positive."""

import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--batch", "3", "--prompt-lens", "5", "40", "--new-tokens", "6", "--layers", "1",
        "--dim", "32", "--heads", "4", "--kv-heads", "2", "--window", "16", "--select-block", "16",
        "--num-selected", "3", "--compress-block", "16", "--compress-stride", "8"]


def _example():
    spec = importlib.util.spec_from_file_location("generate_example", ROOT / "examples" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    return _example()


def test_both_attentions_generate_and_pass_the_check(example, tmp_path, capsys):
    path = tmp_path / "out.json"
    assert example.main(TINY + ["--dtype", "float64", "--check", "--json", str(path)]) == 0
    out, err = capsys.readouterr()
    log = json.loads(path.read_text())
    lengths = log["prompt_lengths"]
    assert len(lengths) == 3 and all(5 <= n <= 40 for n in lengths)
    assert set(log["runs"]) == {"nsa", "sdpa"}
    for name, run in log["runs"].items():
        tokens = torch.tensor(run["tokens"])
        assert tokens.shape == (3, 6) and tokens.min() >= 0 and tokens.max() < 256
        for key in ("prefill_ms", "prefill_tokens_per_s", "decode_ms_per_step", "decode_tokens_per_s", "cache_mib"):
            assert math.isfinite(run[key]) and run[key] > 0, (name, key)
        assert run["prefill_tokens"] == sum(lengths)
        assert run["decode_steps_timed"] == 6 - 1 - 2  # one token from the prefill, two warm-up steps
        assert run["decode_mode"] == "eager" and run["peak_mib"] is None
        assert run["check_ok"] and 0 <= run["check_error"] <= run["check_tolerance"] == 1e-10
        # float64: no near tie flips a token, so greedy decoding is the forward's argmax everywhere
        assert run["greedy_agree"] == 3 * 6
        assert f"{name:4}: prefill" in out and f"check {name}: logits of the prefill and 5 decode steps" in out
    assert "tok/s" in out and "peak memory n/a on the CPU" in out and "nsa/sdpa: decode tokens/s" in out
    assert out.count(": ok;") == 2 and "FAILED" not in out
    assert "nsa  decode [" in err and "sdpa decode [" in err and "6/6 tokens per row" in err


def test_without_check_the_same_tokens(example, capsys):
    """Without --check the prefill computes the logits of each row's last token only; the
    tokens are those of the checked run."""
    argv = TINY + ["--dtype", "float64", "--attention", "nsa"]
    plain, checked = example.run(example.parse_args(argv)), example.run(example.parse_args(argv + ["--check"]))
    assert "check_ok" not in plain["nsa"] and checked["nsa"]["check_ok"]
    assert torch.equal(plain["nsa"]["tokens"], checked["nsa"]["tokens"])
    assert torch.equal(plain["prompt_lengths"], checked["prompt_lengths"])


def test_the_graph_path_with_replays_emulated(example, monkeypatch, capsys):
    """The CUDA-graph path's bookkeeping (static input and logits, the argmax fed back, the
    tokens recorded per replay, the caches' bounds) on the CPU: "capturing" returns the step
    itself, so that each replay runs it, as a graph's replay would run its kernels."""
    captured = []

    def capture(body):
        captured.append(body)
        return body

    monkeypatch.setattr(example, "use_graphs", lambda args: True)
    monkeypatch.setattr(example, "capture", capture)
    argv = TINY + ["--dtype", "float64", "--check", "--new-tokens", "7"]
    results = example.run(example.parse_args(argv))
    assert len(captured) == 2  # one step per attention
    for name in ("nsa", "sdpa"):
        r = results[name]
        assert r["decode_mode"] == "CUDA graph" and r["decode_steps_timed"] == 4
        assert r["check_ok"] and r["greedy_agree"] == 3 * 7 and r["step_logits"].shape == (3, 6, 256)


def test_both_models_share_their_weights(example):
    models = example.build_models(example.parse_args(TINY))
    nsa, sdpa = models["nsa"].state_dict(), models["sdpa"].state_dict()
    assert all(torch.equal(sdpa[k], nsa[k]) for k in sdpa)
    assert any(".attn.to_q." in k for k in sdpa) and set(nsa) > set(sdpa)


@pytest.mark.parametrize("wrong", ["off_by_one", "nan"])
def test_the_check_sees_a_wrong_decode_step(example, monkeypatch, capsys, wrong):
    """An SDPA step that rotates its query and key one position too far (and writes the key one
    slot too far), or one that returns NaN: the prefill still agrees, the decode steps do not,
    and main says so and returns 1."""
    right = example.sdpa_decode

    def off_by_one(attn, x, cache):
        cache.lengths.add_(1)
        try:
            return right(attn, x, cache)
        finally:
            cache.lengths.sub_(1)

    def nan(attn, x, cache):
        return right(attn, x, cache) * float("nan")

    monkeypatch.setattr(example, "sdpa_decode", off_by_one if wrong == "off_by_one" else nan)
    assert example.main(TINY + ["--attention", "sdpa", "--check"]) == 1
    out = capsys.readouterr().out
    assert "check sdpa:" in out and "FAILED" in out and "nsa :" not in out


def test_fused_decode_kernels_pass_the_check(example, capsys):
    """The NSA model with the fused Triton decode step (under Triton's interpreter here)."""
    pytest.importorskip("triton")
    argv = TINY + ["--attention", "nsa", "--decode-path", "fused", "--check", "--batch", "2", "--new-tokens", "3",
                   "--warmup-steps", "1"]
    assert example.main(argv) == 0
    out = capsys.readouterr().out
    assert "check nsa:" in out and ": ok;" in out and "sdpa:" not in out


def test_progress_uses_tqdm_when_installed(example, monkeypatch):
    seen = {}

    class FakeTqdm:
        def __init__(self, total, desc, **kwargs):
            seen.update(total=total, desc=desc, n=0, closed=False)

        def update(self, n):
            seen["n"] += n

        def close(self):
            seen["closed"] = True

    monkeypatch.setitem(sys.modules, "tqdm", types.SimpleNamespace(tqdm=FakeTqdm))
    bar = example.Progress(4, "nsa  decode")
    for _ in range(4):
        bar.update()
    bar.close()
    assert seen == dict(total=4, desc="nsa  decode", n=4, closed=True)


def test_progress_without_tqdm(example, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm raises ImportError
    bar = example.Progress(3, "sdpa decode")
    for _ in range(3):
        bar.update()
    bar.close()
    err = capsys.readouterr().err
    assert err.endswith("\n") and "sdpa decode [" in err and "3/3 tokens per row" in err


@pytest.mark.parametrize("argv, message", [
    (["--device", "foo"], "--device must be cpu, cuda or cuda:N, got 'foo'"),
    (["--device", "mps"], "--device must be cpu, cuda or cuda:N, got 'mps'"),
    (["--prompt-lens", "40", "5"], "--prompt-lens needs 1 <= MIN <= MAX, got 40 5"),
    (["--prompt-lens", "0", "5"], "--prompt-lens needs 1 <= MIN <= MAX, got 0 5"),
    (["--new-tokens", "3"], "--new-tokens must be at least --warmup-steps + 2 = 4"),
    (["--warmup-steps", "0"], "--warmup-steps must be >= 1"),
    (["--context", "45"], "--context must hold the longest prompt and the new tokens: >= 40 + 6, got 45"),
    (["--batch", "0"], "--batch must be >= 1, got 0"),
    (["--heads", "3"], "--dim (32) must be a multiple of --heads (3)"),
    (["--kv-heads", "3"], "--kv-heads (3) must divide --heads (4)"),
    (["--compress-stride", "5"], "the NSA options: NSAConfig.compress_stride (5) must divide compress_block (16)"),
    (["--check", "--dtype", "bfloat16"], "--check needs --dtype float32 or float64 (got bfloat16)"),
    (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
])
def test_bad_arguments_are_usage_errors(example, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        example.parse_args(TINY + argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("usage: ")
    assert message in err.strip().splitlines()[-1]


def test_kernels_that_cannot_run_here_are_usage_errors(example, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # read when asked: the CPU has no kernels now
    for flag in (["--decode-path", "fused"], ["--backend", "triton"]):
        with pytest.raises(SystemExit):
            example.parse_args(TINY + flag)
        assert f"{' '.join(flag)}: the triton backend" in capsys.readouterr().err.strip().splitlines()[-1]
    assert example.parse_args(TINY + ["--decode-path", "fused", "--attention", "sdpa"]).decode_path == "fused"


def test_cuda_without_a_gpu_is_a_usage_error(example, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a function, not torch's config
    with pytest.raises(SystemExit):
        example.parse_args(["--device", "cuda"])
    assert "--device cuda: no CUDA device is available here" in capsys.readouterr().err
    args = example.parse_args([])
    assert args.device == torch.device("cpu") and args.dtype == torch.float32


def test_help_explains_every_option_and_shows_defaults(example):
    ap = example.parser()
    assert all(action.help for action in ap._actions)
    text = " ".join(ap.format_help().split())
    for shown in ("(default: 8)", "(default: [1024, 8192])", "(default: 256)", "(default: both)", "(default: auto)",
                  "(default: cuda when available, else cpu)", "(default: bfloat16 on CUDA, float32 on the CPU)"):
        assert shown in text, shown
    assert "(default: None)" not in text and "(default: False)" not in text
