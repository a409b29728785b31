"""A gloo group of ``R`` spawned processes, kept for a test session, that runs jobs on every rank.

Spawning ``R`` processes costs seconds (each imports torch), so the tests of
``nsa_flex.distributed`` start one pool per group size and send it many small jobs, one per
Hypothesis example. Each pool has its own ``FileStore`` in a fresh temporary directory, so
pytest-xdist workers never share a rendezvous. A job is a module-level function
``fn(rank, world, group, *args)``; its results come back in rank order, and a failure on any
rank raises here with that rank's traceback.
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import traceback
from datetime import timedelta

import torch.multiprocessing as mp

TIMEOUT_S = 120  # per job; gloo's own collective timeout is shorter (below)


def _worker(rank: int, world: int, store: str, jobs, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    group = dist.group.WORLD
    while True:
        job = jobs.get()
        if job is None:
            break
        fn, args = job
        try:
            results.put((rank, True, fn(rank, world, group, *args)))
        except BaseException:  # noqa: BLE001 - reported to the test, which fails
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class Pool:
    def __init__(self, world: int) -> None:
        ctx = mp.get_context("spawn")
        self.world = world
        self.dir = tempfile.mkdtemp(prefix=f"nsa_cp{world}_")
        store = os.path.join(self.dir, "store")
        self.jobs = [ctx.Queue() for _ in range(world)]
        self.results = ctx.Queue()
        self.procs = [ctx.Process(target=_worker, args=(r, world, store, self.jobs[r], self.results), daemon=True)
                      for r in range(world)]
        for p in self.procs:
            p.start()

    def run(self, fn, *args) -> list:
        """``fn(rank, world, group, *args)`` on every rank; the results in rank order."""
        for jobs in self.jobs:
            jobs.put((fn, args))
        out, errors = [None] * self.world, []
        for _ in range(self.world):
            try:
                rank, ok, value = self.results.get(timeout=TIMEOUT_S)
            except queue.Empty:
                self.close()
                raise AssertionError(f"a rank of the {self.world}-process group gave no answer in {TIMEOUT_S} s")
            if ok:
                out[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
        if errors:
            raise AssertionError("\n".join(sorted(errors)))
        return out

    def close(self) -> None:
        for jobs in self.jobs:
            jobs.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
        shutil.rmtree(self.dir, ignore_errors=True)
