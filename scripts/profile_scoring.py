"""Probe of block selection on a GPU (not a test): the Triton scoring and top-n kernels.

    PYTHONPATH=. python scripts/profile_scoring.py [T] [--sweep]

The reference shape of docs/semantics.md (B=1, Hq=64, Hkv=4, D=128, bf16). Prints do_bench medians
of ``select_blocks`` (scoring kernel with its own log-sum-exp pass), of the same with the
compressed branch's log-sum-exp handed in (as ``attend`` does), of each kernel alone, of the
PyTorch top-n it replaced, and with ``--sweep`` the scoring kernel at other row tiles / warps /
stages and the top-n kernel at other warps, each checked to pick blocks of the same scores.
"""

import sys

import torch
from triton.testing import do_bench

from nsa_flex import NSAConfig, select_blocks, selection, tuning
from nsa_flex.compression import mean_compress
from nsa_flex.flex import compressed_branch
from nsa_flex.kernels.scoring import block_scores_kernel
from nsa_flex.kernels.top_n import top_n_kernel
from nsa_flex.top_n import top_n_blocks

args = [a for a in sys.argv[1:] if not a.startswith("--")]
T = int(args[0]) if args else 65536
B, Hq, Hkv, D = 1, 64, 4, 128
G = Hq // Hkv
config = NSAConfig()
scale = D**-0.5
gen = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(B, h, T, D, device="cuda", generator=gen, dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv))
k_cmp, v_cmp = mean_compress(k, config), mean_compress(v, config)
med = lambda f: do_bench(f, warmup=25, rep=200, return_mode="median")  # noqa: E731
print(f"T={T} torch {torch.__version__} {torch.cuda.get_device_name()}", flush=True)

with torch.no_grad():
    o_cmp, lse = compressed_branch(q, k_cmp, v_cmp, config, scale, return_lse=True)
ns, tc = config.num_select_blocks(T), k_cmp.shape[2]
block_c, step = tuning.score_tiles(config)
scores = torch.empty(B, Hkv, T, ns, device="cuda", dtype=torch.float32)


def score(lse_in=None, block_t=4, warps=4, stages=2):
    block_g = tuning.pow2(G, least=1)
    block_t = max(1, block_t)
    block_scores_kernel[(-(-T // block_t), B * Hkv)](
        q, k_cmp, scores, q if lse_in is None else lse_in, *q.stride(), *k_cmp.stride(), *scores.stride(),
        *((0, 0, 0) if lse_in is None else lse_in.stride()), tc, ns, Hkv, 0, T, scale * tuning.LOG2E,
        G=G, CMP_BLOCK=config.compress_block, CMP_STRIDE=config.compress_stride, SEL_BLOCK=config.select_block,
        N_INITIAL=config.num_initial, N_LOCAL=config.num_local, DK=D, BLOCK_DK=D, BLOCK_T=block_t, BLOCK_G=block_g,
        BLOCK_C=block_c, BLOCK_S=tuning.pow2(step), SEL_STEP=step, IEEE=False, HAS_LSE=lse_in is not None,
        num_warps=warps, num_stages=stages,
    )
    return scores


def top_n(warps=None):
    out = torch.empty(B, Hkv, T, config.num_selected, device="cuda", dtype=torch.int32)
    block_ns = tuning.pow2(min(ns, tuning.KEYS_IN_REGISTERS))
    top_n_kernel[(T, B * Hkv)](
        scores, out, *scores.stride(), *out.stride(), ns, Hkv, 0, SEL_BLOCK=config.select_block,
        N_SEL=config.num_selected, BLOCK_SEL=16, BLOCK_NS=block_ns, ONE_TILE=ns <= block_ns,
        num_warps=warps or tuning.top_n_warps(block_ns),
    )
    return out


def picked(idx, ref_scores):
    vals = ref_scores.gather(-1, idx.clamp_min(0).long()).masked_fill(idx < 0, -1.0)
    return vals.sort(-1).values


rows = [
    ("select_blocks (own lse pass)", lambda: select_blocks(q, k_cmp, config=config)),
    ("select with the branch's lse", lambda: selection._select_row(q, k_cmp, config, scale, None, None, None, "triton", lse)),
    ("compressed branch + its lse", lambda: compressed_branch(q, k_cmp, v_cmp, config, scale, return_lse=True)),
    ("scores kernel, two passes", lambda: score()),
    ("scores kernel, lse given", lambda: score(lse)),
    ("top-n kernel", lambda: top_n()),
    ("torch top-n (before)", lambda: top_n_blocks(scores, config)),
]
for name, f in rows:
    print(f"{name:32s} {med(f):8.2f} ms", flush=True)
ref = score().clone()
finite = ref.masked_fill(~torch.isfinite(ref), 0)
base = picked(top_n_blocks(ref, config), finite)
err = (picked(selection._select_row(q, k_cmp, config, scale, None, None, None, "triton", lse), finite) - base).abs().max()
print(f"select with lse vs without: largest difference of picked scores {err:.2e}", flush=True)

if "--sweep" in sys.argv:
    for use_lse in (False, True):
        for block_t in (2, 4, 8):
            for warps in (4, 8):
                for stages in (1, 2, 3):
                    cfg = dict(block_t=block_t, warps=warps, stages=stages)
                    try:
                        got = score(lse if use_lse else None, **cfg)
                        e = float(((got - ref).nan_to_num(0, 0, 0)).abs().max())
                        ms = med(lambda: score(lse if use_lse else None, **cfg))
                        print(f"sweep scores lse={use_lse}: {ms:8.2f} ms {cfg} max abs diff {e:.1e}", flush=True)
                    except Exception as ex:  # noqa: BLE001 - a probe
                        print(f"sweep scores lse={use_lse} {cfg}: {type(ex).__name__}", flush=True)
    score()
    for warps in (1, 2, 4, 8):
        same = torch.equal(top_n(warps), top_n())
        print(f"sweep top-n num_warps={warps}: {med(lambda: top_n(warps)):8.2f} ms, same picks {same}", flush=True)
