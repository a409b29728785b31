"""The gates: the three branch outputs mixed per query head (paper eq. 5)."""

from __future__ import annotations

import torch
from torch import Tensor


def gate(o_cmp: Tensor, o_slc: Tensor, o_swa: Tensor, gates: Tensor | None) -> Tensor:
    """``g[..., 0] * o_cmp + g[..., 1] * o_slc + g[..., 2] * o_swa`` (eq. 5): branch outputs
    ``(B, Hq, T, Dv)``, ``gates (B, Hq, T, 3)`` or ``None`` (each branch weighed 1).

    Eagerly, one product and two in-place ``addcmul_``: no temporary beyond the output, and
    autograd keeps nothing new (the branch outputs it needs are already saved by the branches'
    own backward). Under ``torch.compile`` the same sum is written as a reduction over a stacked
    last axis, for Inductor to fuse: the plain elementwise sum would be fused into the CPU
    FlexAttention template as an epilogue, which the template then refuses (torch 2.13,
    "Unsupported for `epilogue_nodes`").
    """
    if torch.compiler.is_compiling():
        branches = torch.stack((o_cmp, o_slc, o_swa), dim=-1)  # (B, Hq, T, Dv, 3)
        if gates is None:
            return branches.sum(dim=-1)
        return (branches * gates.to(branches.dtype)[..., None, :]).sum(dim=-1)
    if gates is None:
        return (o_cmp + o_slc).add_(o_swa)
    g = gates.to(o_cmp.dtype).unsqueeze(-2)  # (B, Hq, T, 1, 3)
    return (o_cmp * g[..., 0]).addcmul_(o_slc, g[..., 1]).addcmul_(o_swa, g[..., 2])
