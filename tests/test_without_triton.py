"""Triton is optional: with ``import triton`` failing, everything but the kernels still works,
and what needs the kernels says what to install.

Each check runs in a fresh interpreter where ``sys.modules["triton"] = None`` makes every
``import triton`` raise ``ImportError``, as on a machine without the package.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BLOCK_TRITON = "import sys\nsys.modules['triton'] = None  # `import triton` now raises ImportError\n"


def run_without_triton(code: str, *args: str) -> subprocess.CompletedProcess:
    # TRITON_INTERPRET=1 as conftest sets it: the missing package must win over the interpreter
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, "-c", BLOCK_TRITON + textwrap.dedent(code), *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_the_library_runs_without_triton():
    proc = run_without_triton("""
        import pytest
        import torch
        import nsa_flex
        from nsa_flex import NSAConfig, SparseAttention, attend, decode_step

        config = NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=2,
                           num_initial=1, num_local=1, window=8)
        g = torch.Generator().manual_seed(0)
        q, k, v = torch.randn(1, 2, 40, 16, generator=g), torch.randn(1, 1, 40, 16, generator=g), torch.randn(1, 1, 40, 16, generator=g)
        flex = attend(q, k, v, config=config)
        ref = attend(q.double(), k.double(), v.double(), config=config, backend="reference")
        assert float((flex.double() - ref).norm() / ref.norm()) < 1e-5

        torch.manual_seed(0)
        layer = SparseAttention(32, heads=2, kv_heads=1, dim_head=16, config=config)
        x = torch.randn(1, 24, 32, requires_grad=True)
        layer(x).sum().backward()
        assert x.grad is not None and bool(torch.isfinite(x.grad).all())

        with torch.no_grad():
            full = layer(x[:, :12])
            cache = layer.new_cache(1, 24)
            layer.prefill(x[:, :10], cache)
            step_pytorch = layer.decode(x[:, 10:11], cache, fused=False)
            step_default = layer.decode(x[:, 11:12], cache)  # fused=None
        assert torch.allclose(torch.cat([step_pytorch, step_default], dim=1), full[:, 10:12], atol=1e-5)

        with pytest.raises(ImportError, match=r"triton backend needs the `triton` package.*pip install triton"):
            attend(q, k, v, config=config, backend="triton")
        with torch.no_grad(), pytest.raises(ImportError, match=r"`triton` package.*pip install triton"):
            layer.decode(x[:, 12:13], cache, fused=True)
        # the kernel modules (which import triton at their top) were never imported
        assert not [m for m in sys.modules if m.startswith("nsa_flex.kernels")]
        print("ok")
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


def test_fused_selection_on_cuda_falls_back_without_triton():
    # On CUDA, selection's Triton scoring kernel is the default; without Triton the plan that
    # picks it must say no (CUDA faked through the dispatch's one seam: the plan reads only
    # static facts), and so must the plan of the selected branch and of a decode step.
    proc = run_without_triton("""
        import torch
        from nsa_flex import dispatch

        dispatch._picks_kernels = lambda device: True  # as on CUDA
        q, k, v = torch.randn(1, 2, 16, 16), torch.randn(1, 1, 16, 16), torch.randn(1, 1, 16, 16)
        assert dispatch.scoring_path(q, None, None) == "torch"
        paths = dispatch.plan(q, k, v, backend="flex", score_mod=None, mask_mod=None, docs=None,
                              block_indices=None, selection_grad=False)
        assert paths == ("flex", "torch", "flex", "flex"), paths
        assert dispatch.decode_path(q[:, :, :1], v, None) == "torch"
        print("ok")
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


def test_demo_and_quick_bench_run_without_triton(tmp_path):
    demo = run_without_triton("""
        from nsa_flex.__main__ import main
        sys.exit(main(["--device", "cpu", "--seq-len", "96", "--reps", "1"]))
    """)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "PASS" in demo.stdout
    bench = run_without_triton("""
        from nsa_flex.bench import main
        sys.exit(main(sys.argv[1:]))
    """, "--quick", "--seq-lens", "64", "--reps", "1", "--parts", "layer", "decode", "--out", str(tmp_path))
    assert bench.returncode == 0, bench.stderr[-3000:]
    assert "nsa_flex flex" in bench.stdout and (tmp_path / "results.json").exists()
