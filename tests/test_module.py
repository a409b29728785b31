"""SparseAttention: shapes, argument checks, gradients, flex vs reference, compile, the demo."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nsa_flex.__main__ import block_sparsity, selection_picture
from nsa_flex.config import NSAConfig
from nsa_flex.module import SparseAttention

REPO = Path(__file__).resolve().parents[1]
SMALL = NSAConfig(
    compress_block=8,
    compress_stride=4,
    select_block=8,
    num_selected=3,
    num_initial=1,
    num_local=1,
    window=8,
)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_layer(backend="reference", dtype=torch.float64, device="cpu", seed=0, **kwargs):
    """A tiny layer; ``kwargs`` override the defaults below."""
    torch.manual_seed(seed)
    args = dict(dim=16, heads=2, kv_heads=1, dim_head=8, config=SMALL)
    args.update(kwargs)
    return SparseAttention(**args, backend=backend).to(device=device, dtype=dtype)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("backend", ["reference", "flex"])
@pytest.mark.parametrize(
    "B, T, heads, kv_heads, dim_head, dim_head_v, rotary",
    [
        (1, 1, 2, 1, 8, None, True),  # a single token: only the window branch sees anything
        (2, 7, 2, 2, 8, None, True),  # shorter than a compressed block: Tc = 0
        (1, 40, 3, 1, 8, 16, True),  # G = 3, Dv != Dk
        (2, 45, 4, 2, 6, 8, False),  # T not a multiple of any block, odd-ish head size w/o RoPE
    ],
)
def test_output_shape(backend, B, T, heads, kv_heads, dim_head, dim_head_v, rotary):
    layer = make_layer(
        backend,
        heads=heads,
        kv_heads=kv_heads,
        dim_head=dim_head,
        dim_head_v=dim_head_v,
        rotary=rotary,
    )
    x = torch.randn(B, T, 16, dtype=torch.float64)
    with torch.no_grad():
        out, aux = layer(x, return_aux=True)
    assert out.shape == (B, T, 16) and out.dtype == x.dtype
    assert torch.isfinite(out).all()
    dv = dim_head_v or dim_head
    assert aux.block_indices.shape == (B, kv_heads, T, SMALL.num_selected)
    for branch in (aux.o_cmp, aux.o_slc, aux.o_swa):
        assert branch.shape == (B, heads, T, dv)


def test_default_config_and_kv_heads():
    layer = SparseAttention(32, heads=4, dim_head=8)
    assert layer.config == NSAConfig() and layer.kv_heads == 4 and layer.dim_head_v == 8
    assert layer.backend == "flex"
    assert "heads=4" in repr(layer)


def test_no_rotary_has_no_rotary_module():
    assert make_layer(rotary=False).rotary is None
    assert make_layer().rotary is not None


# ---------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(dim=0), ValueError, "dim"),
        (dict(dim=16.0), TypeError, "dim"),
        (dict(heads=0), ValueError, "heads"),
        (dict(heads="2"), TypeError, "heads"),
        (dict(kv_heads=0), ValueError, "kv_heads"),
        (dict(heads=3, kv_heads=2), ValueError, "kv_heads"),
        (dict(dim_head=-8), ValueError, "dim_head"),
        (dict(dim_head=True), TypeError, "dim_head"),
        (dict(dim_head=7), ValueError, "dim_head must be even"),
        (dict(dim_head_v=0), ValueError, "dim_head_v"),
        (dict(config={"window": 8}), TypeError, "config"),
        (dict(rotary="yes"), TypeError, "rotary"),
        (dict(rotary_base=1.0), ValueError, "rotary_base"),
        (dict(rotary_base="1e4"), TypeError, "rotary_base"),
        (dict(compress_hidden=0), ValueError, "compress_hidden"),
        (dict(compress_hidden=2.5), TypeError, "compress_hidden"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(backend=None), ValueError, "backend"),
        (dict(bias=1), TypeError, "bias"),
    ],
)
def test_bad_constructor_args(kwargs, error, words):
    args = dict(dim=16, heads=2, kv_heads=1, dim_head=8, config=SMALL)
    args.update(kwargs)
    with pytest.raises(error, match=words):
        SparseAttention(**args)


def test_odd_dim_head_allowed_without_rotary():
    layer = make_layer(dim_head=7, rotary=False)
    with torch.no_grad():
        assert layer(torch.randn(1, 20, 16, dtype=torch.float64)).shape == (1, 20, 16)


@pytest.mark.parametrize(
    "x, kwargs, error, words",
    [
        (torch.randn(20, 16), {}, ValueError, "x must be"),
        (torch.randn(1, 2, 20, 16), {}, ValueError, "x must be"),
        (torch.randn(1, 20, 12), {}, ValueError, "dim=16"),
        (torch.ones(1, 20, 16, dtype=torch.int64), {}, TypeError, "floating"),
        (torch.randn(1, 20, 16, device="meta"), {}, ValueError, "device|on meta"),
        (torch.randn(1, 20, 16), dict(score_mod=3), TypeError, "score_mod"),
        (torch.randn(1, 20, 16), dict(mask_mod="causal"), TypeError, "mask_mod"),
    ],
)
def test_bad_forward_args(x, kwargs, error, words):
    layer = make_layer(dtype=torch.float32)
    with pytest.raises(error, match=words):
        layer(x, **kwargs)


# ------------------------------------------------------------------------------- gradients


def _assert_every_parameter_has_gradient(layer):
    scale = max(p.grad.abs().max() for p in layer.parameters() if p.grad is not None)
    for name, p in layer.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().max() > 1e-5 * scale, f"{name}'s gradient is (nearly) all zero"


def test_gradients_reach_every_parameter_reference():
    layer = make_layer("reference", bias=True)
    x = torch.randn(2, 40, 16, dtype=torch.float64, requires_grad=True)
    layer(x).square().sum().backward()
    _assert_every_parameter_has_gradient(layer)
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_reach_every_parameter_flex(device):
    # The public flex_attention refuses CPU inputs that require grad; the flex backend then
    # runs FlexAttention's eager operator directly, which this checks differentiates.
    # dim_head=16: FlexAttention's CUDA kernels need head sizes >= 16.
    layer = make_layer("flex", dtype=torch.float32, device=device, bias=True, dim_head=16)
    x = torch.randn(2, 40, 16, device=device, requires_grad=True)
    layer(x).square().sum().backward()
    _assert_every_parameter_has_gradient(layer)


@pytest.mark.parametrize("device", DEVICES)
def test_flex_gradients_match_reference(device):
    layer = make_layer("flex", dtype=torch.float32, device=device, bias=True, dim_head=16)
    ref = copy.deepcopy(layer).double()
    ref.backend = "reference"
    x = torch.randn(2, 40, 16, device=device)
    x64 = x.double().requires_grad_()
    x = x.requires_grad_()
    grad_out = torch.randn(2, 40, 16, device=device)
    layer(x).backward(grad_out)
    ref(x64).backward(grad_out.double())
    assert rel_err(x.grad, x64.grad) < 1e-5
    for (name, p), p64 in zip(layer.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, p64.grad) < 1e-5, name


def test_gradcheck_input():
    layer = make_layer("reference")
    x = torch.randn(1, 40, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_gradcheck_parameters():
    """Every parameter's gradient, through ``functional_call`` (random projections: fast mode)."""
    layer = make_layer("reference", bias=True)
    names = [name for name, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    x = torch.randn(1, 40, 16, dtype=torch.float64)

    def layer_of_params(*params):
        return torch.func.functional_call(layer, dict(zip(names, params)), (x,))

    assert torch.autograd.gradcheck(layer_of_params, tuple(params), fast_mode=True)


# --------------------------------------------------------------------- flex vs reference


@pytest.mark.parametrize(
    "T, heads, kv_heads, dim_head_v",
    [(1, 2, 1, None), (13, 2, 2, None), (40, 3, 1, 16), (64, 4, 2, None), (77, 6, 2, 8)],
)
def test_flex_matches_reference_float64(T, heads, kv_heads, dim_head_v):
    layer = make_layer("flex", heads=heads, kv_heads=kv_heads, dim_head_v=dim_head_v)
    ref = copy.deepcopy(layer)
    ref.backend = "reference"
    x = torch.randn(2, T, 16, dtype=torch.float64)
    with torch.no_grad():
        out, aux = layer(x, return_aux=True)
        expected, ref_aux = ref(x, return_aux=True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(aux.block_indices, ref_aux.block_indices)
    for name in ("o_cmp", "o_slc", "o_swa"):
        torch.testing.assert_close(getattr(aux, name), getattr(ref_aux, name), rtol=1e-10, atol=1e-12)


def test_modifiers_are_passed_to_attend():
    """A score_mod and a mask_mod change the output, identically in both backends."""
    T = 40
    document = torch.arange(T) // 24  # two documents: tokens 0..23 and 24..39

    def soft_cap(score, b, h, q_idx, kv_idx):
        return 3.0 * torch.tanh(score / 3.0)

    def same_document(b, h, q_idx, kv_idx):
        return document[q_idx] == document[kv_idx]

    layer = make_layer("flex")
    ref = copy.deepcopy(layer)
    ref.backend = "reference"
    x = torch.randn(1, T, 16, dtype=torch.float64)
    with torch.no_grad():
        plain = ref(x)
        for mods in (dict(score_mod=soft_cap), dict(mask_mod=same_document)):
            got, expected = layer(x, **mods), ref(x, **mods)
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
            assert rel_err(expected, plain) > 1e-3


def test_causal():
    layer = make_layer("flex")
    x = torch.randn(1, 48, 16, dtype=torch.float64)
    y = x.clone()
    y[:, 30:] = torch.randn(1, 18, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x)[:, :30], layer(y)[:, :30], rtol=0, atol=0)


def test_compile_fullgraph_matches_eager():
    # FlexAttention compiles on the CPU for float32 (not float64) and forward only.
    layer = make_layer("flex", dtype=torch.float32)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(2, 40, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ demo


def test_block_sparsity_counts():
    config = NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=2,
                       num_initial=1, num_local=1, window=8)
    # T = 17: queries 0-7 see block 0, 8-15 blocks 0-1, 16 blocks 0-2 -> 8 + 16 + 3 causal pairs.
    bi = torch.full((1, 1, 17, 2), -1, dtype=torch.int32)
    bi[..., 0] = 0
    bi[:, :, 8:, 1] = 1
    assert block_sparsity(bi, config) == (8 + 9 * 2, 8 + 16 + 3)


def test_selection_picture():
    config = NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=2,
                       num_initial=1, num_local=1, window=8)
    bi = torch.tensor([[0, -1], [0, 1], [0, 2]], dtype=torch.int32).repeat_interleave(8, dim=0)
    lines = selection_picture(bi, config, rows=3).splitlines()[1:]
    cells = [line.split("|")[1] for line in lines]
    assert cells == ["#  ", "## ", "#.#"]  # queries 0, 12, 23


