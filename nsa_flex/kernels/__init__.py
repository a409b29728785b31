"""nsa_flex's hand-written Triton kernels: ``@triton.jit`` functions only.

- :mod:`.primitives`: helpers the kernels share (tile loads, products, the compressed-block rule).
- :mod:`.selected`: the selected branch, forward, dQ and dK/dV.
- :mod:`.scoring`: block selection's scores; :mod:`.top_n`: the top-n of them.
- :mod:`.decode`: one decode step, split over the GPU; :mod:`.decode_batch`: the same for many
  rows, ranking each row's keys once.

Each module imports Triton at its top, so only launch code that has checked Triton is there
(:mod:`nsa_flex.triton_support`) imports them, lazily, when it launches: ``nsa_flex.ops`` for
the first three, ``nsa_flex.inference.decode_fused`` for the decode step.
"""
