"""RoPE: the properties attention relies on (norms kept, scores depend only on m - n)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nsa_flex.rotary import RotaryEmbedding, rotate_half


def _rope_complex(x: torch.Tensor, base: float = 10000.0, offset: int = 0) -> torch.Tensor:
    """Independent formulation: pair ``(i, i + D/2)`` is a complex number times ``e^{i pos w_i}``."""
    D = x.shape[-1]
    z = torch.complex(x[..., : D // 2], x[..., D // 2 :])
    w = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    pos = torch.arange(offset, offset + x.shape[-2], dtype=torch.float64)
    angles = torch.outer(pos, w)
    z = z * torch.polar(torch.ones_like(angles), angles)
    return torch.cat((z.real, z.imag), dim=-1)


def test_matches_complex_rotation():
    x = torch.randn(2, 3, 17, 8, dtype=torch.float64)
    torch.testing.assert_close(RotaryEmbedding(8)(x), _rope_complex(x))


def test_position_zero_is_identity():
    x = torch.randn(1, 2, 1, 16, dtype=torch.float64)
    torch.testing.assert_close(RotaryEmbedding(16)(x), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_shape_and_dtype_kept(dtype):
    x = torch.randn(2, 3, 5, 8).to(dtype)
    y = RotaryEmbedding(8)(x)
    assert y.shape == x.shape and y.dtype == dtype


def test_bf16_close_to_float64():
    x = torch.randn(1, 1, 4096, 64, dtype=torch.float64)
    rope = RotaryEmbedding(64)
    got = rope(x.to(torch.bfloat16)).double()
    # Angles are computed in float32 even for bf16 input, so the error is bf16 rounding only.
    err = (got - rope(x)).norm() / rope(x).norm()
    assert err < 1e-2


def test_norm_preserved():
    x = torch.randn(2, 4, 100, 32, dtype=torch.float64)
    y = RotaryEmbedding(32)(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))


@settings(max_examples=50, deadline=None)
@given(
    m=st.integers(0, 300),
    n=st.integers(0, 300),
    shift=st.integers(0, 300),
    seed=st.integers(0, 2**16),
)
def test_score_depends_only_on_relative_position(m, n, shift, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 16, generator=g, dtype=torch.float64)
    T = max(m, n) + shift + 1
    rope = RotaryEmbedding(16)
    # The same q (and k) at every position, so only the rotation differs between positions.
    rq = rope(q.expand(1, 1, T, 16))[0, 0]
    rk = rope(k.expand(1, 1, T, 16))[0, 0]
    torch.testing.assert_close(rq[m] @ rk[n], rq[m + shift] @ rk[n + shift])


def test_offset_continues_positions():
    x = torch.randn(1, 2, 30, 8, dtype=torch.float64)
    rope = RotaryEmbedding(8)
    torch.testing.assert_close(rope(x[:, :, 12:], offset=12), rope(x)[:, :, 12:])
    torch.testing.assert_close(rope(x, offset=7), _rope_complex(x, offset=7))


def test_rotate_half():
    x = torch.arange(4.0)
    assert rotate_half(x).tolist() == [-2.0, -3.0, 0.0, 1.0]


def test_base_changes_frequencies():
    x = torch.randn(1, 1, 9, 8, dtype=torch.float64)
    torch.testing.assert_close(RotaryEmbedding(8, base=500.0)(x), _rope_complex(x, base=500.0))


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(dim=7), ValueError, "dim"),
        (dict(dim=0), ValueError, "dim"),
        (dict(dim=8.0), TypeError, "dim"),
        (dict(dim=True), TypeError, "dim"),
        (dict(dim=8, base=1.0), ValueError, "base"),
        (dict(dim=8, base=-3.0), ValueError, "base"),
        (dict(dim=8, base="1e4"), TypeError, "base"),
    ],
)
def test_bad_constructor_args(kwargs, error, words):
    with pytest.raises(error, match=words):
        RotaryEmbedding(**kwargs)


@pytest.mark.parametrize(
    "x, offset, error, words",
    [
        (torch.randn(3, 8), 0, ValueError, "x"),
        (torch.randn(1, 2, 3, 6), 0, ValueError, "dim"),
        (torch.ones(1, 2, 3, 8, dtype=torch.int64), 0, TypeError, "floating"),
        (torch.randn(1, 2, 3, 8), -1, ValueError, "offset"),
        (torch.randn(1, 2, 3, 8), 1.5, TypeError, "offset"),
    ],
)
def test_bad_forward_args(x, offset, error, words):
    with pytest.raises(error, match=words):
        RotaryEmbedding(8)(x, offset=offset)
