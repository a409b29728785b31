"""Inference: a preallocated KV cache (:mod:`.cache`), prefill from a prompt (:mod:`.prompt`),
and decode steps (:mod:`.decode`, the fused kernels' launch in :mod:`.decode_fused`) whose outputs
equal one full forward over the same tokens. docs/inference.md shows them in use."""

from .cache import NSACache
from .decode import decode_step
from .prompt import prefill

__all__ = ["NSACache", "prefill", "decode_step"]
