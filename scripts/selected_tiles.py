"""One-off probe: the flex backend's selected branch at several BlockMask tile sizes.

    PYTHONPATH=. python scripts/selected_tiles.py [T]

The reference shape of docs/semantics.md (B=1, Hq=64, Hkv=4, D=128, bf16), one selection from
select_blocks on random inputs. For each (Q tile, KV tile): the BlockMask build time, the
relative error of the output against the triton backend, forward and forward+backward (do_bench
medians, mask build included, as attend() pays it). Forward+backward runs once, at the default
path (for bf16 training: FlexAttention's forward over one-token tiles, the Triton backward).
"""

import sys

import torch
from triton.testing import do_bench

from nsa_flex import NSAConfig, dispatch, masks, select_blocks, triton_backend, tuning
from nsa_flex.api import _selected_branch
from nsa_flex.compression import mean_compress

T = int(sys.argv[1]) if len(sys.argv) > 1 else 65536
B, Hq, Hkv, D = 1, 64, 4, 128
config = NSAConfig()
scale = D**-0.5
gen = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(B, h, T, D, device="cuda", generator=gen, dtype=torch.bfloat16).requires_grad_() for h in (Hq, Hkv, Hkv))
idx = select_blocks(q.detach(), mean_compress(k.detach(), config), config=config)
with torch.no_grad():
    ref = triton_backend.selected_attention(q, k, v, idx, config.select_block, scale)[0].float()
print(f"T={T} torch {torch.__version__}", flush=True)
# the flex branch takes its tile from tuning.selection_tile (through flex_selected_tile): patch
# that one (patching masks' re-export would leave every row at the default tile)
default_tile = tuning.selection_tile
for tile in [(16, 64), (32, 64), (64, 64), (128, 64), (128, 128)]:
    tuning.selection_tile = lambda G, c, tile=tile: tile
    try:
        build = do_bench(lambda: masks.selection_block_mask(idx, config, group_size=Hq // Hkv, block_size=tile, transposed=False),
                         return_mode="median")
        fwd = lambda: _selected_branch(q, k, v, idx, config, scale, backend="flex")
        with torch.no_grad():
            err = float((fwd().float() - ref).norm() / ref.norm())
            t_f = do_bench(fwd, return_mode="median")
        print(f"tile {tile}: build {build:.2f} ms  rel err {err:.1e}  fwd {t_f:.2f} ms", flush=True)
    except Exception as e:  # noqa: BLE001 - a probe: record and go on
        print(f"tile {tile}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
tuning.selection_tile = default_tile
fb = lambda: torch.autograd.grad(_selected_branch(q, k, v, idx, config, scale, backend="flex").float().sum(), (q, k, v))
print(f"default path fwd+bwd {do_bench(fb, return_mode='median'):.2f} ms", flush=True)
with torch.no_grad():
    t_tri = do_bench(lambda: triton_backend.selected_attention(q, k, v, idx, 64, scale), return_mode="median")
t_tri_fb = do_bench(lambda: torch.autograd.grad(triton_backend.selected_attention(q, k, v, idx, 64, scale)[0].float().sum(), (q, k, v)), return_mode="median")
print(f"triton: fwd {t_tri:.2f} ms  fwd+bwd {t_tri_fb:.2f} ms", flush=True)
k_cmp = mean_compress(k.detach(), config)
t_sel = do_bench(lambda: select_blocks(q.detach(), k_cmp, config=config), return_mode="median")
scoring_path = dispatch.scoring_path
dispatch.scoring_path = lambda *a: "torch"
t_sel_torch = do_bench(lambda: select_blocks(q.detach(), k_cmp, config=config), return_mode="median")
dispatch.scoring_path = scoring_path
print(f"select_blocks: fused kernel {t_sel:.2f} ms, torch chunks {t_sel_torch:.2f} ms", flush=True)
