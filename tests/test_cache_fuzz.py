"""The cache as a state machine (``cache_machine.py``): prefill, decode, rewind, reset, clone
and copy in random order and sizes, each decode step against the full forward over the
tokens each row holds, with canaries around the storage.

On the CPU: the PyTorch step in float64 and in float32, and the fused Triton step under the
interpreter (few examples: it is slow). Prefill uses the reference backend here (each new
prompt length costs FlexAttention about a second on the CPU; the other backends' prefill of
padded rows is tested in ``test_cache.py``). ``test_gpu_cache_fuzz.py`` runs the same machine
on CUDA with the fused kernels.
"""

import pytest
import torch
from hypothesis import settings

from cache_machine import cache_machine, one_thread  # noqa: F401 (the fixture)
from nsa_flex.triton_backend import available

TRITON = available(torch.device("cpu"))[0]
pytestmark = pytest.mark.usefixtures("one_thread")

TestCacheFloat64 = cache_machine(dtype=torch.float64, tol=1e-10).TestCase
TestCacheFloat64.settings = settings(max_examples=50, stateful_step_count=40, deadline=None)

TestCacheFloat32 = cache_machine(dtype=torch.float32, tol=1e-5, Hkv=2, Dk=12, Dv=8).TestCase
TestCacheFloat32.settings = settings(max_examples=25, stateful_step_count=30, deadline=None)

TestCacheFusedInterpreted = pytest.mark.skipif(not TRITON, reason="no Triton interpreter")(
    cache_machine(dtype=torch.float32, fused=True, tol=1e-5, Dk=16, Dv=16, max_len=12, max_step=1, max_burst=2,
                  until_full=False).TestCase
)
TestCacheFusedInterpreted.settings = settings(max_examples=8, stateful_step_count=10, deadline=None)
