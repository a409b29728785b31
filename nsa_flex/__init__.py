"""nsa_flex: DeepSeek's Native Sparse Attention on FlexAttention.

- :func:`attend`: the whole NSA layer as a function.
- :class:`SparseAttention`: the layer as an ``nn.Module`` with learned compression and gates.
- :func:`select_blocks`: importance scores and top-n block selection, shared by backends;
  :func:`block_scores`: the same scores, differentiably.
- :class:`NSACache`, :func:`prefill`, :func:`decode_step`: inference with a KV cache.
- :class:`NSAConfig`: the hyperparameters.
- :mod:`nsa_flex.masks`: the branches' mask_mods and BlockMask builders.
- :mod:`nsa_flex.reference`: the dense oracle every backend is tested against.
- :mod:`nsa_flex.varlen`: packed documents (``cu_seqlens``).
"""

from . import masks, reference, varlen
from .api import BACKENDS, NSAAux, attend
from .compression import BlockCompressor, mean_compress
from .config import NSAConfig
from .selection import block_scores, select_blocks
from .module import SparseAttention
from .cache import NSACache, decode_step, prefill

__all__ = [
    "attend",
    "NSAAux",
    "BACKENDS",
    "NSAConfig",
    "SparseAttention",
    "NSACache",
    "prefill",
    "decode_step",
    "BlockCompressor",
    "mean_compress",
    "select_blocks",
    "block_scores",
    "masks",
    "reference",
    "varlen",
]

__version__ = "0.1.0"
