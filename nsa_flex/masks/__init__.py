"""NSA's masks for FlexAttention: `mask_mod` factories and the BlockMasks built from them.

- :mod:`.mods`: the `mask_mod` factories (compressed, sliding window, selection, documents),
  small pure functions that compose with a user's own through `and_masks`/`or_masks`.
- :mod:`.block_masks`: BlockMasks of the compressed and window branches (one sequence or a
  packed row) and `block_mask_from_tiles`.
- :mod:`.selected`: the selected branch's BlockMask, from `block_indices`.

`print(block_mask)` draws a BlockMask's tiles. `Q_BLOCK = KV_BLOCK = 128` is the tile of every
BlockMask built here (FlexAttention's default); it and `selection_tile` come from
:mod:`nsa_flex.tuning`, where every tile choice lives.

Each factory returns (or is) a `mask_mod(b, h, q_idx, kv_idx) -> bool tensor`:

| name | true iff |
|---|---|
| `causal_mask` | `kv_idx <= q_idx` |
| `compressed_mask(config)` | `kv_idx*d + l - 1 <= q_idx` (here `kv_idx` is the compressed block's index) |
| `sliding_window_mask(window)` | `q_idx - window < kv_idx <= q_idx` |
| `selection_mask(bits, select_block, group_size=1, doc_start=None)` | `kv_idx <= t` and block `kv_idx // select_block` is selected by query `t` (with `doc_start (T,)`: doc-local blocks, `(kv_idx - doc_start[t]) // select_block`, and `kv_idx >= doc_start[t]`) |
| `document_mask(doc_id)` | `doc_id[q_idx] == doc_id[kv_idx]` (packed documents) |

The BlockMask builders never evaluate a mask over `T x T`: they compute the tiles from integer
arithmetic and call `BlockMask.from_kv_blocks` (or build the lists directly). All take a
`block_size` (default `(Q_BLOCK, KV_BLOCK)`; the selected branch's is smaller) and an optional
user `mask_mod` in token coordinates that is ANDed in (it then makes every tile partial, since
it may cut any of them):

| function | BlockMask shape | notes |
|---|---|---|
| `compressed_block_mask` | `(1, 1, T, Tc)` | the user's `mask_mod` sees block `i` at `i*d + l - 1` |
| `sliding_window_block_mask` | `(1, 1, T, T)` | |
| `selection_block_mask` | `(B, Hkv, T*G, T)` | over folded queries; the user's `mask_mod` in unfolded coordinates `(b, query head, token, key)` |
| `compressed_varlen_block_mask` | `(1, 1, T, Tc)` | packed documents: a query sees its own document's visible blocks |
| `sliding_window_varlen_block_mask` | `(1, 1, T, T)` | the window cut at the query's document start |
| `block_mask_from_tiles` | `(B, H, q_len, kv_len)` | from `(B, H, nQ, nKV)` bool tiles |

`compressed_block_mask` and `sliding_window_block_mask` without a user `mask_mod` are cached
(`functools.lru_cache`, 64 entries each) per (length, config or window, device, tile size)
outside `torch.compile`; inside a compiled graph they are rebuilt. Pass `device=` for CUDA
tensors. An entry takes about `16 * ceil(T/128) * ceil(Tkv/128)` bytes (a window mask: 4 MiB at
`T = 65536`); see [compile.md](compile.md#the-cached-blockmasks) for the bound.

Every factory and builder checks its arguments when called (`TypeError` for a wrong type, bools
included where an int is asked for, `ValueError` for a wrong value, naming the argument), never
inside a `mask_mod`: those bodies are traced by FlexAttention and `torch.compile`. The range
check of `block_indices` reads the device once; like `attend`'s, it is skipped while tracing or
capturing a CUDA graph. (The flex backend builds its masks without it: `attend` has already
checked the selection.)

Reproduce the window and selected branches with the BlockMasks and plain `flex_attention`:

```python
import torch
from torch.nn.attention.flex_attention import flex_attention
import nsa_flex
from nsa_flex import NSAConfig, masks

config = NSAConfig(num_selected=8, window=128)
q, k, v = torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16)

block_mask = masks.sliding_window_block_mask(300, config.window)
print(block_mask.shape)  # (1, 1, 300, 300)
o_swa = flex_attention(q, k, v, block_mask=block_mask)

_, aux = nsa_flex.attend(q, k, v, config=config, return_aux=True)
print(torch.allclose(o_swa, aux.o_swa, atol=1e-6))  # True

sel = masks.selection_block_mask(aux.block_indices, config)  # G = 1 here: rows are tokens
print(sel.shape)  # (1, 2, 300, 300)
print(torch.allclose(flex_attention(q, k, v, block_mask=sel), aux.o_slc, atol=1e-6))  # True
```
"""

from ..tuning import KV_BLOCK, Q_BLOCK, selection_tile
from .block_masks import (
    block_mask_from_tiles,
    compressed_block_mask,
    compressed_varlen_block_mask,
    sliding_window_block_mask,
    sliding_window_varlen_block_mask,
)
from .mods import MaskMod, causal_mask, compressed_mask, document_mask, selection_bits, selection_mask, sliding_window_mask
from .selected import selection_block_mask

__all__ = [
    "causal_mask",
    "compressed_mask",
    "sliding_window_mask",
    "selection_mask",
    "selection_bits",
    "compressed_block_mask",
    "sliding_window_block_mask",
    "selection_block_mask",
    "block_mask_from_tiles",
    "selection_tile",
    "document_mask",
    "compressed_varlen_block_mask",
    "sliding_window_varlen_block_mask",
    "Q_BLOCK",
    "KV_BLOCK",
]
