"""NSA hyperparameters (``NSAConfig``) and the sizes derived from them."""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["NSAConfig"]


@dataclass(frozen=True)
class NSAConfig:
    """Hyperparameters of Native Sparse Attention; the defaults are the paper's.

    Args:
        compress_block: ``l``, tokens per compressed block.
        compress_stride: ``d``, stride between compressed blocks; divides ``compress_block``
            and ``select_block``.
        select_block: ``l'``, tokens per selection block.
        num_selected: ``n``, blocks each query attends in the selected branch, forced ones
            included.
        num_initial: leading selection blocks every query always selects.
        num_local: most recent selection blocks (the query's own and those before it) every
            query always selects.
        window: ``w``, sliding-window length, the query itself included.

    Raises:
        ValueError: naming the field, if a value is not a positive integer (``num_initial``
            and ``num_local`` may be 0), if ``compress_stride`` does not divide
            ``compress_block`` or ``select_block``, or if
            ``num_initial + num_local > num_selected``.
        TypeError: if a field is not an ``int``.

    The config is frozen and hashable, so it can key caches and be a ``torch.compile``
    constant.
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
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"NSAConfig.{f.name} must be an int, got {type(value).__name__}")
            minimum = 0 if f.name in ("num_initial", "num_local") else 1
            if value < minimum:
                raise ValueError(f"NSAConfig.{f.name} must be >= {minimum}, got {value}")
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
        """``Tc``: how many compressed blocks a sequence of ``seq_len`` tokens has."""
        if seq_len < self.compress_block:
            return 0
        return (seq_len - self.compress_block) // self.compress_stride + 1

    def num_select_blocks(self, seq_len: int) -> int:
        """``Ns``: how many selection blocks cover ``seq_len`` tokens (the last may be partial)."""
        return -(-seq_len // self.select_block)
