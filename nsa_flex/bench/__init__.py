"""``python -m nsa_flex.bench``: time nsa_flex against full attention and the peer NSA kernel.

Every contender runs in this one process on the same inputs, at the reference shape of
docs/semantics.md (``B=1, Hq=64, Hkv=4, Dk=Dv=128``, bf16, default config) and ``T`` in 8k..64k:

- ``selected``: the selected branch alone on one set of ``block_indices``: the flex backend, the
  triton backend, and flash-linear-attention's ``parallel_nsa`` selection kernel when ``fla`` is
  importable (``pip install fla-core``; it takes ``-1``-padded indices with per-query counts).
- ``layer``: the whole layer (compression, scoring, top-n, three branches, gates): both
  backends, and ``parallel_nsa`` with its own compression and top-n (no window branch: fla's
  needs flash-attn).
- ``full``: full causal attention through SDPA's cuDNN and flash backends and FlexAttention.
- ``decode`` (not run unless asked, ``--parts decode``): the latency of one decode step
  (:func:`nsa_flex.decode_step`, one new token per row) with ``T`` tokens already cached, for
  B=1 and B=8, eagerly and replayed from a CUDA graph: the PyTorch step (``nsa B=.. [graph]``,
  ``fused=False``) and the split Triton kernels (``nsa fused B=.. [graph]``, ``fused=True``,
  with its relative error against the PyTorch step), against full-attention decoding (``sdpa
  B=.. [graph]``: SDPA of one query over the whole cache); ``full/this`` is SDPA's time over
  the step's. Each timed NSA step includes the one subtraction that rewinds the rows.
- ``varlen`` (not run by default; ``--parts varlen``): ``T`` tokens packed from documents of
  mixed lengths (a fixed-seed mix of ``T/64 .. T/4`` tokens, 1k..16k at 64k): the whole layer
  with ``cu_seqlens`` on both backends, fla's varlen ``parallel_nsa`` (its own compression and
  top-n, with ``cu_seqlens``), and full causal attention within documents: FlexAttention with a
  document mask, and SDPA called once per document (SDPA has no document mask that keeps
  its fast kernels).

Times are ``triton.testing.do_bench`` medians on CUDA (forward, and forward+backward), peak
memory is measured around one forward+backward. ``--quick`` runs tiny sizes, and on the CPU skips
what needs CUDA and says so. Results: a line on stderr per contender as each part finishes, the
table on stdout at the end, ``results.json`` (rewritten after every part) and ``times.png`` (with
matplotlib: a panel for each time measured, forward and forward+backward) under ``--out``.
``--merge A/results.json B/results.json ...`` joins the rows of separate runs (one length each,
on separate GPUs, say) into one table and plot.

Modules: :mod:`.timing` (rows, timing, inputs), :mod:`.parts` (the parts above), :mod:`.cli`
(the command line, table, plot and ``--merge``). The numbers it measured are in
docs/benchmarks.md.
"""

from .cli import main

__all__ = ["main"]
