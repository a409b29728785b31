import os

import pytest
import torch

if not torch.cuda.is_available():
    # The triton backend's kernels run on the CPU only under Triton's interpreter, which must
    # be chosen before the kernels are defined. (Never on a GPU machine: it would also capture
    # Inductor's own Triton kernels.)
    os.environ.setdefault("TRITON_INTERPRET", "1")
from hypothesis import settings

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("dev", max_examples=25, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture
def gpu_numerics(monkeypatch):
    """For the CUDA tests held to SPEC's float32 tolerance: no TF32, and room for the many
    compiled FlexAttention graphs (one per shape, branch and, packed, document length)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch._dynamo.config, "cache_size_limit", 256)
    monkeypatch.setattr(torch._dynamo.config, "accumulated_cache_size_limit", 4096)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
