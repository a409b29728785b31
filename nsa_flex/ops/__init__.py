"""nsa_flex's PyTorch custom operators (namespace ``nsa_flex``): the hand-written Triton
launches as ops that ``torch.compile`` keeps opaque.

Dynamo does not trace into a ``torch.library.custom_op``: a graph records one call, takes the
output shapes from the op's fake implementation and its gradient from ``register_autograd``,
and at run time the op launches its kernels as it does eagerly. So the Triton paths run inside
``torch.compile(fullgraph=True)`` with no graph break, and eager calls go through the same ops.

Each op sits beside its launch code, its named fake and its autograd:

- :mod:`.selected`: ``nsa_flex::selected_attention``, ``nsa_flex::selected_attention_backward``
  and ``nsa_flex::attach_selected_backward`` (the selected branch);
- :mod:`.scoring`: ``nsa_flex::select_blocks_fused`` (block selection).

The arguments are tensors and plain numbers (an ``NSAConfig`` travels as its fields, a packed
row's :class:`~nsa_flex.ops.selected.PackedRow` as its tensors). Outputs are fresh contiguous
tensors, and the launchers make their inputs contiguous where the kernels need it, so the ops
do not depend on the strides a compiled graph hands them. Call them through the library
(``attend``, ``select_blocks``, ``triton_backend.selected_attention``), which validates first;
``torch.ops.nsa_flex.<name>`` names them in graphs.
"""

from .scoring import select_blocks_fused_op
from .selected import attach_selected_backward_op, selected_attention_backward_op, selected_attention_op

__all__ = [
    "selected_attention_op",
    "selected_attention_backward_op",
    "attach_selected_backward_op",
    "select_blocks_fused_op",
]
