"""nsa_flex.testing, the public property-test kit: its strategies draw only valid problems, its
checks pass on every backend and fail, with a report naming the place, on wrong implementations."""

import dataclasses
import functools
import itertools
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import find, given, settings, strategies as st
from torch import nn

import nsa_flex
from nsa_flex import NSAConfig, SparseAttention, attend, decode_step
from nsa_flex.testing import (
    Shape,
    assert_causal,
    assert_decode_matches_forward,
    assert_documents_isolated,
    assert_matches_reference,
    block_indices,
    configs,
    cu_seqlens,
    inputs,
    make_inputs,
    mask_mods,
    score_mods,
    shapes,
)
from nsa_flex.triton_backend import available

ROOT = Path(__file__).resolve().parents[1]
SMALL = NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=3, num_initial=1, num_local=1, window=6)
TRITON = available(torch.device("cpu"))[0]


def small_inputs(T=40, Hq=4, Hkv=2, Dk=16, Dv=24, seed=0, dtype=torch.float64):
    return make_inputs(Shape(1, Hq, Hkv, T, Dk, Dv), seed, dtype=dtype)


# ----------------------------------------------------------------------------- the import


def run_python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def test_the_library_does_not_need_hypothesis():
    proc = run_python("""
        import sys
        import nsa_flex
        assert "hypothesis" not in sys.modules and "nsa_flex.testing" not in sys.modules
        sys.modules["hypothesis"] = None  # `import hypothesis` now raises ImportError
        try:
            import nsa_flex.testing
        except ImportError as e:
            print(e)
        else:
            raise SystemExit("nsa_flex.testing imported without hypothesis")
    """)
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'nsa_flex[testing]'" in proc.stdout


# ----------------------------------------------------------------------------- strategies


@given(configs())
def test_configs_are_valid_within_the_default_bounds(config):
    assert isinstance(config, NSAConfig)  # NSAConfig validates itself: drawing it proves it valid
    assert config.compress_block <= 96 and config.select_block <= 96
    assert config.num_selected <= 8 and config.window <= 80


@given(configs(max_block=8, max_selected=3, max_window=5))
def test_configs_respect_narrowed_bounds(config):
    assert max(config.compress_block, config.select_block, config.compress_stride) <= 8
    assert config.num_selected <= 3 and config.window <= 5


@given(configs(compress_stride=4, compress_block=(8, 16), select_block=12, num_selected=(4, 6), num_initial=2,
               num_local=(1, 2), window=7))
