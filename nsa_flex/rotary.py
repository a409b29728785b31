"""Rotary position embedding (RoPE; Su et al., "RoFormer", arXiv 2104.09864).

The rotate-half convention (GPT-NeoX, Llama): feature ``i`` and feature ``i + D/2`` form one
rotating pair, turned by the angle ``pos * base ** (-2i / D)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._validation import check_int, check_int_tensor, check_real, check_same_device, check_tensor

__all__ = ["RotaryEmbedding", "rotate_half"]


def rotate_half(x: Tensor) -> Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dimension, split into halves: ``(..., D) -> (..., D)``,
    ``D`` even.

    Raises:
        TypeError: ``x`` is not a tensor.
        ValueError: ``x`` is 0-d or its last dimension is odd.
    """
    check_tensor("x", x, None, floating=False)
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"x's last dimension must be even (two halves), got shape {tuple(x.shape)}")
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotates each ``(i, i + D/2)`` feature pair of a token by an angle proportional to its position.

    After rotation, ``<rope(q)_m, rope(k)_n>`` depends on the positions only through ``m - n``,
    and every vector keeps its norm.

    Args:
        dim: ``D``, the feature size it rotates; must be even.
        base: the wavelength base; pair ``i`` turns by ``base ** (-2i / D)`` radians per position.

    Raises:
        TypeError: `dim` not an int, `base` not a number.
        ValueError: `dim` odd or below 2, `base` not finite and `> 1`.

    Shapes:
        ``forward(x)``: ``(B, H, T, D) -> (B, H, T, D)``, same dtype as ``x``.

    The module holds no state: angles are computed on each call (in at least float32, so bf16
    inputs do not lose the phase of far positions), which keeps it exact under ``.double()``,
    ``.to(bf16)`` and ``torch.compile``.
    """

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        check_int("dim", dim, 2)
        if dim % 2:
            raise ValueError(f"dim must be even, got {dim}")
        self.dim = dim
        self.base = check_real("base", base, 1.0)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}"

    def cos_sin(
        self, seq_len: int, *, offset: int = 0, device=None, dtype=torch.float32, positions: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The rotation angles' ``(cos, sin)``, each ``(seq_len, D)``, for positions
        ``offset .. offset + seq_len - 1``, or for ``positions (seq_len,)`` when given.

        Raises:
            TypeError: ``seq_len`` or ``offset`` not an int, ``positions`` not an integer
                tensor.
            ValueError: ``seq_len`` or ``offset`` negative, ``positions`` not ``(seq_len,)``.
        """
        check_int("seq_len", seq_len, minimum=0)
        check_int("offset", offset, minimum=0)
        if positions is not None:
            _check_positions(positions, (seq_len,), "(T,)")
        exponent = torch.arange(0, self.dim, 2, device=device, dtype=dtype) / self.dim
        inv_freq = self.base**-exponent  # (D/2,)
        if positions is not None:
            pos = positions.to(device=device, dtype=dtype)
        else:
            pos = torch.arange(offset, offset + seq_len, device=device, dtype=dtype)
        angles = torch.outer(pos, inv_freq)  # (T, D/2)
        angles = torch.cat((angles, angles), dim=-1)  # (T, D): pair i and i + D/2 share an angle
        return angles.cos(), angles.sin()

    def forward(self, x: Tensor, *, offset: int = 0, positions: Tensor | None = None) -> Tensor:
        """Rotate ``x``.

        Args:
            x: ``(B, H, T, D)``, floating point.
            offset: the position of ``x[:, :, 0]`` (non-negative), e.g. the number of tokens
                already decoded.
            positions: ``(T,)`` integer position of each token, instead of ``offset``: e.g.
                positions that restart at each packed document (``Documents.pos``).

        Returns:
            ``(B, H, T, D)``, same dtype as ``x``.

        Raises:
            TypeError: `x` not a floating tensor, `offset` not an int, `positions` not an
                integer tensor (bool and float refused).
            ValueError: `x` of another shape, a negative `offset`, `positions` of another
                shape.
        """
        check_tensor("x", x, None, floating=False)
        if x.dim() != 4:
            raise ValueError(f"x must be (B, H, T, D), got shape {tuple(x.shape)}")
        if x.shape[-1] != self.dim:
            raise ValueError(f"x's last dimension must be dim={self.dim}, got {x.shape[-1]}")
        if not x.is_floating_point():
            raise TypeError(f"x must be floating point, got {x.dtype}")
        check_int("offset", offset, minimum=0)
        if positions is not None:
            _check_positions(positions, (x.shape[2],), "(T,)")
        compute = torch.promote_types(x.dtype, torch.float32)
        cos, sin = self.cos_sin(x.shape[2], offset=offset, device=x.device, dtype=compute, positions=positions)
        xc = x.to(compute)
        return (xc * cos + rotate_half(xc) * sin).to(x.dtype)

    def rotate_at(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate ``x`` at per-row positions held in a tensor (decoding: rows at different
        lengths, and nothing read on the host, so a step stays capturable in a CUDA graph).

        Args:
            x: ``(B, H, T, D)``, floating point.
            positions: ``(B, T)`` integer positions of ``x[b, :, t]``.

        Returns:
            ``(B, H, T, D)``, same dtype as ``x``; bitwise what :meth:`forward` gives at those
            positions.

        Raises:
            TypeError, ValueError: as :meth:`forward`, and `positions` on another device than
                `x`.
        """
        check_tensor("x", x, None, floating=False)
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (B, H, T, {self.dim}), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be floating point, got {x.dtype}")
        _check_positions(positions, (x.shape[0], x.shape[2]), "(B, T)")
        check_same_device("positions", positions, x, "x")
        compute = torch.promote_types(x.dtype, torch.float32)
        # the same operations as cos_sin, so that decoding rotates exactly as the full forward
        exponent = torch.arange(0, self.dim, 2, device=x.device, dtype=compute) / self.dim
        inv_freq = self.base**-exponent
        angles = positions.to(compute)[..., None] * inv_freq  # (B, T, D/2)
        angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, D)
        xc = x.to(compute)
        return (xc * angles.cos() + rotate_half(xc) * angles.sin()).to(x.dtype)


def _check_positions(positions, shape: tuple, layout: str) -> None:
    check_int_tensor("positions", positions)
    if tuple(positions.shape) != tuple(shape):
        raise ValueError(f"positions must be {layout} = {tuple(shape)}, got {tuple(positions.shape)}")
