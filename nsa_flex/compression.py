"""Compression of keys and values into overlapping blocks (paper eq. 7).

Compressed block `i` covers tokens `[i*d, i*d + l - 1]` (`l = compress_block`,
`d = compress_stride`); a sequence of `T` tokens has `Tc = (T - l) // d + 1` of them
(0 when `T < l`). All of these map `(B, H, T, D) -> (B, H, Tc, D)` (`block_view`: to the
blocks themselves).

```python
import torch
from nsa_flex import BlockCompressor, NSAConfig, mean_compress

config = NSAConfig()
k = torch.randn(1, 2, 100, 64)
print(mean_compress(k, config).shape)               # torch.Size([1, 2, 5, 64])
print(BlockCompressor(64, config)(k).shape)         # torch.Size([1, 2, 5, 64])
print(mean_compress(k[:, :, :20], config).shape)    # torch.Size([1, 2, 0, 64])
```
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._validation import check_bool, check_int, check_tensor
from .config import NSAConfig, check_config
from .varlen import resolve

__all__ = ["block_view", "mean_compress", "BlockCompressor"]


def block_view(x: Tensor, config: NSAConfig, cu_seqlens=None) -> Tensor:
    """The compressed blocks of ``x`` as a strided view, without copying.

    Args:
        x: ``(B, H, T, D)``.
        cu_seqlens: for a packed row (``B = 1``), ``(N+1,)`` document offsets or a
            :class:`~nsa_flex.varlen.Documents`: each document's blocks, concatenated, none
            straddling two documents. That is a gathered copy, not a view.

    Returns:
        ``(B, H, Tc, l, D)``: entry ``[:, :, i, j]`` is token ``i*d + j`` (with ``cu_seqlens``,
        ``Tc`` is the documents' total and block ``i`` starts at its document's start plus
        ``d`` times its doc-local index).

    Raises:
        TypeError: ``x`` is not a tensor, ``config`` not an :class:`NSAConfig`.
        ValueError: ``x`` is not 4-D; ``cu_seqlens`` as for ``attend`` (one batch row,
            ending at ``T``).
    """
    _check_x(x, floating=False)
    check_config(config)
    B, H, T, D = x.shape
    l, d = config.compress_block, config.compress_stride
    if cu_seqlens is not None:
        first, _ = resolve(cu_seqlens, T, x.device, B).compressed_blocks(config)
        tokens = (first[:, None] + torch.arange(l, device=x.device)).flatten()
        return x.index_select(2, tokens).unflatten(2, (first.numel(), l))
    tc = config.num_compressed(T)
    if tc == 0:
        return x.new_zeros(B, H, 0, l, D)
    # unfold puts the window last: (B, H, Tc, D, l).
    return x.unfold(2, l, d).transpose(-1, -2)


def _check_x(x, floating: bool = True) -> None:
    check_tensor("x", x, None, floating)
    if x.dim() != 4:
        raise ValueError(f"x must be (B, H, T, D), got shape {tuple(x.shape)}")


def mean_compress(x: Tensor, config: NSAConfig, cu_seqlens=None) -> Tensor:
    """The mean over each compressed block: ``(B, H, T, D) -> (B, H, Tc, D)``.

    This is what ``attend()`` uses when no ``k_cmp``/``v_cmp`` are given. ``cu_seqlens``: as
    in :func:`block_view` (each document's blocks, concatenated).

    Raises:
        TypeError, ValueError: as :func:`block_view`, and ``TypeError`` if ``x`` is not
            floating point.
    """
    _check_x(x)
    return block_view(x, config, cu_seqlens).mean(dim=-2)


class BlockCompressor(nn.Module):
    """Learned compression ``phi``: an MLP over each block, with an intra-block position embedding.

    ``phi(block) = mean(block) + MLP(flatten(block + pos))``, where ``pos (l, D)`` is a learned
    intra-block position embedding and the MLP is ``Linear(l*D, hidden) -> GELU ->
    Linear(hidden, D)``: the mean keeps the layer close to mean pooling at initialisation, and
    the MLP learns what the mean misses.

    Args:
        dim_head: ``D``, the feature size of the keys or values it compresses.
        config: block length and stride.
        hidden: the MLP's hidden width (default ``dim_head``).
        out_bias: whether the MLP's last layer has a bias. Leave it off for keys: a bias added
            to every compressed key shifts all of a query's compressed scores by the same
            amount, which softmax ignores, so it would never learn.

    Raises:
        TypeError: `dim_head` or `hidden` not an int, `config` not an `NSAConfig`, `out_bias`
            not a bool.
        ValueError: `dim_head` or `hidden` below 1.

    Shapes:
        ``(B, H, T, D) -> (B, H, Tc, D)``; all heads share the parameters.
    """

    def __init__(
        self, dim_head: int, config: NSAConfig, hidden: int | None = None, out_bias: bool = True
    ) -> None:
        super().__init__()
        hidden = dim_head if hidden is None else hidden
        check_int("dim_head", dim_head, 1)
        check_int("hidden", hidden, 1)
        check_config(config)
        check_bool("out_bias", out_bias)
        self.config = config
        self.dim_head = dim_head
        l = config.compress_block
        self.pos = nn.Parameter(torch.randn(l, dim_head) / math.sqrt(dim_head))
        self.mlp = nn.Sequential(
            nn.Linear(l * dim_head, hidden), nn.GELU(), nn.Linear(hidden, dim_head, bias=out_bias)
        )

    def forward(self, x: Tensor, *, cu_seqlens=None) -> Tensor:
        """``(B, H, T, D) -> (B, H, Tc, D)``; ``cu_seqlens`` as in :func:`block_view`.

        Raises:
            TypeError: ``x`` is not a floating tensor, or (outside autocast) not of the
                parameters' dtype.
            ValueError: ``x`` is not 4-D, its head dim is not ``dim_head``, or it is on another
                device than the parameters; ``cu_seqlens`` as for :func:`block_view`.
        """
        _check_x(x)
        if x.shape[-1] != self.dim_head:
            raise ValueError(f"x must have head dim {self.dim_head}, got {x.shape[-1]}")
        if x.device != self.pos.device:
            raise ValueError(f"x is on {x.device} but the module's parameters are on {self.pos.device}")
        if x.dtype != self.pos.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x has dtype {x.dtype} but the module's parameters are {self.pos.dtype}")
        blocks = block_view(x, self.config, cu_seqlens)  # (B, H, Tc, l, D)
        mixed = self.mlp((blocks + self.pos.to(blocks.dtype)).flatten(-2))
        return blocks.mean(dim=-2) + mixed
