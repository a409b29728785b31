"""# nsa_flex API

DeepSeek's Native Sparse Attention on FlexAttention, with hand-written Triton kernels.
Everything below is importable from `nsa_flex` unless a module is named.
[semantics.md](semantics.md) defines what it computes; [design.md](design.md) says how the code
computes it. This page is generated from the docstrings (`scripts/gen_api_docs.py`).

Notation used throughout:

| symbol | meaning |
|---|---|
| `B` | batch size |
| `Hq`, `Hkv` | query heads and key/value heads; `Hkv` divides `Hq` |
| `G = Hq // Hkv` | query heads per KV head; query head `h` reads KV head `h // G` (SDPA's `enable_gqa` rule) |
| `T` | sequence length (any `T >= 1`) |
| `Dk`, `Dv` | query/key and value head sizes (they may differ) |
| `l`, `d`, `l'`, `n`, `w` | `compress_block`, `compress_stride`, `select_block`, `num_selected`, `window` |
| `Tc = config.num_compressed(T)` | compressed blocks: `(T - l) // d + 1`, or 0 when `T < l` |
| `Ns = config.num_select_blocks(T)` | selection blocks: `ceil(T / l')` |

Attention is causal everywhere: query `t` sees only keys `s <= t`. Inputs are checked before any
kernel runs; a bad argument raises `TypeError` (wrong type or dtype) or `ValueError` (wrong shape,
value, or device), with a message that names the argument.

- `attend` (`nsa_flex.api`): the whole NSA layer as a function; `NSAAux`, `BACKENDS`.
- `SparseAttention` (`nsa_flex.module`): the layer as an `nn.Module` with learned compression
  and gates; `nsa_flex.rotary`, `nsa_flex.buckets`.
- `select_blocks`, `block_scores` (`nsa_flex.selection`): block selection, shared by the
  backends, on `nsa_flex.scoring` (importance) and `nsa_flex.top_n`.
- `NSACache`, `prefill`, `decode_step` (`nsa_flex.inference`): inference with a KV cache.
- `NSAConfig` (`nsa_flex.config`): the hyperparameters.
- `BlockCompressor`, `mean_compress` (`nsa_flex.compression`).
- `nsa_flex.masks`: the branches' mask_mods and BlockMask builders.
- `nsa_flex.reference`: the dense oracle every backend is tested against.
- `nsa_flex.varlen`: packed documents (`cu_seqlens`).
- `nsa_flex.distributed`: context parallelism, one sequence sharded over a process group.
- `nsa_flex.triton_backend`, `nsa_flex.dispatch` (which path each branch takes),
  `nsa_flex.ops` (the custom operators), `nsa_flex.bench`.
"""

from . import masks, reference, varlen
from .api import BACKENDS, NSAAux, attend
from .compression import BlockCompressor, mean_compress
from .config import NSAConfig
from .selection import block_scores, select_blocks
from .inference import NSACache, decode_step, prefill
from .module import SparseAttention

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
