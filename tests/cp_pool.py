"""A gloo group of ``R`` spawned processes, kept for a test session, that runs jobs on every rank.

Spawning ``R`` processes costs seconds (each imports torch), so the tests of
``nsa_flex.distributed`` start one pool per group size and send it many small jobs, one per
Hypothesis example. Each pool has its own ``FileStore`` in a fresh temporary directory, so
pytest-xdist workers never share a rendezvous. A job is a module-level function
``fn(rank, world, group, *args)``; its results come back in rank order, and a failure on any
rank raises here with that rank's traceback.
"""

from __future__ import annotations

import io
import os
import queue
import shutil
import tempfile
import traceback
from datetime import timedelta

import torch.multiprocessing as mp

TIMEOUT_S = 120  # per job; gloo's own collective timeout is shorter (below)


def _dumps(obj) -> bytes:
    """``obj`` as bytes, now. Tensors put on a multiprocessing queue as they are would be moved
    into shared memory by the queue's feeder thread later, while this process may be computing
    with them (a reference computed meanwhile came out wrong)."""
    buf = io.BytesIO()
    import torch

    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes):
    import torch

    return torch.load(io.BytesIO(data), weights_only=False)


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
        fn, args = _loads(job)
        try:
            results.put((rank, True, _dumps(fn(rank, world, group, *args))))
        except BaseException:  # noqa: BLE001 - reported to the test, which fails
            results.put((rank, False, traceback.format_exc()))
    # no destroy_process_group(): it waits on the other ranks, and the process ends here anyway


class Pool:
    def __init__(self, world: int) -> None:
        self.world = world
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self.dir = tempfile.mkdtemp(prefix=f"nsa_cp{self.world}_")
        store = os.path.join(self.dir, "store")
        self.jobs = [ctx.Queue() for _ in range(self.world)]
        self.results = ctx.Queue()
        self.procs = [ctx.Process(target=_worker, args=(r, self.world, store, self.jobs[r], self.results), daemon=True)
                      for r in range(self.world)]
        for p in self.procs:
            p.start()

    def run(self, fn, *args) -> list:
        """``fn(rank, world, group, *args)`` on every rank; the results in rank order."""
        self.start(fn, *args)
        return self.collect()

    def start(self, fn, *args) -> None:
        """Send the job to every rank and return at once (then :meth:`collect`)."""
        job = _dumps((fn, args))
        for jobs in self.jobs:
            jobs.put(job)

    def collect(self) -> list:
        """The started job's results in rank order; a failure on any rank raises."""
        out, errors = [None] * self.world, []
        for _ in range(self.world):
            try:  # once a rank has failed, the others get a few seconds, not the whole timeout
                rank, ok, value = self.results.get(timeout=5 if errors else TIMEOUT_S)
            except queue.Empty:
                errors.append(f"a rank of the {self.world}-process group gave no answer in time")
                break
            if ok:
                out[rank] = _loads(value)
            else:
                errors.append(f"rank {rank}:\n{value}")
        if errors:
            # A rank that failed alone may have left the others inside a collective: start
            # afresh, so that the next job does not meet them out of step.
            self._restart()
            raise AssertionError("\n".join(sorted(errors)))
        return out

    def _restart(self) -> None:
        self.close(wait=1)
        self._start()

    def close(self, wait: float = 0.5) -> None:
        for jobs in self.jobs:
            jobs.put(None)
        for p in self.procs:
            p.join(timeout=wait)
            if p.is_alive():
                p.terminate()
        shutil.rmtree(self.dir, ignore_errors=True)
