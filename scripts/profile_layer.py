"""Where the whole layer's time goes, at any shape, one row or packed (a GPU probe, not a test).

    PYTHONPATH=. python scripts/profile_layer.py [--shape B,Hq,Hkv,D] [--seq-len T]
        [--docs N] [--backends triton flex] [--rows 14] [--no-sdpa]

For each backend: do_bench medians of ``attend`` forward (no_grad) and forward+backward, the
peak memory of forward+backward above the inputs, and a ``torch.profiler`` table of the costliest
CUDA kernels of each. ``--docs N`` packs the row with N documents of random lengths (seeded;
``cu_seqlens`` built once, outside the timings, as a model would). SDPA cuDNN full causal (per
document when packed) is timed beside, for the ratio.
"""

import argparse

import torch
from torch.nn.functional import scaled_dot_product_attention as sdpa
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from nsa_flex import NSAConfig, attend, varlen

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--shape", default="1,64,4,128", help="B,Hq,Hkv,D (default: %(default)s, the reference shape)")
ap.add_argument("--seq-len", type=int, default=65536, help="T (default: %(default)s)")
ap.add_argument("--docs", type=int, default=0, help="pack the row with this many documents (default: one sequence)")
ap.add_argument("--backends", nargs="+", default=["triton", "flex"], choices=["triton", "flex"])
ap.add_argument("--rows", type=int, default=14, help="kernels per profiler table (default: %(default)s)")
ap.add_argument("--no-sdpa", action="store_true", help="skip the SDPA cuDNN row")
ap.add_argument("--cprofile", action="store_true", help="also print cProfile's costliest host functions of one forward")
a = ap.parse_args()
B, Hq, Hkv, D = (int(x) for x in a.shape.split(","))
T = a.seq_len
config = NSAConfig()
gen = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(B, h, T, D, device="cuda", generator=gen, dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv))
gates = torch.rand(B, Hq, T, 3, device="cuda", generator=gen, dtype=torch.bfloat16)
leaves = [x.clone().requires_grad_() for x in (q, k, v, gates)]
docs = None
if a.docs:
    cuts = torch.randperm(T - 1, generator=torch.Generator().manual_seed(0))[: a.docs - 1] + 1
    bounds = [0, *sorted(int(c) for c in cuts), T]
    docs = varlen.documents(torch.tensor(bounds, dtype=torch.int32, device="cuda"))
    print(f"documents: {[b - a_ for a_, b in zip(bounds[:-1], bounds[1:])]}")
med = lambda f: do_bench(f, warmup=10, rep=100, return_mode="median")  # noqa: E731
print(f"B={B} Hq={Hq} Hkv={Hkv} D={D} T={T} torch {torch.__version__} {torch.cuda.get_device_name()}", flush=True)


def report(name, fwd, step):
    for what, fn in (("forward (no_grad)", fwd), ("fwd+bwd", step)):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        print(f"--- {name} {what}: {med(fn):.2f} ms (do_bench median), peak {peak:.0f} MiB above the inputs", flush=True)
        if a.rows:
            print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=a.rows,
                                            max_name_column_width=70), flush=True)


for backend in a.backends:
    def fwd(backend=backend):
        with torch.no_grad():
            return attend(*leaves, config=config, backend=backend, cu_seqlens=docs)

    def step(backend=backend):
        out = attend(*leaves, config=config, backend=backend, cu_seqlens=docs)
        return torch.autograd.grad(out.float().sum(), leaves)

    report(f"nsa_flex {backend}", fwd, step)
    if a.cprofile:
        import cProfile
        import pstats

        torch.cuda.synchronize()
        with cProfile.Profile() as prof:
            fwd()
            torch.cuda.synchronize()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(30)

if not a.no_sdpa:
    G = Hq // Hkv
    dense = [x.clone().requires_grad_() for x in (q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1))]
    spans = list(zip(docs.starts, docs.lengths)) if docs is not None else [(0, T)]

    def full():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return [sdpa(*(x[:, :, s : s + n] for x in dense), is_causal=True) for s, n in spans]

    def full_fwd():
        with torch.no_grad():
            return full()

    def full_step():
        return torch.autograd.grad(sum(o.float().sum() for o in full()), dense)

    report("SDPA cuDNN full causal" + (" per document" if docs is not None else ""), full_fwd, full_step)
