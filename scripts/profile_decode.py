"""Where a fused decode step's time goes (a GPU probe, not a test).

    PYTHONPATH=. python scripts/profile_decode.py [--shape B,Hq,Hkv,D] [--batches 1 8 32 128]
        [--seq-lens 8192 65536 131072] [--steps 20]

For each batch size and context: the fused step replayed from a CUDA graph (the kernels
``tuning.decode_batched`` picks, and the other set beside) and SDPA over the whole cache
(graphed too), as do_bench medians, after checking the fused step against the PyTorch one; the bytes the step must read
(``nsa_flex.bench.parts.decode_bytes``) and the GB/s that time achieves; and a
``torch.profiler`` table of the kernels of ``--steps`` eager steps (device time per step, so the
gap between their sum and the graphed step is launch and dependency latency); a speculative
step of ``--spec`` tokens per row (the PyTorch step, graphed).
"""

import argparse

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from nsa_flex import NSAConfig, decode_step, tuning
from nsa_flex.bench.parts import decode_bytes, decode_inputs
from nsa_flex.bench.timing import Problem, _cuda_graph

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--shape", default="1,64,4,128", help="_,Hq,Hkv,D (default: %(default)s, the reference shape)")
ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32, 128])
ap.add_argument("--seq-lens", nargs="+", type=int, default=[8192, 65536, 131072])
ap.add_argument("--steps", type=int, default=20, help="eager steps profiled (default: %(default)s)")
ap.add_argument("--no-sdpa", action="store_true")
ap.add_argument("--spec", nargs="*", type=int, default=[4], metavar="M",
                help="also time speculative steps of M tokens (the PyTorch step, graphed; default: 4)")
a = ap.parse_args()
_, Hq, Hkv, D = (int(x) for x in a.shape.split(","))
config = NSAConfig()
med = lambda f: do_bench(f, warmup=25, rep=200, return_mode="median")  # noqa: E731
print(f"Hq={Hq} Hkv={Hkv} D={D} torch {torch.__version__} {torch.cuda.get_device_name()}", flush=True)

for T in a.seq_lens:
    for B in a.batches:
        p = Problem(B, Hq, Hkv, D, torch.bfloat16, torch.device("cuda"), config)
        try:
            cache, q, k, v, gates = decode_inputs(p, B, T)
        except torch.OutOfMemoryError:
            print(f"T={T} B={B}: out of memory")
            continue

        def step():
            out = decode_step(cache, q, k, v, gates, fused=True)
            cache.lengths.sub_(1)
            cache._bound = T
            return out

        with torch.no_grad():
            want = decode_step(cache, q, k, v, gates, fused=False).float()
            cache.rewind_(1)
            got = step().float()
            err = float((got - want).norm() / want.norm())
            nsa_ms = med(_cuda_graph(step))
            batched = tuning.decode_batched(q.device, B * Hkv, config.num_selected, config.num_select_blocks(T + 1))
            line = (f"T={T} B={B}: rel err vs the PyTorch step {err:.1e}; nsa fused graphed {nsa_ms * 1e3:.1f} us"
                    f" ({'batched' if batched else 'split'} kernels")
            choose = tuning.decode_batched
            tuning.decode_batched = lambda *args: not batched  # noqa: E731  (the other kernels, for the ratio)
            other_ms = med(_cuda_graph(step))
            tuning.decode_batched = choose
            line += f"; the {'split' if batched else 'batched'} ones {other_ms * 1e3:.1f} us)"
            nbytes = decode_bytes(config, T, B, Hq, Hkv, D, D, 2)
            line += f", reads {nbytes / 1e6:.1f} MB = {nbytes / nsa_ms / 1e6:.0f} GB/s"
            if not a.no_sdpa:
                kf = torch.empty(B, Hkv, T + 1, D, device="cuda", dtype=torch.bfloat16).normal_()
                vf = torch.empty_like(kf).normal_()
                sdpa_ms = med(_cuda_graph(lambda: F.scaled_dot_product_attention(q, kf, vf, enable_gqa=True)))
                line += (f"; sdpa graphed {sdpa_ms * 1e3:.1f} us ({kf.numel() * 4 / sdpa_ms / 1e6:.0f} GB/s),"
                         f" sdpa/nsa {sdpa_ms / nsa_ms:.2f}x")
                del kf, vf
            print(line, flush=True)
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(a.steps):
                    step()
                torch.cuda.synchronize()
        total = 0.0
        for e in sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total):
            per_step = e.self_device_time_total / a.steps
            if per_step > 0:
                total += per_step
                print(f"    {per_step:8.2f} us  x{e.count // a.steps:<2d} {e.key[:90]}")
        print(f"    {total:8.2f} us  device time per step, summed", flush=True)
        del cache
        torch.cuda.empty_cache()
        for m in a.spec:
            cache, q, k, v, gates = decode_inputs(p, B, T, m)

            def spec_step():
                out = decode_step(cache, q, k, v, gates)
                cache.lengths.sub_(m)
                cache._bound = T
                return out

            with torch.no_grad():
                spec_ms = med(_cuda_graph(spec_step))
            print(f"    speculative step of {m} tokens (PyTorch, graphed): {spec_ms * 1e3:.1f} us", flush=True)
            del cache
            torch.cuda.empty_cache()
