"""Property tests for NSA code: Hypothesis strategies and checks against the float64 reference.

For users who write their own compressor, ``score_mod``/``mask_mod``, kernel, or a model
around :class:`nsa_flex.SparseAttention`, and want to test it the way the library's own suite
tests the library (docs/testing.md). Needs Hypothesis (``pip install 'nsa_flex[testing]'``);
``import nsa_flex`` itself never imports this package.

Strategies (:mod:`nsa_flex.testing.strategies`): :func:`configs`, :func:`shapes` (a
:class:`Shape`), :func:`inputs` (:func:`make_inputs`), :func:`block_indices`,
:func:`cu_seqlens`, :func:`score_mods`, :func:`mask_mods`.

Checks, each raising ``AssertionError`` with a report: :func:`assert_matches_reference`
(:mod:`nsa_flex.testing.checks`, with :func:`rel_err` and the :data:`TOLERANCES` the checks
use); :func:`assert_causal`, :func:`assert_documents_isolated`,
:func:`assert_decode_matches_forward` (:mod:`nsa_flex.testing.contracts`).
"""

try:
    import hypothesis  # noqa: F401
except ImportError as e:
    raise ImportError(
        "nsa_flex.testing needs Hypothesis, which is not installed: pip install 'nsa_flex[testing]' "
        "(or pip install hypothesis)"
    ) from e

from .checks import GRAD_FLOOR, SELECTION_TOLERANCES, TOLERANCES, assert_matches_reference, rel_err, tolerance
from .contracts import assert_causal, assert_decode_matches_forward, assert_documents_isolated
from .strategies import (
    Inputs,
    Shape,
    block_indices,
    configs,
    cu_seqlens,
    inputs,
    make_inputs,
    mask_mods,
    score_mods,
    shapes,
)

__all__ = [
    "configs",
    "Shape",
    "shapes",
    "Inputs",
    "make_inputs",
    "inputs",
    "block_indices",
    "cu_seqlens",
    "score_mods",
    "mask_mods",
    "assert_matches_reference",
    "assert_causal",
    "assert_documents_isolated",
    "assert_decode_matches_forward",
    "rel_err",
    "tolerance",
    "TOLERANCES",
    "SELECTION_TOLERANCES",
    "GRAD_FLOOR",
]
