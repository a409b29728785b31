"""NSA hyperparameters (``NSAConfig``) and the sizes and positions derived from them.

The compressed block's rule is written here once: block ``i`` covers tokens ``i*d ..
i*d + l - 1`` and becomes visible at its last token (:meth:`NSAConfig.compressed_last_token`),
so a query at ``t`` sees :meth:`NSAConfig.num_visible_compressed` of them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ._validation import check_int

__all__ = ["NSAConfig"]


def num_select_blocks(seq_len, select_block: int):
    """``Ns = ceil(seq_len / select_block)``: the selection blocks covering ``seq_len`` tokens
    (the last may be partial). An int, or a tensor of lengths."""
    return -(-seq_len // select_block)


@dataclass(frozen=True)
class NSAConfig:
    """Hyperparameters of Native Sparse Attention; the defaults are the paper's.

    Args:
        compress_block: `l`, tokens per compressed block; block `i` covers tokens
            `[i*d, i*d + l - 1]`.
        compress_stride: `d`, stride between compressed blocks; divides `compress_block` and
            `select_block`.
        select_block: `l'`, tokens per selection block; block `j` covers `[j*l', (j+1)*l' - 1]`.
        num_selected: `n`, blocks each query attends in the selected branch, forced ones
            included.
        num_initial: leading selection blocks every query always selects (`0 .. num_initial-1`).
        num_local: most recent selection blocks (the query's own and those before it) every
            query always selects.
        window: `w`, sliding-window length, the query itself included.

    Raises:
        TypeError: naming the field, if a value is not an `int` (a `bool` is refused).
        ValueError: naming the field, if a value is below 1 (`num_initial` and `num_local` may
            be 0), if `compress_stride` does not divide `compress_block` or `select_block`, or
            if `num_initial + num_local > num_selected`.

    The config is a frozen dataclass: hashable, so it keys caches and is a constant under
    `torch.compile`. `num_compressed(seq_len)` is `Tc`, `num_select_blocks(seq_len)` is `Ns`;
    `compressed_last_token(i)` and `num_visible_compressed(t)` state the compressed block's
    visibility rule, which every branch and kernel follows.

    ```python
    from nsa_flex import NSAConfig

    config = NSAConfig()
    print(config.num_compressed(1000), config.num_select_blocks(1000))  # 61 16
    print(config.num_compressed(31))                                     # 0
    try:
        NSAConfig(compress_stride=24)
    except ValueError as e:
        print(e)  # NSAConfig.compress_stride (24) must divide compress_block (32)
    ```
    """

    compress_block: int = 32
    compress_stride: int = 16
    select_block: int = 64
    num_selected: int = 16
    num_initial: int = 1
    num_local: int = 2
    window: int = 512

    def __post_init__(self) -> None:
        for f in fields(self):
            check_int(f"NSAConfig.{f.name}", getattr(self, f.name), 0 if f.name in ("num_initial", "num_local") else 1)
        d = self.compress_stride
        if self.compress_block % d:
            raise ValueError(
                f"NSAConfig.compress_stride ({d}) must divide compress_block ({self.compress_block})"
            )
        if self.select_block % d:
            raise ValueError(
                f"NSAConfig.compress_stride ({d}) must divide select_block ({self.select_block})"
            )
        if self.num_initial + self.num_local > self.num_selected:
            raise ValueError(
                f"NSAConfig.num_initial + num_local ({self.num_initial} + {self.num_local}) "
                f"must not exceed num_selected ({self.num_selected})"
            )

    def num_compressed(self, seq_len: int) -> int:
        """``Tc``: how many compressed blocks a sequence of ``seq_len`` tokens has (those visible
        to its last token, ``num_visible_compressed(seq_len - 1)``)."""
        if seq_len < self.compress_block:
            return 0
        return (seq_len - self.compress_block) // self.compress_stride + 1

    def num_select_blocks(self, seq_len: int) -> int:
        """``Ns``: how many selection blocks cover ``seq_len`` tokens (the last may be partial)."""
        return num_select_blocks(seq_len, self.select_block)

    def compressed_last_token(self, i):
        """The last token ``i*d + l - 1`` of compressed block ``i`` (an int or an integer tensor):
        the position at which the block becomes visible, and at which a user's mods see it."""
        return i * self.compress_stride + (self.compress_block - 1)

    def num_visible_compressed(self, t):
        """How many compressed blocks a query at ``t`` sees: those whose last token is ``<= t``,
        ``floor((t - l + 1) / d) + 1``, at least 0 (an int, or an integer tensor)."""
        if isinstance(t, int):
            return max(0, (t - (self.compress_block - 1)) // self.compress_stride + 1)
        return ((t - (self.compress_block - 1)) // self.compress_stride + 1).clamp_min(0)


def check_config(config, name: str = "config") -> NSAConfig:
    """``config`` itself: an :class:`NSAConfig` (where one is required; see :func:`resolve_config`)."""
    if not isinstance(config, NSAConfig):
        raise TypeError(f"{name} must be an NSAConfig, got {type(config).__name__}")
    return config


def resolve_config(config) -> NSAConfig:
    """An optional ``config``: ``None`` is ``NSAConfig()``."""
    if config is None:
        return NSAConfig()
    return check_config(config)
