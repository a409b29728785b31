"""Probe (GPU, not a test): the selected branch's forward and dQ kernels at one shape, at other
warps/stages (one warp included), beside a variant of the forward that loads K/V tiles through
TMA tensor descriptors (Hopper's bulk copy engine) instead of pointer arithmetic.

    PYTHONPATH=. python scripts/probe_selected_tma.py [--shape B,Hq,Hkv,D] [--seq-len T]

Each variant's output is compared with the library's kernel (relative error) before it is timed.
"""

import argparse

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from nsa_flex import NSAConfig, select_blocks, tuning
from nsa_flex.block_indices import kernel_indices
from nsa_flex.compression import mean_compress
from nsa_flex.kernels.selected import selected_dq_kernel, selected_fwd_kernel

ap = argparse.ArgumentParser()
ap.add_argument("--shape", default="1,64,4,128")
ap.add_argument("--seq-len", type=int, default=65536)
a = ap.parse_args()
B, Hq, Hkv, D = (int(x) for x in a.shape.split(","))
T, G = a.seq_len, Hq // Hkv
config = NSAConfig()
scale = D**-0.5
gen = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(B, h, T, D, device="cuda", generator=gen, dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv))
do = torch.randn(B, Hq, T, D, device="cuda", generator=gen, dtype=torch.bfloat16)
idx = kernel_indices(select_blocks(q, mean_compress(k, config), config=config), 64, T)
S = lambda x: tuple(x.stride())  # noqa: E731
med = lambda f: do_bench(f, warmup=25, rep=200, return_mode="median")  # noqa: E731
print(f"B={B} Hq={Hq} Hkv={Hkv} D={D} T={T} torch {torch.__version__} triton {triton.__version__}", flush=True)


def fwd(meta):
    o = torch.empty_like(q)
    lse = torch.empty(B, Hq, T, device="cuda", dtype=torch.float32)
    selected_fwd_kernel[(T, B * Hkv)](q, k, v, idx, idx, o, lse, *S(q), *S(k), *S(v), *S(idx), *S(o), *S(lse),
                                      T, Hkv, scale, N_SEL=idx.shape[-1], VARLEN=False, **meta)
    return o, lse


base = {kk: tuning.selected_kernel_meta(G, D, D, 64, q.dtype, kk) for kk in ("fwd", "dq")}
o_ref, lse_ref = fwd(base["fwd"])
delta = (do.float() * o_ref.float()).sum(-1).contiguous()


def dq(meta):
    out = torch.empty_like(q)
    selected_dq_kernel[(T, B * Hkv)](q, k, v, idx, idx, do, o_ref, lse_ref, torch.empty_like(delta), out, *S(q), *S(k),
                                     *S(v), *S(idx), *S(do), *S(o_ref), *S(lse_ref), T, Hkv, scale,
                                     N_SEL=idx.shape[-1], VARLEN=False, **meta)
    return out


dq_ref = dq(base["dq"])
rel = lambda x, r: float((x.float() - r.float()).norm() / r.float().norm())  # noqa: E731
print(f"default fwd {med(lambda: fwd(base['fwd'])):.2f} ms {base['fwd']['BLOCK_N'], base['fwd']['num_warps'], base['fwd']['num_stages']}")
print(f"default dq  {med(lambda: dq(base['dq'])):.2f} ms", flush=True)
for name, run, ref, b in (("fwd", lambda m: fwd(m)[0], o_ref, base["fwd"]), ("dq", dq, dq_ref, base["dq"])):
    res = []
    for n in (32, 64):
        for w in (1, 2, 4):
            for st in (1, 2, 3):
                m = dict(b, BLOCK_N=n, num_warps=w, num_stages=st)
                try:
                    err = rel(run(m), ref)
                    res.append((med(lambda: run(m)), n, w, st, err))
                except Exception as e:  # noqa: BLE001
                    print(f"{name} {n, w, st}: {type(e).__name__}", flush=True)
    res.sort()
    for r in res[:5]:
        print(f"sweep {name}: {r[0]:.2f} ms BLOCK_N={r[1]} warps={r[2]} stages={r[3]} rel err {r[4]:.1e}", flush=True)


@triton.jit
def tma_fwd_kernel(Q, K, V, IDX, O, LSE, T, Hkv, scale, sib, sih, sit,
                   G: tl.constexpr, N_SEL: tl.constexpr, SEL_BLOCK: tl.constexpr, D: tl.constexpr,
                   BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hkv
    h = bh % Hkv
    # q, o: (B * Hq, T, D) boxes of BLOCK_G heads at one position; k, v: (B * Hkv * T, D) rows
    q = Q.load([b * Hkv * G + h * G, t, 0]).reshape(BLOCK_G, D)
    n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    row0 = bh * T
    for slot in range(N_SEL):
        j = tl.load(IDX + b * sib + h * sih + t * sit + slot)
        if j >= 0:
            for off in tl.static_range(0, SEL_BLOCK, BLOCK_N):
                s_pos = j * SEL_BLOCK + off + n
                vis = s_pos <= t
                kt = K.load([row0 + j * SEL_BLOCK + off, 0])
                vt = V.load([row0 + j * SEL_BLOCK + off, 0])
                vt = tl.where(vis[:, None], vt, 0.0)
                s = tl.dot(q, tl.trans(kt))
                s = tl.where(vis[None, :], s * scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp(m_i - m_safe)
                p = tl.exp(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
                m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    g = tl.arange(0, BLOCK_G)
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    o_ptr = O + ((b * Hkv * G + h * G + g).to(tl.int64)[:, None] * T + t) * D + tl.arange(0, D)[None, :]
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=(g < G)[:, None])
    tl.store(LSE + (b * Hkv * G + h * G + g).to(tl.int64) * T + t, lse, mask=g < G)


try:
    from triton.tools.tensor_descriptor import TensorDescriptor

    block_g = tuning.pow2(G)
    for n_keys in (32, 64):
        for w in (1, 2, 4):
            for st in (1, 2, 3):
                def tma(n_keys=n_keys, w=w, st=st):
                    o = torch.empty_like(q)
                    lse = torch.empty(B, Hq, T, device="cuda", dtype=torch.float32)
                    dq_ = TensorDescriptor.from_tensor(q.view(B * Hq, T, D), (block_g, 1, D))
                    dk_ = TensorDescriptor.from_tensor(k.view(B * Hkv * T, D), (n_keys, D))
                    dv_ = TensorDescriptor.from_tensor(v.view(B * Hkv * T, D), (n_keys, D))
                    tma_fwd_kernel[(T, B * Hkv)](dq_, dk_, dv_, idx, o, lse, T, Hkv, scale, *S(idx)[:3], G=G,
                                                 N_SEL=idx.shape[-1], SEL_BLOCK=64, D=D, BLOCK_G=block_g,
                                                 BLOCK_N=n_keys, num_warps=w, num_stages=st)
                    return o
                try:
                    err = rel(tma(), o_ref)
                    print(f"tma fwd: {med(tma):.2f} ms BLOCK_N={n_keys} warps={w} stages={st} rel err {err:.1e}", flush=True)
                except Exception as e:  # noqa: BLE001
                    print(f"tma fwd {n_keys, w, st}: {type(e).__name__}: {str(e)[:200]}", flush=True)
except ImportError as e:
    print(f"no TensorDescriptor: {e}")
