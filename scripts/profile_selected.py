"""Profile of the Triton selected branch and of the whole layer, on a GPU (a probe, not a test).

    PYTHONPATH=. python scripts/profile_selected.py [T] [--sweep[=fwd,dq,dkdv]]

The reference shape of docs/semantics.md (B=1, Hq=64, Hkv=4, D=128, bf16), one selection from
``select_blocks`` on random inputs. Prints, as do_bench medians:

- each step of the Triton selected branch apart: forward kernel, dQ kernel (which also writes
  ``delta = rowsum(dO * O)``), the
  inversion of the selection, the dK/dV kernels (``ops.selected.launch_dkdv``: segment tables,
  partial sums of long lists, per-block sums);
- how unevenly the queries spread over the blocks, and how the dK/dV pass cuts the lists
  (segment size, scratch slots used of those allotted, scratch size);
- the peak memory of ``launch_selected_backward`` (outputs, ``delta``, the inversion, the dK/dV
  scratch);
- with ``--sweep`` (``--sweep=dkdv`` for some kernels only): each kernel at other ``BLOCK_N`` /
  ``num_warps`` / ``num_stages`` (dK/dV: also ``BLOCK_R`` rows a step, and the segment size),
  with its relative error against the default configuration;
- (the whole layer's profile, at any shape, is ``scripts/profile_layer.py``; it replaced this
  script's ``--layer``).
"""

import sys

import torch
from triton.testing import do_bench

from nsa_flex import NSAConfig, select_blocks, tuning
from nsa_flex.block_indices import kernel_indices
from nsa_flex.compression import mean_compress
from nsa_flex.kernels.selected import selected_dq_kernel, selected_fwd_kernel
from nsa_flex.ops import selected as ops_selected

args = [a for a in sys.argv[1:] if not a.startswith("--")]
T = int(args[0]) if args else 65536
B, Hq, Hkv, D = 1, 64, 4, 128
config = NSAConfig()
scale = D**-0.5
gen = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(B, h, T, D, device="cuda", generator=gen, dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv))
do = torch.randn(B, Hq, T, D, device="cuda", generator=gen, dtype=torch.bfloat16)
idx = kernel_indices(select_blocks(q, mean_compress(k, config), config=config), 64, T)
S = lambda x: tuple(x.stride())  # noqa: E731
med = lambda f: do_bench(f, warmup=50, rep=300, return_mode="median")  # noqa: E731
print(f"T={T} torch {torch.__version__} {torch.cuda.get_device_name()}", flush=True)


def fwd(meta):
    o = torch.empty_like(q)
    lse = torch.empty(B, Hq, T, device="cuda", dtype=torch.float32)
    selected_fwd_kernel[(T, B * Hkv)](q, k, v, idx, idx, o, lse, *S(q), *S(k), *S(v), *S(idx), *S(o), *S(lse),
                                      T, Hkv, scale, N_SEL=idx.shape[-1], VARLEN=False, **meta)
    return o, lse


