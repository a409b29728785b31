"""On a CUDA device: examples/generate.py end to end at tiny sizes, its decode steps replayed
from CUDA graphs (the fused NSA kernels, the library's default there) or run eagerly, and its
--check of the decode logits against the full forward."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]
TINY = ["--device", "cuda", "--batch", "3", "--prompt-lens", "20", "100", "--new-tokens", "8", "--layers", "2",
        "--dim", "64", "--heads", "4", "--kv-heads", "2", "--window", "32", "--select-block", "16",
        "--num-selected", "3", "--compress-block", "16", "--compress-stride", "8"]


def _main(argv) -> int:
    spec = importlib.util.spec_from_file_location("generate_example", ROOT / "examples" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


@pytest.mark.parametrize("eager", [False, True])
def test_generate_checks_against_the_forward_on_cuda(tmp_path, eager, gpu_numerics):
    path = tmp_path / "out.json"
    argv = TINY + ["--dtype", "float32", "--backend", "reference", "--check", "--json", str(path)]
    assert _main(argv + (["--eager"] if eager else [])) == 0
    runs = json.loads(path.read_text())["runs"]
    for run in runs.values():
        assert run["check_ok"] and run["decode_mode"] == ("eager" if eager else "CUDA graph")
        assert run["peak_mib"] > 0


def test_generate_bf16_with_flex_prefill_and_graphs(tmp_path):
    path = tmp_path / "out.json"
    assert _main(TINY + ["--json", str(path)]) == 0
    runs = json.loads(path.read_text())["runs"]
    assert set(runs) == {"nsa", "sdpa"}
    for run in runs.values():
        tokens = torch.tensor(run["tokens"])
        assert tokens.shape == (3, 8) and tokens.min() >= 0 and tokens.max() < 256
        assert run["decode_mode"] == "CUDA graph"
        assert all(math.isfinite(run[k]) and run[k] > 0 for k in ("prefill_ms", "decode_tokens_per_s", "peak_mib"))
