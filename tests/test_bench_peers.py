"""flash_nsa as a bench contender (nsa_flex/bench/peers.py), on the CPU with a fake of it.

The real package is never needed here: a tiny fake in ``sys.modules`` records how the bench
calls it, and its layer returns its window branch (the bench's stand-in), which nsa_flex's
window branch must match.
"""

import sys
import types

import pytest
import torch

from nsa_flex import NSAConfig, attend
from nsa_flex.bench import cli, parts, peers, timing

CPU = torch.device("cpu")
CFG = NSAConfig(select_block=32, num_selected=4, window=24)


@pytest.fixture
def no_flash_nsa_left():
    """Whatever a test imports as flash_nsa is gone after it."""
    yield
    for name in [m for m in sys.modules if m == "flash_nsa" or m.startswith("flash_nsa.")]:
        del sys.modules[name]


def fake_flash_nsa(monkeypatch):
    """A fake flash_nsa in ``sys.modules``: ``NSAConfig`` keeps its arguments, ``HFNSACore``
    records each call and returns the window branch it finds in ``hf_level_nsa`` (as the real
    one looks it up on each call), weighed by the sigmoid of the window's gate logit."""
    calls = []
    hf = types.ModuleType("flash_nsa.modules.hf_level_nsa")

    def own_window(*args):
        raise ImportError("Neither flash_attn_interface nor flash_attn is available.")

    hf.swa_varlen_func = own_window

    class Config:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class Core(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.config = config

        def forward(self, q, k, v, combine_weight, cu_seqlens):
            calls.append(dict(q=q, k=k, v=v, w=combine_weight, cu=cu_seqlens, config=self.config.kwargs,
                              window=hf.swa_varlen_func))
            o = hf.swa_varlen_func(q, k, v, q.shape[-1] ** -0.5)
            return o * torch.sigmoid(combine_weight[..., 2:].float()).to(o.dtype)

    module = types.ModuleType("flash_nsa")
    module.NSAConfig, module.HFNSACore = Config, Core
    module.modules = types.ModuleType("flash_nsa.modules")
    module.modules.hf_level_nsa = hf
    monkeypatch.setitem(sys.modules, "flash_nsa", module)
    monkeypatch.setitem(sys.modules, "flash_nsa.modules", module.modules)
    monkeypatch.setitem(sys.modules, "flash_nsa.modules.hf_level_nsa", hf)
    return module, hf, calls


def _inputs(B, Hq, Hkv, L, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, L, D, generator=g) for h in (Hq, Hkv, Hkv))
    gates = torch.rand(B, Hq, L, 3, generator=g)
    return q, k, v, gates


def _window_only(q, k, v, gates, **kwargs):
    """nsa_flex's window branch times the window gate: what the fake layer computes."""
    one_hot = torch.zeros_like(gates)
    one_hot[..., 2] = 1
    return attend(q, k, v, one_hot, config=CFG, **kwargs) * gates[..., 2:]


@pytest.mark.parametrize("B, lengths", [(2, None), (1, [5, 27, 32])], ids=["rows", "packed"])
def test_flash_nsa_gets_our_inputs_in_its_layout(B, lengths, monkeypatch):
    module, hf, calls = fake_flash_nsa(monkeypatch)
    Hq, Hkv, L, D = 4, 2, 64, 16
    q, k, v, gates = _inputs(B, Hq, Hkv, L, D)
    lengths = lengths or [L] * B
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    ref = _window_only(q, k, v, gates, cu_seqlens=cu if B == 1 and len(lengths) > 1 else None)
    p = timing.Problem(B, Hq, Hkv, D, torch.float32, CPU, CFG, name="t")
    row = peers.measure_flash_nsa(module, "layer", p, L, q, k, v, gates, lengths, 1, ref=ref, note="n")
    assert row.name == "flash_nsa" and row.part == "layer" and row.note == "n" and row.fwd_ms > 0
    assert row.stand_ins == peers.STAND_INS
    # its output, mapped back to (B, Hq, L, D), is nsa_flex's window branch: the stand-in keeps
    # each row and document apart and has nsa_flex's window
    assert row.rel_err_vs_flex < 1e-5
    call = calls[0]
    packed = lambda x: x.transpose(1, 2).reshape(B * L, x.shape[1], x.shape[-1])  # (B*L, H, E)
    torch.testing.assert_close(call["q"], packed(q), rtol=0, atol=0)
    torch.testing.assert_close(call["k"], packed(k), rtol=0, atol=0)
    torch.testing.assert_close(call["v"], packed(v), rtol=0, atol=0)
    torch.testing.assert_close(torch.sigmoid(call["w"]), packed(gates), rtol=0, atol=2e-6)  # logits of our gates
    assert call["cu"].dtype == torch.int32 and call["cu"].tolist() == cu.tolist()
    assert call["config"] == dict(head_dim=D, num_heads=Hq, num_kv_heads=Hkv, kernel_size=32, stride=16, block_size=32,
                                  top_n=4, num_init_blocks=1, num_local_blocks=2, window_size=24)
    # the stand-in only while the bench runs it
    assert call["window"] is not hf.swa_varlen_func
    assert hf.swa_varlen_func.__name__ == "own_window"


