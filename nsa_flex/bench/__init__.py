"""``python -m nsa_flex.bench``: time nsa_flex against full attention and the peer NSA kernels.

Every contender runs in this one process on the same inputs, bf16, default config, ``T`` in
8k..64k, at each shape of ``--shapes`` (:data:`.timing.SHAPES`; every row is labelled with its
shape): ``reference`` (docs/semantics.md's ``B=1, Hq=64, Hkv=4, D=128``, the default),
``gqa4-d128`` (``B=1, Hq=32, Hkv=8, D=128``, Llama-3 8B's heads), ``gqa4-d64`` (the same at
``D=64``), ``small`` (``B=4, Hq=6, Hkv=2, D=64``); ``tiny`` is ``--quick``'s. The parts:

- ``selected``: the selected branch alone on one set of ``block_indices``: the flex backend, the
  triton backend, and flash-linear-attention's ``parallel_nsa`` selection kernel when ``fla`` is
  importable (``pip install fla-core``; it takes ``-1``-padded indices with per-query counts).
- ``layer``: the whole layer (compression, scoring, top-n, three branches, gates): both
  backends, ``parallel_nsa`` with its own compression and top-n (no window branch: fla's
  needs flash-attn), and flash_nsa's layer when ``import flash_nsa`` works (:mod:`.peers`:
  the ``B`` rows as ``B`` packed documents, the gates as logits, its window branch a compiled
  FlexAttention stand-in for flash-attn).
- ``full``: full causal attention through SDPA's cuDNN and flash backends and FlexAttention.
- ``decode`` (not run unless asked, ``--parts decode``): the latency of one decode step
  (:func:`nsa_flex.decode_step`, one new token per row) with ``T`` tokens already cached, for
  each batch size of ``--decode-batches`` (1 and 8 by default), eagerly and replayed from a
  CUDA graph: the PyTorch step (``nsa B=.. [graph]``, ``fused=False``) and the split Triton
  kernels (``nsa fused B=.. [graph]``, ``fused=True``, with its relative error against the
  PyTorch step and the GB/s of the bytes it must move, :func:`.parts.decode_bytes`), against
  full-attention decoding (``sdpa B=.. [graph]``: SDPA of one query over the whole cache);
  ``full/this`` is SDPA's time over the step's. Then a speculative step of ``--spec-tokens``
  tokens per row (4 by default, 1 for none; ``nsa spec m=.. B=.. [graph]``, the PyTorch step).
  Each timed NSA step includes the one subtraction that rewinds the rows.
- ``varlen`` (not run by default; ``--parts varlen``): packed documents, for each mix of
  ``--doc-mix`` (:data:`.timing.DOC_MIXES`: ``short`` 1k..4k tokens, ``mix`` 4k..15k, ``long``
  16k..32k; all three by default): each of the shape's ``B`` rows of ``T`` tokens split into
  documents of that mix (fixed seed, ``--doc-seed``), the rows laid end to end as one packed
  row of ``B*T`` tokens: the whole layer with ``cu_seqlens`` on both backends, fla's varlen
  ``parallel_nsa`` and flash_nsa with the same ``cu_seqlens``, and full causal attention within
  documents: FlexAttention with a document mask, and SDPA called once per document (SDPA has
  no document mask that keeps its fast kernels). A mix whose shortest document exceeds ``T``
  is skipped at that ``T``.

Each row's note says, in brackets beside its times, what a contender runs in place of its own
code or leaves out.

Times are ``triton.testing.do_bench`` medians on CUDA (forward, and forward+backward), peak
memory is measured around one forward+backward. ``--quick`` runs tiny sizes, and on the CPU skips
what needs CUDA and says so. Results: a line on stderr per contender as each part finishes, the
table on stdout at the end, ``results.json`` (rewritten after every part and varlen mix) and
``times.png`` (with matplotlib: a row of panels per shape, a panel for each time measured,
forward and forward+backward) under ``--out``. ``--merge A/results.json B/results.json ...``
joins the rows of separate runs (one shape and length each, on separate GPUs, say) into one
table and plot.

Modules: :mod:`.timing` (rows, shapes, document mixes, timing, inputs), :mod:`.peers`
(flash_nsa: its import, window stand-in and call), :mod:`.parts` (the parts above), :mod:`.cli`
(the command line, table, plot and ``--merge``). The numbers it measured are in
docs/benchmarks.md.
"""

from .cli import main

__all__ = ["main"]
