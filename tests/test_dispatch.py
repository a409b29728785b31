"""nsa_flex.dispatch: the one place that decides which implementation runs each branch.

``plan`` reads static facts only, so these tests build CPU tensors and patch the two facts the
CPU cannot show: CUDA (the ``_picks_kernels`` seam) and, for the compiled clause, a CUDA tensor
inside ``torch.compile``. tests/test_paths.py checks that ``attend`` runs what the plan says.
"""

import pytest
import torch

from nsa_flex import dispatch
from nsa_flex.dispatch import Paths
from nsa_flex.triton_support import triton_missing

needs_triton = pytest.mark.skipif(bool(triton_missing()), reason="the kernel paths need the triton package")


def qkv(dtype=torch.float32, grad=False, Dk=16, Dv=16, T=8):
    q = torch.randn(1, 2, T, Dk, dtype=dtype, requires_grad=grad)
    return q, torch.randn(1, 1, T, Dk, dtype=dtype), torch.randn(1, 1, T, Dv, dtype=dtype)


def plan(q, k, v, backend="flex", score_mod=None, mask_mod=None, docs=None, block_indices=None, selection_grad=False):
    return dispatch.plan(q, k, v, backend=backend, score_mod=score_mod, mask_mod=mask_mod, docs=docs,
                         block_indices=block_indices, selection_grad=selection_grad)


@pytest.fixture
def cuda_seam(monkeypatch):
    monkeypatch.setattr(dispatch, "_picks_kernels", lambda device: True)


def mod(score, b, h, q_idx, kv_idx):
    return score


def test_off_cuda_nothing_is_picked_unasked():
    q, k, v = qkv(grad=True)
    assert plan(q, k, v) == Paths("flex", "torch", "flex", "flex")
    assert plan(q, k, v, backend="triton") == Paths("flex", "torch", "triton", "flex")
    assert plan(q, k, v, backend="reference") == Paths("reference", "reference", "reference", "reference")
    assert plan(q, k, v, block_indices=torch.zeros(1)).scoring == "given"
    assert dispatch.decode_path(q[:, :, :1], v, None) == "torch"


@needs_triton
def test_on_cuda_the_kernels_serve_calls_without_mods(cuda_seam):
    q, k, v = qkv(torch.float16)
    assert plan(q, k, v) == Paths("flex", "triton_lse", "flex", "flex")  # no backward
    assert plan(q.float(), k.float(), v.float()).scoring == "triton"  # float32 keeps the kernel's LSE
    # packed: the scoring kernels take the documents, and the compressed branch's LSE with them
    assert plan(q, k, v, docs=object()) == Paths("flex", "triton_lse", "triton", "flex")
    assert plan(q.float(), k.float(), v.float(), docs=object()).scoring == "triton"
    assert plan(q, k, v, score_mod=mod) == Paths("flex", "torch", "flex", "flex")
    assert plan(q, k, v, mask_mod=mod).scoring == "torch"
    assert plan(q, k, v, block_indices=torch.zeros(1)).scoring == "given"
    q, k, v = qkv(torch.bfloat16, grad=True)
    assert plan(q, k, v) == Paths("flex", "triton_lse", "flex_fwd_triton_bwd", "flex")  # eager training
    with torch.no_grad():
        assert plan(q, k, v).selected == "flex"
    assert plan(q, k, v, selection_grad=True).selected == "flex"  # the straight-through score_mod
    assert plan(q, k, v, mask_mod=mod).selected == "flex"
    assert plan(q, k, v, docs=object()).selected == "triton"  # packed: FlexAttention would need 128x128 tiles
    assert plan(q, k, v, docs=object(), mask_mod=mod).selected == "flex"  # the kernels run no mods
    assert plan(q, k, v, backend="triton").selected == "triton"


@needs_triton
def test_head_sizes_the_kernels_do_not_take(cuda_seam):
    q, k, v = qkv(grad=True, Dk=8)  # below FlexAttention's CUDA floor of 16
    assert plan(q, k, v) == Paths("flex", "triton", "flex", "flex")
    q, k, v = qkv(grad=True, Dk=512)
    assert plan(q, k, v) == Paths("flex", "torch", "flex", "flex")
    q, k, v = qkv(torch.float64, grad=True)
    assert plan(q, k, v) == Paths("flex", "torch", "flex", "flex")


class FakeCuda(torch.Tensor):
    @property
    def is_cuda(self):
        return True


@needs_triton
def test_compiled_cuda_graphs_take_the_triton_selected_branch(cuda_seam, monkeypatch):
    q, k, v = qkv(torch.bfloat16, grad=True)
    q = q.detach().as_subclass(FakeCuda)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert plan(q, k, v).selected == "triton"
    with torch.no_grad():
        assert plan(q, k, v).selected == "triton"  # inference too
    assert plan(q, k, v, score_mod=mod).selected == "flex"  # 128x128 FlexAttention with mods


@needs_triton
def test_decode_path(cuda_seam, monkeypatch):
    q, _, v = qkv(T=1)
    assert dispatch.decode_path(q, v, None) == "fused"
    assert dispatch.decode_path(q, v, False) == "torch"
    assert dispatch.decode_path(torch.cat([q, q], 2), v, None) == "torch"  # m = 2
    assert dispatch.decode_path(q, v, True) == "fused"  # decode_step checks what it can run
    assert dispatch.decode_path(q.bfloat16(), v.bfloat16(), None) == "torch"  # not under the interpreter
    assert dispatch.decode_path(q, torch.randn(1, 1, 1, 512), None) == "torch"  # Dv past 256
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert dispatch.decode_path(q, v, None) == "torch"
