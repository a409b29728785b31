"""nsa_flex.flex: how FlexAttention is called (flex.call) and the branches on it, the pieces the end-to-end tests cannot see on the CPU."""

import torch

from nsa_flex import _layout
from nsa_flex.flex import branches, call


def _graphs_compiled(shapes, patch):
    torch._dynamo.reset()
    fn = torch.compile(lambda x: x * 2 + 1, dynamic=False, backend="eager")
    counters = torch._dynamo.utils.counters
    counters.clear()
    with patch():
        for n in shapes:
            assert torch.equal(fn(torch.ones(n)), torch.full((n,), 3.0))
    return counters["stats"]["unique_graphs"]


def test_eager_compiled_flex_has_room_for_many_lengths():
    # Eager CUDA calls share one torch.compile(flex_attention); each branch and length is a
    # new graph. Dynamo's default stops compiling (and runs unfused) past 8 of them.
    import contextlib

    shapes = range(1, 13)
    assert _graphs_compiled(shapes, contextlib.nullcontext) < 12
    assert _graphs_compiled(shapes, call.room_to_recompile) == 12
    torch._dynamo.reset()


# ------------------------------------------------------------------- warnings a user reads

ADVICE = "flex_attention called without torch.compile"  # PyTorch's, on a first eager call


def test_attend_on_the_cpu_does_not_pass_on_torchs_compile_advice():
    # In a fresh process (PyTorch gives the advice once per process): attend() and the module,
    # without and with grad, record no such warning, and a user's own eager flex_attention call
    # afterwards still gets it. (That other warnings pass: the next test.)
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = f"""
import warnings
import torch
from torch.nn.attention.flex_attention import flex_attention
import nsa_flex

config = nsa_flex.NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=2,
                            num_initial=1, num_local=1, window=8)
q, k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 1, 40, 16), torch.randn(1, 1, 40, 16)

def count(messages, text):
    return sum(str(m.message).startswith(text) for m in messages)

with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    with torch.no_grad():
        nsa_flex.attend(q, k, v, config=config)
        nsa_flex.SparseAttention(32, heads=2, kv_heads=1, dim_head=16, config=config)(torch.randn(1, 40, 32))
    nsa_flex.attend(q.requires_grad_(), k, v, config=config).sum().backward()
    assert count(seen, {ADVICE!r}) == 0, [str(m.message)[:80] for m in seen]
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    flex_attention(q.detach(), k.expand(1, 2, 40, 16), v.expand(1, 2, 40, 16))
    assert count(seen, {ADVICE!r}) == 1, [str(m.message)[:80] for m in seen]
print("ok")
"""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(root)), cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok"


def test_the_quiet_eager_call_hides_only_the_compile_advice():
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with call.eager_flex_quietly():
            warnings.warn(ADVICE + "() - this will use an unfused implementation", UserWarning)
            warnings.warn("something else", UserWarning)
        warnings.warn(ADVICE + "() - outside the call", UserWarning)
    assert [str(m.message) for m in seen] == ["something else", ADVICE + "() - outside the call"]


def test_compressed_lse_without_deprecation_warnings():
    """The branch asks FlexAttention for its log-sum-exp through ``AuxRequest``: torch's
    ``return_lse`` gives a FutureWarning, once per process, to anyone who calls ``attend``."""
    import warnings

    from nsa_flex import NSAConfig, mean_compress
    from nsa_flex import reference as R

    config = NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=3, window=8)
    q, k, v = (torch.randn(1, h, 40, 16, dtype=torch.float64) for h in (2, 1, 1))
    k_cmp, v_cmp = mean_compress(k, config), mean_compress(v, config)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with torch.no_grad():
            out, lse = branches.compressed_branch(q, k_cmp, v_cmp, config, 16**-0.5, return_lse=True)
    assert not [w for w in seen if issubclass(w.category, (FutureWarning, DeprecationWarning))], [str(w.message) for w in seen]
    ref, p = R.compressed_attention(q, k_cmp, v_cmp, config, 16**-0.5)
    assert torch.allclose(out, ref, atol=1e-10)
    # the natural log-sum-exp: -inf for rows that see no block
    t = torch.arange(40)
    scores = (q @ k_cmp.repeat_interleave(2, 1).transpose(-1, -2)) * 16**-0.5
    visible = R.compressed_kv_positions(40, config)[None, :] <= t[:, None]
    expected = torch.logsumexp(scores.masked_fill(~visible, float("-inf")), dim=-1)
    assert torch.equal(torch.isinf(lse), torch.isinf(expected))
    assert torch.allclose(lse[~torch.isinf(lse)].double(), expected[~torch.isinf(expected)], atol=1e-5)


def test_fold_and_unfold_rows_are_inverse():
    q = torch.randn(2, 6, 5, 4)  # Hq = 6, G = 3
    rows = _layout.fold_rows(q, 3)
    assert rows.shape == (2, 2, 15, 4)
    assert torch.equal(rows[1, 1, 4 * 3 + 2], q[1, 1 * 3 + 2, 4])  # row t*G + g of KV head h is head h*G + g
    assert torch.equal(_layout.unfold_rows(rows, 3), q)
    out = torch.empty_like(q)
    assert _layout.unfold_rows(rows, 3, out=out) is out and torch.equal(out, q)
    lse = rows[..., 0]  # (B, Hkv, T*G) without a trailing dim
    assert torch.equal(_layout.unfold_rows(lse, 3), q[..., 0])