def test_flash_nsa_failing_is_a_row_and_leaves_its_window(monkeypatch):
    module, hf, _ = fake_flash_nsa(monkeypatch)

    class Refusing(module.HFNSACore):
        def forward(self, *args):
            raise AssertionError("G must be a power of 2")

    monkeypatch.setattr(module, "HFNSACore", Refusing)
    q, k, v, gates = _inputs(1, 4, 2, 32, 16)
    p = timing.Problem(1, 4, 2, 16, torch.float32, CPU, CFG)
    row = peers.measure_flash_nsa(module, "layer", p, 32, q, k, v, gates, [32], 1)
    assert row.fwd_ms is None and row.note == "failed: AssertionError: G must be a power of 2"
    assert hf.swa_varlen_func.__name__ == "own_window"


def test_flash_nsa_is_skipped_cleanly(monkeypatch):
    p = timing.Problem(1, 4, 2, 16, torch.float32, CPU, CFG)
    q, k, v, gates = _inputs(1, 4, 2, 32, 16)
    monkeypatch.setitem(sys.modules, "flash_nsa", None)  # not importable
    row = peers.flash_nsa_row("layer", p, 32, q, k, v, gates, [32], 1)
    assert row.fwd_ms is None and row.note.startswith("skipped: import flash_nsa: ")
    fake_flash_nsa(monkeypatch)  # importable, but flash_nsa's kernels need CUDA
    row = peers.flash_nsa_row("layer", p, 32, q, k, v, gates, [32], 1)
    assert row.fwd_ms is None and row.note == "skipped: needs CUDA" and row.stand_ins == peers.STAND_INS


def test_layer_part_times_flash_nsa_beside_the_others(monkeypatch):
    fake_flash_nsa(monkeypatch)
    p = timing.Problem(1, 4, 2, 16, torch.float32, CPU, CFG, name="t")
    rows = parts.bench_layer(p, 64, 1)
    assert [r.name for r in rows] == ["nsa_flex flex", "nsa_flex triton", "fla parallel_nsa", "flash_nsa"]
    assert rows[-1].note == "skipped: needs CUDA"


def test_a_missing_pkg_resources_gets_the_shim(tmp_path, monkeypatch, no_flash_nsa_left):
    # flash_nsa/utils.py imports pkg_resources for parse_version, which newer setuptools lacks
    (tmp_path / "flash_nsa").mkdir()
    (tmp_path / "flash_nsa" / "__init__.py").write_text(
        "import pkg_resources\nNEW = pkg_resources.parse_version('3.9.0') >= pkg_resources.parse_version('3.4.0')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "pkg_resources", None)  # not importable, whatever is installed
    module, why = peers.import_flash_nsa()
    assert why == "" and module.NEW is True
    assert sys.modules.get("pkg_resources") is None  # the shim served the import only


def test_a_broken_flash_nsa_is_skipped_with_its_error(tmp_path, monkeypatch, no_flash_nsa_left):
    (tmp_path / "flash_nsa").mkdir()
    (tmp_path / "flash_nsa" / "__init__.py").write_text("import flash_attn_missing_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module, why = peers.import_flash_nsa()
    assert module is None and why == "import flash_nsa: No module named 'flash_attn_missing_here'"


def test_window_stand_in_matches_a_dense_window():
    lengths, window = [5, 11, 16], 4
    T, Hq, Hkv, D = sum(lengths), 4, 2, 8
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(T, h, D, generator=g) for h in (Hq, Hkv, Hkv))
    out = peers.window_stand_in(lengths, window, CPU)(q, k, v, 0.5)
    assert out.shape == (T, Hq, D)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (doc[:, None] == doc[None, :]) & (j <= i) & (i - j < window)
    kq, vq = (x.repeat_interleave(Hq // Hkv, dim=1) for x in (k, v))
    scores = torch.einsum("thd,shd->hts", q, kq) * 0.5
    want = torch.einsum("hts,shd->thd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), vq)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="built for 32 tokens"):
        peers.window_stand_in(lengths, window, CPU)(q[:8], k[:8], v[:8])


def test_help_names_the_shapes_mixes_and_flash_nsa(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("reference B=1 Hq=64 Hkv=4 D=128", "gqa4-d128 B=1 Hq=32 Hkv=8 D=128", "gqa4-d64 B=1 Hq=32 Hkv=8 D=64",
                   "small B=4 Hq=6 Hkv=2 D=64", "short (1024..4096 tokens)", "long (16384..32768 tokens)",
                   "put the folder holding flash_nsa/ on PYTHONPATH"):
        assert needle in text, needle
