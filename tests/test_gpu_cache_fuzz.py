"""The cache state machine (``cache_machine.py``) on a CUDA device: decode steps of one token
run the fused Triton kernels (``fused=True``), longer ones the PyTorch step, in float32 and
bfloat16, with head dims that leave the kernels' tiles partly masked (Dk = 24 in a tile of
32). Canaries (NaN guard slots around every row's storage, a column past the head dim,
sentinels around ``lengths``) fail the machine on any write outside what a step may write;
the spare slots are poisoned after every rule, so that a read of one shows in the outputs."""

import pytest
import torch
from hypothesis import settings

from cache_machine import cache_machine, one_thread  # noqa: F401 (the fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("gpu_numerics", "one_thread")]

SHAPE = dict(B=2, Hkv=2, G=2, Dk=24, Dv=16, max_len=48)

TestGpuCacheFusedFloat32 = cache_machine(
    device="cuda", dtype=torch.float32, fused=True, backends=("reference", "triton"), tol=1e-5, **SHAPE
).TestCase
TestGpuCacheFusedFloat32.settings = settings(max_examples=25, stateful_step_count=30, deadline=None)

TestGpuCacheFusedBfloat16 = cache_machine(
    device="cuda", dtype=torch.bfloat16, fused=True, backends=("reference",), tol=2e-2, **SHAPE
).TestCase
TestGpuCacheFusedBfloat16.settings = settings(max_examples=25, stateful_step_count=30, deadline=None)
