"""Context-parallel attend: step time, per-rank peak memory and equality (a probe, not a test).

    # R ranks (NCCL on GPUs, gloo on CPUs), this rank's shard of one sequence each:
    torchrun --nproc-per-node 2 scripts/bench_distributed.py --seq-len 131072 [--check]
    # the one-process baseline (plain attend on the whole sequence):
    python scripts/bench_distributed.py --seq-len 131072 --single

The reference shape of docs/semantics.md by default (B=1, Hq=64, Hkv=4, D=128, bfloat16, the
default config). Each step is `context_parallel_attend` forward and backward on random inputs;
every rank prints one JSON line (`ms` the median step, `peak_mib` the peak memory allocated
during the steps, inputs included). `--check` gathers the output and the gradients and compares
them, on rank 0, with `attend` on the whole sequence (which must fit on one device). Scaling
efficiency is `ms(single) / (R * ms(R ranks))`. On a CPU: `--device cpu --dtype float32` and a
small `--seq-len` (the flex backend runs unfused there).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nsa_flex import NSAConfig, attend  # noqa: E402
from nsa_flex.distributed import context_parallel_attend, shard_sequence, unshard_sequence  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=131072)
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--dim-head", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--backend", default="triton", choices=["flex", "triton", "reference"])
    p.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--single", action="store_true", help="one process, plain attend on the whole sequence")
    p.add_argument("--check", action="store_true", help="compare with attend on the whole sequence (rank 0)")
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    cuda = a.device == "cuda"

    rank, world, group = 0, 1, None
    if not a.single:
        dist.init_process_group("nccl" if cuda else "gloo")
        rank, world, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    # The whole sequence is drawn on the host (the same on every rank); only shards reach the device.
    T, g = a.seq_len, torch.Generator().manual_seed(0)
    full = {
        "q": torch.randn(1, a.heads, T, a.dim_head, generator=g, dtype=dtype),
        "k": torch.randn(1, a.kv_heads, T, a.dim_head, generator=g, dtype=dtype),
        "v": torch.randn(1, a.kv_heads, T, a.dim_head, generator=g, dtype=dtype),
        "gates": torch.rand(1, a.heads, T, 3, generator=g, dtype=dtype),
        "dout": torch.randn(1, a.heads, T, a.dim_head, generator=g, dtype=dtype),
    }
    mine = {n: (x if a.single else shard_sequence(x, group, 2, a.layout)).to(device) for n, x in full.items()}
    leaves = {n: mine[n].requires_grad_() for n in ("q", "k", "v", "gates")}
    config = NSAConfig()

    def step():
        for x in leaves.values():
            x.grad = None
        if a.single:
            out = attend(*leaves.values(), config=config, backend=a.backend)
        else:
            out = context_parallel_attend(*leaves.values(), group=group, config=config, backend=a.backend,
                                          layout=a.layout)
        out.backward(mine["dout"])
        return out

    step()  # compile and warm up
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.steps):
        if group is not None:
            dist.barrier()
        t0 = time.perf_counter()
        out = step()
        if cuda:
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t0))
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    print(json.dumps({"rank": rank, "world": world, "T": T, "T_local": mine["q"].shape[2], "backend": a.backend,
                      "layout": None if a.single else a.layout, "dtype": a.dtype, "ms": round(statistics.median(times), 3),
                      "peak_mib": None if peak is None else round(peak, 1)}), flush=True)

    if a.check and not a.single:
        got = {"out": unshard_sequence(out.detach(), group, 2, a.layout)}
        for n, x in leaves.items():
            got[n] = unshard_sequence(x.grad, group, 2, a.layout)
        if rank == 0:
            ref = {n: full[n].to(device).requires_grad_() for n in ("q", "k", "v", "gates")}
            out_ref = attend(*ref.values(), config=config, backend=a.backend)
            out_ref.backward(full["dout"].to(device))
            want = {"out": out_ref.detach(), **{n: x.grad for n, x in ref.items()}}
            err = {n: ((got[n].double() - want[n].double()).norm() / want[n].double().norm()).item() for n in want}
            print(json.dumps({"check": "rel_err against one device", **err}), flush=True)
    if group is not None:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
