"""The NSA branches on FlexAttention (:mod:`.branches`) and how FlexAttention is called
(:mod:`.call`)."""

from .branches import compressed_branch, selected_branch, selected_branch_triton_backward, window_branch

__all__ = ["compressed_branch", "selected_branch", "selected_branch_triton_backward", "window_branch"]