def test_configs_take_fixed_values_and_ranges(config):
    assert config.compress_stride == 4 and config.compress_block in (8, 12, 16) and config.select_block == 12
    assert 4 <= config.num_selected <= 6 and config.num_initial == 2 and config.num_local in (1, 2)
    assert config.window == 7


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(compress_stride=4, compress_block=6), ValueError, "no compress_stride"),
    (dict(num_selected=2, num_initial=2, num_local=1), ValueError, "exceeds num_selected"),
    (dict(window=(5, 3)), ValueError, "window: min 5 exceeds max 3"),
    (dict(window=1.5), TypeError, "window must be an int or a"),
    (dict(max_block=0), ValueError, "max_block must be >= 1"),
])
def test_configs_refuse_impossible_bounds(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        configs(**kwargs)


@given(shapes(max_t=50, max_work=20_000, max_batch=2, groups=(1, 3), head_dims=(8,), value_dims=(4, 12)))
def test_shapes_respect_their_bounds(shape):
    assert 1 <= shape.T <= 50 and shape.B <= 2 and shape.G in (1, 3) and shape.Hq == shape.G * shape.Hkv
    assert shape.B * shape.Hq * shape.T**2 <= 20_000
    assert shape.Dk == 8 and shape.Dv in (4, 12)


def test_shape_checks_its_fields():
    with pytest.raises(ValueError, match="Shape.Hkv \\(3\\) must divide Shape.Hq \\(4\\)"):
        Shape(1, 4, 3, 8, 16, 16)
    with pytest.raises(TypeError, match="Shape.T must be an int"):
        Shape(1, 4, 2, 8.0, 16, 16)


@settings(max_examples=10)
@given(shapes(max_t=40, max_work=20_000).flatmap(lambda s: st.tuples(st.just(s), inputs(s, dtype=torch.float32))))
def test_inputs_have_the_shapes_and_reproduce_from_their_repr(drawn):
    shape, x = drawn
    q, k, v, gates = x
    assert q.shape == (shape.B, shape.Hq, shape.T, shape.Dk) and k.shape == (shape.B, shape.Hkv, shape.T, shape.Dk)
    assert v.shape == (shape.B, shape.Hkv, shape.T, shape.Dv) and gates.shape == (shape.B, shape.Hq, shape.T, 3)
    assert all(t.dtype == torch.float32 for t in x) and bool(((gates > 0) & (gates < 1)).all())
    again = eval(repr(x), {"make_inputs": make_inputs, "Shape": Shape, "torch": torch})
    assert all(torch.equal(a, b) for a, b in zip(x, again))


def check_selection(idx, shape, config, causal, docs=None):
    """The layout block_indices documents: (B, Hkv, T, n) int32, ascending, -1 padding last,
    forced blocks present, nothing past the query's block when causal."""
    assert idx.shape == (shape.B, shape.Hkv, shape.T, config.num_selected) and idx.dtype == torch.int32
    pos = torch.arange(shape.T) if docs is None else docs.pos.long()
    current = pos // config.select_block
    for b, h, t in itertools.product(range(shape.B), range(shape.Hkv), range(shape.T)):
        row = idx[b, h, t].tolist()
        blocks = [j for j in row if j >= 0]
        assert row == blocks + [-1] * (len(row) - len(blocks)), row  # padding last
        assert blocks == sorted(blocks), row
        c = int(current[t])
        forced = {j for j in range(c + 1) if j < config.num_initial or j > c - config.num_local}
        assert forced <= set(blocks), (t, row)
        if causal:
            assert all(j <= c for j in blocks), (t, row)
    return idx


@settings(max_examples=15)
@given(configs(max_block=16), shapes(max_t=70, max_work=40_000, head_dims=(8,), value_dims=(8,)), st.booleans(), st.data())
def test_block_indices_are_valid_selections(config, shape, causal, data):
    idx = data.draw(block_indices(shape, config, causal=causal))
    check_selection(idx, shape, config, causal)
    assert all(len(set(r)) == len(r) for r in idx.flatten(0, 2).tolist() if -1 not in r)  # no repeats
    q, k, v, _ = make_inputs(shape, 0)
    attend(q, k, v, config=config, block_indices=idx, backend="reference")  # attend's own checks pass


@settings(max_examples=15)
@given(configs(max_block=16), st.integers(1, 60).flatmap(lambda T: st.tuples(st.just(T), cu_seqlens(T))), st.data())
def test_block_indices_under_cu_seqlens_are_doc_local(config, drawn, data):
    T, cu = drawn
    shape = Shape(1, 2, 1, T, 8, 8)
    idx = data.draw(block_indices(shape, config, cu_seqlens=cu, allow_repeats=True))
    docs = nsa_flex.varlen.documents(cu)
    ns = torch.tensor([config.num_select_blocks(n) for n in docs.lengths])[docs.doc_id.long()]
    assert bool((idx < ns.view(1, 1, -1, 1)).all())
    q, k, v, _ = make_inputs(shape, 1)
    attend(q, k, v, config=config, block_indices=idx, cu_seqlens=cu, backend="reference")


def test_block_indices_draw_repeats_and_padding_only_as_asked():
    shape, config = Shape(1, 1, 1, 64, 8, 8), NSAConfig(compress_block=4, compress_stride=4, select_block=4,
                                                       num_selected=6, num_initial=1, num_local=1)

    def has_repeat(idx):
        return any(len({j for j in r if j >= 0}) < sum(j >= 0 for j in r) for r in idx[0, 0].tolist())

    with_repeats = find(block_indices(shape, config, allow_repeats=True), has_repeat)
    for r in with_repeats[0, 0].tolist():
        blocks = [j for j in r if j >= 0]
        assert blocks == sorted(blocks) and r[len(blocks):] == [-1] * (len(r) - len(blocks))
    padded = find(block_indices(shape, config), lambda idx: bool((idx[0, 0, 40:] == -1).any()))
    check_selection(padded, shape, config, causal=True)


@given(st.integers(0, 50).flatmap(lambda T: st.tuples(st.just(T), cu_seqlens(T, max_documents=5, dtype=torch.int64))))
def test_cu_seqlens_are_valid_splits(drawn):
    T, cu = drawn
    assert cu.dtype == torch.int64 and 2 <= cu.numel() <= 6
    assert cu[0] == 0 and cu[-1] == T and bool((cu[1:] >= cu[:-1]).all())
    assert nsa_flex.varlen.documents(cu).seq_len == T


@given(st.integers(1, 50).flatmap(lambda T: cu_seqlens(T, allow_empty=False)))
def test_cu_seqlens_without_empty_documents(cu):
    assert bool((cu[1:] > cu[:-1]).all())


def test_cu_seqlens_draw_empty_documents():
    cu = find(cu_seqlens(20), lambda c: bool((c[1:] == c[:-1]).any()) and c.numel() > 2)
    assert nsa_flex.varlen.documents(cu).lengths.count(0) >= 1


@settings(max_examples=12)
@given(score_mods(), mask_mods(T=40), st.integers(0, 2**31 - 1))
def test_mods_run_on_flex_and_the_reference_alike(score_mod, mask_mod, seed):
    q, k, v, gates = small_inputs(seed=seed)
    assert_matches_reference(attend, q, k, v, gates, config=SMALL, score_mod=score_mod, mask_mod=mask_mod)
    assert re.fullmatch(r"\w+\(.*\)", score_mod.__name__) and re.fullmatch(r"\w+\(.*\)", mask_mod.__name__)


# ----------------------------------------------------------------------------- checks pass


@pytest.mark.parametrize("backend", ["reference", "flex"])
def test_checks_pass_on_the_backends(backend):
    fn = functools.partial(attend, backend=backend)
    q, k, v, gates = small_inputs()
    assert_matches_reference(fn, q, k, v, gates, grads=True, config=SMALL)
    assert_causal(fn, q, k, v, gates, config=SMALL)
    cu = torch.tensor([0, 13, 13, 14, 40])
    assert_matches_reference(fn, q, k, v, gates, grads=True, config=SMALL, cu_seqlens=cu)
    assert_documents_isolated(fn, q, k, v, gates, cu_seqlens=cu, config=SMALL)
    q, k, v, gates = small_inputs(dtype=torch.float32)
    assert_matches_reference(fn, q, k, v, gates, grads=True, config=SMALL)  # against float64 copies


def test_checks_pass_with_given_compressed_blocks_and_selection():
    shape = Shape(1, 4, 2, 40, 16, 24)
    q, k, v, gates = make_inputs(shape, 2)
    tc = SMALL.num_compressed(40)
    k_cmp, v_cmp = torch.randn(1, 2, tc, 16, dtype=torch.float64), torch.randn(1, 2, tc, 24, dtype=torch.float64)
    idx = find(block_indices(shape, SMALL), lambda i: True)
    kw = dict(config=SMALL, k_cmp=k_cmp, v_cmp=v_cmp)
    assert_matches_reference(attend, q, k, v, gates, grads=True, block_indices=idx, **kw)
    assert_causal(attend, q, k, v, gates, t=[5, 21, 38], **kw)


@pytest.mark.skipif(not TRITON, reason="no Triton interpreter")
def test_checks_pass_on_triton_under_the_interpreter():
    fn = functools.partial(attend, backend="triton")
    q, k, v, gates = small_inputs(T=20, Dv=16, dtype=torch.float32)
    assert_matches_reference(fn, q, k, v, gates, grads=True, config=SMALL)
    assert_causal(fn, q, k, v, gates, t=9, config=SMALL)
    assert_documents_isolated(fn, q, k, v, gates, cu_seqlens=torch.tensor([0, 9, 20]), config=SMALL)


def make_layer(dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    return SparseAttention(16, heads=4, kv_heads=2, dim_head=8, config=SMALL, **kwargs).to(dtype)


@pytest.mark.parametrize("backend, dtype", [("reference", torch.float64), ("flex", torch.float32)])
def test_decode_check_passes_on_the_module(backend, dtype):
    layer = make_layer(dtype, backend=backend)
    x = torch.randn(2, 30, 16, dtype=dtype, generator=torch.Generator().manual_seed(1))
    assert_decode_matches_forward(layer, x)
    assert_decode_matches_forward(layer, x, prompt=0, steps=[3, 1, 2])


# ----------------------------------------------------------------------------- checks fail


def wrong_scale(q, k, v, gates=None, *, scale=None, **kwargs):
    return attend(q, k, v, gates, scale=1.1 * q.shape[-1] ** -0.5, **kwargs)


def test_a_wrong_scale_fails_in_every_branch_from_the_second_token():
    q, k, v, gates = small_inputs()
    with pytest.raises(AssertionError, match=r"wrong_scale does not match") as e:
        assert_matches_reference(wrong_scale, q, k, v, gates, config=SMALL)
    report = str(e.value)
    # token 0 sees one key in each branch it has: a softmax over one score ignores the scale
    for branch in ("out", "o_slc", "o_swa"):
        assert re.search(rf"^  {branch}: rel err .* first bad row t=1 \(batch 0, head \d\)", report, re.M), report
    assert re.search(r"^  o_cmp: rel err", report, re.M)  # its first block is seen from t = 7
    # a fn without return_aux: the output alone
    plain = lambda q, k, v, gates=None, *, config=None: wrong_scale(q, k, v, gates, config=config)  # noqa: E731
    with pytest.raises(AssertionError, match=r"out: rel err(.|\n)*fn returned no aux"):
        assert_matches_reference(plain, q, k, v, gates, config=SMALL)
    right = lambda q, k, v, gates=None, *, config=None: attend(q, k, v, gates, config=config)  # noqa: E731
    assert_matches_reference(right, q, k, v, gates, config=SMALL)
    assert_causal(right, q, k, v, gates, config=SMALL)


def with_window(extra: int):
    """attend whose window branch sees ``config.window + extra`` keys: a user's window branch
    with an off-by-one when ``extra`` is 1, gated like the others."""

    def fn(q, k, v, gates=None, *, config, return_aux=False, **kwargs):
        out, aux = attend(q, k, v, gates, config=config, return_aux=True, **kwargs)
        wide = dataclasses.replace(config, window=config.window + extra)
        o_swa = attend(q, k, v, config=wide, block_indices=aux.block_indices, return_aux=True, **kwargs)[1].o_swa
        g = torch.ones(*q.shape[:3], 3, dtype=q.dtype) if gates is None else gates
        out = g[..., 0:1] * aux.o_cmp + g[..., 1:2] * aux.o_slc + g[..., 2:3] * o_swa
        return (out, aux._replace(o_swa=o_swa)) if return_aux else out

    return fn


def test_a_window_off_by_one_is_named_at_its_first_row():
    q, k, v, gates = small_inputs()
    with pytest.raises(AssertionError) as e:
        assert_matches_reference(with_window(1), q, k, v, gates, config=SMALL)
    report = str(e.value)
    w = SMALL.window  # row w is the first with more than w keys to see
    assert re.search(rf"^  o_swa: rel err .* first bad row t={w} ", report, re.M), report
    assert re.search(rf"^  out: rel err .* first bad row t={w} ", report, re.M), report
    assert re.search(r"within tolerance: o_cmp .*, o_slc ", report), report
    assert_matches_reference(with_window(0), q, k, v, gates, config=SMALL)  # the wrapper itself is right


def peeking_window(q, k, v, gates=None, *, config, return_aux=False, **kwargs):
    """A window branch that also sees the next token (``s <= t + 1``), in plain PyTorch."""
    out, aux = attend(q, k, v, gates, config=config, return_aux=True, **kwargs)
    G, T = q.shape[1] // k.shape[1], q.shape[2]
    t, s = torch.arange(T)[:, None], torch.arange(T)[None, :]
    seen = (s <= t + 1) & (s > t - config.window)
    scores = (q @ k.repeat_interleave(G, 1).transpose(-1, -2)) * q.shape[-1] ** -0.5
    o_swa = scores.masked_fill(~seen, float("-inf")).softmax(-1) @ v.repeat_interleave(G, 1)
    out = out - gates[..., 2:3] * aux.o_swa + gates[..., 2:3] * o_swa
    return (out, aux._replace(o_swa=o_swa)) if return_aux else out


def test_a_window_that_sees_the_next_token_is_not_causal():
    q, k, v, gates = small_inputs()
    with pytest.raises(AssertionError, match=r"not causal: changing the tokens after t=17 \(T=40\)") as e:
        assert_causal(peeking_window, q, k, v, gates, t=[17], config=SMALL)
    report = str(e.value)
    assert re.search(r"^  o_swa: .* first bad row t=17 ", report, re.M), report
    assert "o_cmp" not in report and "o_slc" not in report and "selection" not in report
    with pytest.raises(AssertionError, match=r"(?m)^  o_swa: rel err .* first bad row t=0 "):
        assert_matches_reference(peeking_window, q, k, v, gates, config=SMALL)


def ignores_documents(q, k, v, gates=None, *, cu_seqlens=None, **kwargs):
    """The packed row attended as one sequence: cu_seqlens dropped."""
    return attend(q, k, v, gates, **kwargs)


def test_a_leak_across_documents_is_named():
    q, k, v, gates = small_inputs()
    cu = torch.tensor([0, 10, 10, 33, 40])
    with pytest.raises(AssertionError, match=r"leaks across documents: changing document 0 \(tokens 0\.\.9\)") as e:
        assert_documents_isolated(ignores_documents, q, k, v, gates, cu_seqlens=cu, config=SMALL)
    # the window reaches back over the boundary into document 2 (document 1 is empty)
    assert re.search(r"^  o_swa: .* first bad row t=10 \(batch 0, head \d, document 2\)", str(e.value), re.M), str(e.value)
    with pytest.raises(AssertionError, match=r"(?m)^  out: rel err .* first bad row t=10 "):
        assert_matches_reference(ignores_documents, q, k, v, gates, config=SMALL, cu_seqlens=cu)


def test_wrong_gradients_are_named():
    def window_grad_doubled(q, k, v, gates=None, *, return_aux=False, **kwargs):
        out, aux = attend(q, k, v, gates, return_aux=True, **kwargs)
        out = out + (aux.o_swa - aux.o_swa.detach())  # same forward; the window's gradient once more, ungated
        return (out, aux) if return_aux else out

    q, k, v, gates = small_inputs()
    assert_matches_reference(window_grad_doubled, q, k, v, gates, config=SMALL)  # the forward is right
    with pytest.raises(AssertionError) as e:
        assert_matches_reference(window_grad_doubled, q, k, v, gates, grads=True, config=SMALL)
    report = str(e.value)
    for name in ("q", "k", "v"):
        assert re.search(rf"^  grad {name}: rel err .* first bad row t=\d+", report, re.M), report
    assert "within tolerance: out" in report and "grad gates" in report.split("within tolerance")[1]


def test_a_worse_selection_is_named():
    def lowest_blocks(q, k, v, gates=None, *, config, return_aux=False, **kwargs):
        # forced blocks, then the lowest others: not the top-n by score
        T, ls, n = q.shape[2], config.select_block, config.num_selected
        rows = []
        for t in range(T):
            c = t // ls
            forced = {j for j in range(c + 1) if j < config.num_initial or j > c - config.num_local}
            chosen = sorted(forced | set(sorted(set(range(c + 1)) - forced)[: n - len(forced)]))
            rows.append(chosen + [-1] * (n - len(chosen)))
        idx = torch.tensor(rows, dtype=torch.int32).expand(q.shape[0], k.shape[1], T, n).contiguous()
        return attend(q, k, v, gates, config=config, block_indices=idx, return_aux=return_aux, **kwargs)

    q, k, v, gates = small_inputs()
    with pytest.raises(AssertionError, match=r"selection: \d+ of \d+ rows chose blocks of other scores") as e:
        assert_matches_reference(lowest_blocks, q, k, v, gates, config=SMALL)
    # rows before t = 24 have at most 3 candidate blocks for 3 slots: no choice to get wrong
    assert re.search(r"first row t=(2[4-9]|3\d) ", str(e.value)), str(e.value)
    # the branches agree on lowest_blocks' own selection
    assert re.search(r"within tolerance: out .*, o_cmp .*, o_slc .*, o_swa ", str(e.value)), str(e.value)


class WindowlessDecode(nn.Module):
    """A SparseAttention (without RoPE) whose decode step drops the window branch (its gate set
    to 0) when ``forget``; prefill and forward are the layer's."""

    def __init__(self, layer: SparseAttention, forget: bool = True):
        super().__init__()
        self.layer, self.forget = layer, forget

    def forward(self, x):
        return self.layer(x)

    def new_cache(self, batch_size, max_len):
        return self.layer.new_cache(batch_size, max_len)

    def prefill(self, x, cache):
        return self.layer.prefill(x, cache)

    def decode(self, x, cache):
        L = self.layer
        heads = lambda y, h: y.unflatten(-1, (h, -1)).transpose(1, 2)  # noqa: E731
        gates = heads(L.to_gates(x), L.heads).sigmoid()
        if self.forget:
            gates = gates * torch.tensor([1.0, 1.0, 0.0], dtype=gates.dtype)
        out = decode_step(cache, heads(L.to_q(x), L.heads), heads(L.to_k(x), L.kv_heads), heads(L.to_v(x), L.kv_heads),
                          gates, compress_k=L.compress_k, compress_v=L.compress_v)
        return L.to_out(out.transpose(1, 2).flatten(2))


def test_a_decode_step_that_forgets_the_window_is_named():
    layer = make_layer(rotary=False, backend="reference")
    x = torch.randn(2, 24, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert_decode_matches_forward(WindowlessDecode(layer, forget=False), x, prompt=11, steps=2)
    with pytest.raises(AssertionError) as e:
        assert_decode_matches_forward(WindowlessDecode(layer), x, prompt=11, steps=2)
    report = str(e.value)
    assert "decoding does not give WindowlessDecode's forward (prompt 11, steps [2]" in report
    assert re.search(r"first bad token t=11 \(batch \d, decode step 0 \(tokens 11\.\.12\)\)", report), report
    assert re.search(r"rel err: prefill [0-9.e+-]+, decode ", report), report


def test_checks_refuse_bad_arguments():
    q, k, v, gates = small_inputs()
    with pytest.raises(TypeError, match="fn must be callable"):
        assert_matches_reference(None, q, k, v)
    with pytest.raises(TypeError, match="return_aux is the check's"):
        assert_matches_reference(attend, q, k, v, return_aux=True)
    with pytest.raises(ValueError, match="rtol must be a finite number"):
        assert_causal(attend, q, k, v, rtol=-1.0)
    with pytest.raises(ValueError, match=r"t must be positions in \[0, 40\)"):
        assert_causal(attend, q, k, v, t=40)
    with pytest.raises(ValueError, match=r"documents must be indices in \[0, 2\)"):
        assert_documents_isolated(attend, q, k, v, cu_seqlens=torch.tensor([0, 5, 40]), documents=[2])
    with pytest.raises(ValueError, match=r"steps must be a positive int"):
        assert_decode_matches_forward(make_layer(), torch.zeros(1, 4, 16, dtype=torch.float64), steps=0)


# ----------------------------------------------------------------------------- the docs


def doc_blocks():
    text = (ROOT / "docs" / "testing.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_docs_examples_run():
    ns = {}
    for block in doc_blocks():
        # fewer examples than the page shows, to keep the suite quick (grads on the CPU compile per shape)
        exec(compile(block.replace("max_examples=5", "max_examples=2"), "docs/testing.md", "exec"), ns)
    tests = [fn for name, fn in ns.items() if name.startswith("test_") and callable(fn)]
    assert len(tests) == 2
    for fn in tests:
        fn()


def test_the_docs_report_of_a_compressor_that_reads_past_its_block():
    ns = {}
    exec(compile(doc_blocks()[0], "docs/testing.md", "exec"), ns)
    max_pool = ns["max_pool"]

    def attend_peeking(q, k, v, gates=None, *, config, **kwargs):
        k_cmp, v_cmp = max_pool(k.roll(-1, dims=2), config), max_pool(v.roll(-1, dims=2), config)
        return attend(q, k, v, gates, config=config, k_cmp=k_cmp, v_cmp=v_cmp, **kwargs)

    config = NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=3, window=16)
    q, k, v, gates = make_inputs(Shape(B=1, Hq=4, Hkv=2, T=48, Dk=16, Dv=16), seed=0)
    with pytest.raises(AssertionError) as e:
        assert_causal(attend_peeking, q, k, v, gates, config=config)
    report = str(e.value)
    page = (ROOT / "docs" / "testing.md").read_text()
    assert report in page, report  # the page shows the report as the check gives it
    assert_causal(ns["attend_max_pool"], q, k, v, gates, config=config)