base = {kernel: tuning.selected_kernel_meta(Hq // Hkv, D, D, 64, q.dtype, kernel) for kernel in ("fwd", "dq", "dkdv")}
print("settings:", {kernel: {k: m[k] for k in ("BLOCK_N", "BLOCK_R", "num_warps", "num_stages") if k in m}
                    for kernel, m in base.items()}, flush=True)
o, lse = fwd(base["fwd"])
delta = (do.float() * o.float()).sum(-1).contiguous()


def dq(meta):
    out = torch.empty_like(q)
    selected_dq_kernel[(T, B * Hkv)](q, k, v, idx, idx, do, o, lse, torch.empty_like(delta), out, *S(q), *S(k), *S(v),
                                     *S(idx), *S(do), *S(o), *S(lse), T, Hkv, scale, N_SEL=idx.shape[-1], VARLEN=False,
                                     **meta)
    return out


ns = -(-T // 64)
qlist, qstart = ops_selected.invert_selection(idx, ns)


def dkdv(meta, segment=None):
    return ops_selected.launch_dkdv(q, k, v, do, lse, delta, qlist, qstart, 64, scale, meta=meta, segment=segment)


counts = (qstart[..., 1:] - qstart[..., :-1]).float()
print(f"queries per block: mean {counts.mean():.0f}, max {counts.max():.0f} (block {int(counts[0, 0].argmax())}), "
      f"blocks over 4x the mean: {(counts > 4 * counts.mean()).sum().item()} of {counts.numel()}", flush=True)
segment = tuning.dkdv_segment(qlist.shape[-1])
slots, slot_block = ops_selected._segments(qstart, qlist.shape[-1], segment)
scratch = B * Hkv * slot_block.shape[-1] * 64 * 2 * D * 4
print(f"dK/dV segments of {segment} queries: scratch slots used {slots[..., -1].tolist()} of {slot_block.shape[-1]} "
      f"per head, scratch {scratch / 2**20:.0f} MiB", flush=True)
rows = [
    ("forward kernel", lambda: fwd(base["fwd"])),
    ("dq kernel (and delta)", lambda: dq(base["dq"])),
    ("invert_selection", lambda: ops_selected.invert_selection(idx, ns)),
    ("dkdv (tables + kernels)", lambda: dkdv(base["dkdv"])),
    ("selected_backward (all)", lambda: ops_selected.launch_selected_backward(q, k, v, idx, o, lse, do, 64, scale)),
]
for name, f in rows:
    print(f"{name:28s} {med(f):8.2f} ms", flush=True)
torch.cuda.synchronize()
before = torch.cuda.memory_allocated()
torch.cuda.reset_peak_memory_stats()
ops_selected.launch_selected_backward(q, k, v, idx, o, lse, do, 64, scale)
torch.cuda.synchronize()
print(f"selected_backward peak memory above its inputs: {(torch.cuda.max_memory_allocated() - before) / 2**20:.0f} MiB",
      flush=True)

sweep = next((a for a in sys.argv if a.startswith("--sweep")), None)
if sweep:
    kernels = sweep.split("=", 1)[1].split(",") if "=" in sweep else ["fwd", "dq", "dkdv"]
    run = {"fwd": lambda m: fwd(m)[0], "dq": dq, "dkdv": lambda m: torch.cat(dkdv(m), -1)}
    ref = {kernel: run[kernel](base[kernel]).float() for kernel in kernels}
    grids = {
        "fwd": [dict(BLOCK_N=n, num_warps=w, num_stages=s) for n in (16, 32, 64) for w in (2, 4, 8) for s in (1, 2, 3)],
        "dkdv": [dict(BLOCK_N=n, BLOCK_R=r, num_warps=w, num_stages=s)
                 for n in (32, 64) for r in (32, 64, 128) for w in (4, 8) for s in (1, 2, 3)],
    }
    grids["dq"] = grids["fwd"]
    for kernel in kernels:
        results = []
        for change in grids[kernel]:
            meta = dict(base[kernel], **change)
            try:
                out = run[kernel](meta).float()
                err = float((out - ref[kernel]).norm() / ref[kernel].norm())
                results.append((med(lambda: run[kernel](meta)), change, err))
            except Exception as e:  # noqa: BLE001 - a probe: out of resources, say
                print(f"{kernel} {change}: {type(e).__name__}", flush=True)
        results.sort(key=lambda r: r[0])
        for ms, change, err in results[:6]:
            print(f"sweep {kernel:5s} {ms:8.2f} ms  {change} rel err {err:.1e}", flush=True)
    for seg in (256, 512, 1024, 2048, 4096, 8192) if "dkdv" in kernels else ():
        out = torch.cat(dkdv(base["dkdv"], seg), -1).float()
        err = float((out - ref["dkdv"]).norm() / ref["dkdv"].norm())
        mib = B * Hkv * (qlist.shape[-1] // seg) * 64 * 2 * D * 4 / 2**20
        print(f"sweep dkdv segment {seg:5d}: {med(lambda: dkdv(base['dkdv'], seg)):8.2f} ms, scratch {mib:.0f} MiB, "
              f"rel err {err:.1e}", flush=True)