def test_demo_runs_on_cpu():
    result = subprocess.run(
        [sys.executable, "-m", "nsa_flex", "--device", "cpu", "--seq-len", "96", "--reps", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS" in result.stdout
    assert "#" in result.stdout


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(dim_head=8.0), TypeError, "dim_head must be an int"),
        (dict(dim_head=0), ValueError, "dim_head must be >= 1"),
        (dict(hidden=True), TypeError, "hidden must be an int"),
        (dict(config={"compress_block": 8}), TypeError, "config must be an NSAConfig"),
    ],
)
def test_block_compressor_rejects_bad_arguments(kwargs, exc, match):
    from nsa_flex import BlockCompressor

    args = dict(dim_head=8, config=SMALL) | kwargs
    with pytest.raises(exc, match=match):
        BlockCompressor(**args)


def test_block_compressor_checks_the_head_dim():
    from nsa_flex import BlockCompressor

    with pytest.raises(ValueError, match="head dim 8"):
        BlockCompressor(8, SMALL)(torch.randn(1, 1, 40, 6))


def test_x_dtype_must_match_the_parameters_outside_autocast():
    layer = make_layer(dtype=torch.float32)
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        layer(torch.randn(1, 20, 16, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(1, 20, 16)).shape == (1, 20, 16)


def test_bf16_autocast_matches_float32():
    layer = make_layer("flex", dtype=torch.float32, dim_head=16)
    x = torch.randn(2, 40, 16)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 2e-2


@pytest.mark.parametrize("backend", ["flex", "reference"])
def test_activation_checkpointing_gives_the_same_gradients(backend):
    from torch.utils.checkpoint import checkpoint

    layer = make_layer(backend, dtype=torch.float32, dim_head=16)
    x = torch.randn(2, 40, 16, requires_grad=True)
    layer(x).square().sum().backward()
    plain = [p.grad.clone() for p in layer.parameters()] + [x.grad.clone()]
    layer.zero_grad()
    x.grad = None
    checkpoint(layer, x, use_reentrant=False).square().sum().backward()
    again = [p.grad for p in layer.parameters()] + [x.grad]
    for a, b in zip(again, plain):
        assert rel_err(a, b) < 1e-6
