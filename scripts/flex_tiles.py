"""Probe of FlexAttention's forward tiles for the compressed and window branches on a GPU
(not a test).

    PYTHONPATH=. python scripts/flex_tiles.py [T] [--backward]

The reference shape of docs/semantics.md (B=1, Hq=64, Hkv=4, D=128, bf16, default config). Each
branch's forward (no_grad, as the benchmark times it) through ``torch.compile(flex_attention)``
with the BlockMask the flex backend builds, under ``tuning.flex_tile_options`` (the default)
and under other tiles / warps / stages; do_bench medians and the relative error against the
default's output. With ``--backward``: forward+backward instead, at other backward tiles
(``bwd_``-prefixed options; the forward keeps the default), the compressed branch with one copy
of ``k_cmp``/``v_cmp`` per query head as the library gives it when training.
"""

import sys

import torch
from torch.nn.attention.flex_attention import flex_attention
from triton.testing import do_bench

from nsa_flex import NSAConfig, masks, tuning
from nsa_flex.compression import mean_compress
from nsa_flex.flex.call import room_to_recompile

T = int(sys.argv[1]) if len(sys.argv) > 1 else 65536
B, Hq, Hkv, D = 1, 64, 4, 128
config = NSAConfig()
gen = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(B, h, T, D, device="cuda", generator=gen, dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv))
k_cmp, v_cmp = mean_compress(k, config), mean_compress(v, config)
branches = {
    "compressed": (k_cmp, v_cmp, masks.compressed_block_mask(T, config, device="cuda")),
    "window": (k, v, masks.sliding_window_block_mask(T, config.window, device="cuda")),
}
default = tuning.flex_tile_options(2, D)
print(f"T={T} torch {torch.__version__} {torch.cuda.get_device_name()} default {default}", flush=True)
candidates = [default] + [
    dict(BLOCK_M=m, BLOCK_N=n, fwd_num_warps=w, fwd_num_stages=s)
    for m, n, w, s in ((128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (128, 64, 4, 3), (64, 128, 4, 2))
]
compiled = torch.compile(flex_attention, dynamic=False)
if "--backward" in sys.argv:
    G = Hq // Hkv
    branches["compressed"] = (k_cmp.repeat_interleave(G, 1), v_cmp.repeat_interleave(G, 1), branches["compressed"][2])
    do = torch.randn_like(q)
    candidates = [default] + [
        dict(default, bwd_BLOCK_M1=m1, bwd_BLOCK_N1=n1, bwd_BLOCK_M2=m2, bwd_BLOCK_N2=n2, bwd_num_warps=w, bwd_num_stages=s)
        for m1, n1, m2, n2, w, s in ((64, 128, 128, 64, 8, 3), (32, 128, 128, 32, 4, 3), (64, 64, 64, 64, 4, 3),
                                     (64, 128, 128, 64, 8, 2), (32, 64, 64, 32, 4, 2))
    ]
    with room_to_recompile():
        for name, (kk, vv, mask) in branches.items():
            leaves = [x.clone().requires_grad_() for x in (q, kk, vv)]
            ref = None
            for opts in candidates:
                def call(opts=opts):
                    o = compiled(*leaves, block_mask=mask, enable_gqa=True, kernel_options=opts)
                    return torch.autograd.grad(o, leaves, do)
                try:
                    out = torch.cat([g.float().flatten() for g in call()])
                    ref = out if ref is None else ref
                    err = float((out - ref).norm() / ref.norm())
                    ms = do_bench(call, warmup=10, rep=100, return_mode="median")
                    print(f"{name:10s} fwd+bwd {ms:8.2f} ms  {opts}  rel err {err:.1e}", flush=True)
                except Exception as e:  # noqa: BLE001 - a probe: out of shared memory, say
                    print(f"{name:10s} {opts}: {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
    sys.exit(0)
with torch.no_grad(), room_to_recompile():
    for name, (kk, vv, mask) in branches.items():
        ref = None
        for opts in candidates:
            call = lambda: compiled(q, kk, vv, block_mask=mask, enable_gqa=True, kernel_options=opts)  # noqa: E731
            try:
                out = call().float()
                ref = out if ref is None else ref
                err = float((out - ref).norm() / ref.norm())
                ms = do_bench(call, warmup=25, rep=200, return_mode="median")
                print(f"{name:10s} {ms:8.2f} ms  {opts}  rel err {err:.1e}", flush=True)
            except Exception as e:  # noqa: BLE001 - a probe: out of shared memory, say
                print(f"{name:10s} {opts}: {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
