"""Profile of the Triton selected branch and of the whole layer, on a GPU (a probe, not a test).

    PYTHONPATH=. python scripts/profile_selected.py [T] [--sweep] [--layer]

SPEC's reference shape (B=1, Hq=64, Hkv=4, D=128, bf16), one selection from ``select_blocks``
on random inputs. Prints, as do_bench medians:

- each step of the Triton selected branch apart: forward kernel, ``delta``, dQ kernel, the
  inversion of the selection, dK/dV kernel;
- how unevenly the queries spread over the blocks (the dK/dV kernel gives each block one
  program, which walks that block's queries in turn);
- with ``--sweep``: each kernel at other ``BLOCK_N`` / ``num_warps`` / ``num_stages``, with its
  relative error against the default configuration;
- with ``--layer``: a ``torch.profiler`` table of ``attend`` forward+backward for both backends
  (the ten costliest CUDA kernels each).
"""

import sys

import torch
from triton.testing import do_bench

from nsa_flex import NSAConfig, attend, select_blocks, triton_backend
from nsa_flex.compression import mean_compress
from nsa_flex.triton_kernels import selected_dkdv_kernel, selected_dq_kernel, selected_fwd_kernel

args = [a for a in sys.argv[1:] if not a.startswith("--")]
T = int(args[0]) if args else 65536
B, Hq, Hkv, D = 1, 64, 4, 128
config = NSAConfig()
scale = D**-0.5
gen = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(B, h, T, D, device="cuda", generator=gen, dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv))
do = torch.randn(B, Hq, T, D, device="cuda", generator=gen, dtype=torch.bfloat16)
idx = triton_backend.kernel_indices(select_blocks(q, mean_compress(k, config), config=config), 64, T)
S = lambda x: tuple(x.stride())  # noqa: E731
med = lambda f: do_bench(f, warmup=50, rep=300, return_mode="median")  # noqa: E731
print(f"T={T} torch {torch.__version__} {torch.cuda.get_device_name()}", flush=True)


def fwd(meta):
    o = torch.empty_like(q)
    lse = torch.empty(B, Hq, T, device="cuda", dtype=torch.float32)
    selected_fwd_kernel[(T, B * Hkv)](q, k, v, idx, idx, o, lse, *S(q), *S(k), *S(v), *S(idx), *S(o), *S(lse),
                                      T, Hkv, scale, N_SEL=idx.shape[-1], VARLEN=False, **meta)
    return o, lse


base = triton_backend._meta(Hq // Hkv, D, D, 64, q.dtype)
o, lse = fwd(base)
delta = (do.float() * o.float()).sum(-1).contiguous()


def dq(meta):
    out = torch.empty_like(q)
    selected_dq_kernel[(T, B * Hkv)](q, k, v, idx, idx, do, lse, delta, out, *S(q), *S(k), *S(v), *S(idx), *S(do),
                                     *S(lse), T, Hkv, scale, N_SEL=idx.shape[-1], VARLEN=False, **meta)
    return out


ns = -(-T // 64)
qlist, qstart = triton_backend.invert_selection(idx, ns)


def dkdv(meta):
    chunks = -(-64 // meta["BLOCK_N"])
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    selected_dkdv_kernel[(ns * chunks, B * Hkv)](
        q, k, v, do, lse, delta, qlist, qstart, qstart, qstart, dk, dv, *S(q), *S(k), *S(v), *S(do), *S(lse),
        *S(qlist)[:2], *S(qstart)[:2], T, Hkv, scale, CHUNKS=chunks, VARLEN=False, **meta)
    return dk, dv


counts = (qstart[..., 1:] - qstart[..., :-1]).float()
print(f"queries per block: mean {counts.mean():.0f}, max {counts.max():.0f} (block {int(counts[0, 0].argmax())}), "
      f"blocks over 4x the mean: {(counts > 4 * counts.mean()).sum().item()} of {counts.numel()}", flush=True)
rows = [
    ("forward kernel", lambda: fwd(base)),
    ("delta rowsum(dO*O)", lambda: (do.float() * o.float()).sum(-1)),
    ("dq kernel", lambda: dq(base)),
    ("invert_selection", lambda: triton_backend.invert_selection(idx, ns)),
    ("dkdv kernel", lambda: dkdv(base)),
    ("selected_backward (all)", lambda: triton_backend.selected_backward(q, k, v, idx, o, lse, do, 64, scale)),
]
for name, f in rows:
    print(f"{name:28s} {med(f):8.2f} ms", flush=True)

if "--layer" in sys.argv:
    gates = torch.rand(B, Hq, T, 3, device="cuda", generator=gen, dtype=torch.bfloat16)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, gates)]
    for backend in ("flex", "triton"):
        step = lambda: torch.autograd.grad(attend(*leaves, config=config, backend=backend).float().sum(), leaves)  # noqa: E731
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        print(f"--- layer fwd+bwd, backend={backend}: {med(step):.2f} ms (do_bench median)", flush=True)
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60), flush=True)

if "--sweep" in sys.argv:
    ref = {"fwd": fwd(base)[0].float(), "dq": dq(base).float(), "dkdv": torch.cat(dkdv(base), -1).float()}
    run = {"fwd": lambda m: fwd(m)[0], "dq": dq, "dkdv": lambda m: torch.cat(dkdv(m), -1)}
    for kernel in ("fwd", "dq", "dkdv"):
        results = []
        for block_n in (32, 64):
            for warps in (2, 4, 8):
                for stages in (1, 2, 3):
                    meta = dict(base, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
                    try:
                        out = run[kernel](meta).float()
                        err = float((out - ref[kernel]).norm() / ref[kernel].norm())
                        results.append((med(lambda: run[kernel](meta)), block_n, warps, stages, err))
                    except Exception as e:  # noqa: BLE001 - a probe: out of resources, say
                        print(f"{kernel} BLOCK_N={block_n} warps={warps} stages={stages}: {type(e).__name__}", flush=True)
        results.sort()
        for ms, block_n, warps, stages, err in results[:6]:
            print(f"sweep {kernel:5s} {ms:8.2f} ms  BLOCK_N={block_n} warps={warps} stages={stages} rel err {err:.1e}",
                  flush=True)
