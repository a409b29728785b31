import contextlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    # The triton backend's kernels run on the CPU only under Triton's interpreter, which must
    # be chosen before the kernels are defined. (Never on a GPU machine: it would also capture
    # Inductor's own Triton kernels.)
    os.environ.setdefault("TRITON_INTERPRET", "1")
from hypothesis import settings

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist workers share the cores: each takes its part for torch's threads, not all of
    # them (oversubscribed, tiny CPU ops run many times slower).
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("dev", max_examples=25, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def dynamo_limits(per_function: int, total: int):
    """``torch._dynamo.config.patch`` of the recompile limits, under whichever names this torch
    has. Patch torch's config only through its own API: pytest's ``monkeypatch`` undoes an
    attribute it did not find in ``__dict__`` by deleting it, and on Dynamo's config module
    that deletes the setting itself (pytest 9.2, torch 2.13)."""
    cfg = torch._dynamo.config
    limits = {}
    for names, value in ((("recompile_limit", "cache_size_limit"), per_function),
                         (("accumulated_recompile_limit", "accumulated_cache_size_limit"), total)):
        name = next((n for n in names if isinstance(getattr(cfg, n, None), int)), None)
        if name is not None:
            limits[name] = value
    return cfg.patch(**limits)


@contextlib.contextmanager
def no_tf32():
    """TF32 off for matmuls and cuDNN, restored by hand afterwards (these flags are properties
    of torch.backends objects, which ``monkeypatch`` cannot undo: see :func:`dynamo_limits`)."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.allow_tf32, cudnn.allow_tf32
    matmul.allow_tf32 = cudnn.allow_tf32 = False
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


@pytest.fixture
def gpu_numerics():
    """For the CUDA tests held to the float32 tolerance: no TF32, and room for the many
    compiled FlexAttention graphs (one per shape, branch and, packed, document length)."""
    with no_tf32(), dynamo_limits(256, 4096):
        yield


@pytest.fixture(autouse=True)
def dynamo_config_survives():
    """Fails the test that leaves Dynamo's recompile limits deleted (see :func:`dynamo_limits`)."""
    yield
    cfg = torch._dynamo.config
    for names in (("recompile_limit", "cache_size_limit"), ("accumulated_recompile_limit", "accumulated_cache_size_limit")):
        assert any(isinstance(getattr(cfg, n, None), int) for n in names), f"a test deleted torch._dynamo.config.{names[0]}"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
