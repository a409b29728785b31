"""Which implementation runs each NSA branch, for every combination of the facts that decide it.

The choice depends on the backend, the dtype, whether a backward will run, the user's mods,
packed rows, given ``block_indices`` and ``selection_grad`` (and on CUDA, which the CPU cannot
show: the seams below make the CPU take the CUDA choices, as tests/test_compiled_ops.py does;
compiled CUDA graphs are tests/test_gpu_compile.py's). Each case records the paths that ran,
with the kernels and FlexAttention itself replaced by stubs that only record (the choice is
the point here, not the numbers; every path's numbers have their own tests).

``TABLE`` was recorded before issue 15 moved the code (with seams and recorders on the names
of then: ``selection._fused_ok``, ``flex_backend._triton_kernels_apply``, ``selection._select_fused``
...); the restructure changed where the choice is made (:func:`nsa_flex.dispatch.plan`), not
what it is. Since then one choice changed on purpose: the flex backend's packed rows without mods
take the Triton selected kernels (``selected:triton``; docs/design.md, "Packed rows"), and
packed half-precision rows are scored from the compressed branch's log-sum-exp
(``scoring:triton_lse``) since the scoring kernels take the documents themselves.
tests/test_dispatch.py tests the plan itself.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from nsa_flex import NSACache, NSAConfig, attend, decode_step, dispatch, scoring, triton_backend
from nsa_flex.flex import branches
from nsa_flex.inference import cache as cache_mod, decode as decode_mod
from nsa_flex.ops import scoring as ops_scoring
from nsa_flex.top_n import top_n_blocks
from nsa_flex.triton_support import triton_missing

CONFIG = NSAConfig(compress_block=8, compress_stride=4, select_block=16, num_selected=2, num_initial=1,
                   num_local=1, window=8)
T = 40

pytestmark = pytest.mark.skipif(bool(triton_missing()), reason="the fused paths need the triton package")


def _seams(monkeypatch):
    """The CUDA choices on the CPU: the dispatch's one seam (every other fact it checks kept)."""
    monkeypatch.setattr(dispatch, "_picks_kernels", lambda device: True)


def _recorders(monkeypatch, events: list):
    """Stubs in place of the kernels and FlexAttention that note which path ran."""
    def select_fused(q, k_cmp, config, scale, chunk_size=None, lse=None, q_offset=0, packed=None):
        events.append("scoring:triton_lse" if lse is not None else "scoring:triton")
        B, _, T, _ = q.shape
        zeros = q.new_zeros(B, k_cmp.shape[1], T, config.num_select_blocks(T), dtype=torch.float32)
        return top_n_blocks(zeros, config)

    chunk_importance, packed_importance = scoring.chunk_importance, scoring.packed_importance

    def chunked(*args, **kwargs):
        differentiable = kwargs.get("differentiable", args[7] if len(args) > 7 else False)
        events.append("importance:torch" if differentiable else "scoring:torch")
        return chunk_importance(*args, **kwargs)

    def packed(*args, **kwargs):  # a packed row's PyTorch scoring
        events.append("scoring:torch")
        return packed_importance(*args, **kwargs)

    def triton_selected(q, k, v, block_indices, select_block, scale, docs=None, q_offset=0):
        events.append("selected:triton")
        return q.new_zeros(*q.shape[:3], v.shape[-1]), q.new_zeros(q.shape[:3], dtype=torch.float32)

    fftb = branches.selected_branch_triton_backward

    def flex_fwd_triton_bwd(*args, **kwargs):
        events.append("selected:flex_fwd_triton_bwd")
        return fftb(*args, **kwargs)

    def flex(q, k, v, score_mod, block_mask, scale, return_lse=False):
        # which branch: the compressed one has Tc keys, the selected one folds G = 2 heads into rows
        branch = "compressed" if k.shape[2] != T else "selected" if q.shape[2] == 2 * T else "window"
        tile = "x".join(map(str, block_mask.BLOCK_SIZE))
        backward = "" if block_mask.q_indices is None else "+bwd lists"
        events.append(f"{branch}:flex({tile}{backward})")
        out = q.new_zeros(*q.shape[:3], v.shape[-1])
        return (out, q.new_zeros(q.shape[:3], dtype=torch.float32)) if return_lse else out

    monkeypatch.setattr(ops_scoring, "launch_scoring", select_fused)
    monkeypatch.setattr(scoring, "chunk_importance", chunked)
    monkeypatch.setattr(scoring, "packed_importance", packed)
    monkeypatch.setattr(triton_backend, "_run", triton_selected)
    monkeypatch.setattr(branches, "selected_branch_triton_backward", flex_fwd_triton_bwd)
    monkeypatch.setattr(branches, "run_flex", flex)


def _compact(events: list[str]) -> str:
    """The events in order, a repeat in a row once (the scoring's chunks)."""
    return ", ".join(e for i, e in enumerate(events) if i == 0 or e != events[i - 1])


def _inputs(dtype, grad, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, h, T, 16, generator=g).to(dtype).requires_grad_(grad) for h in (2, 1, 1))
    return q, k, v


def _score_mod(score, b, h, q_idx, kv_idx):
    return score * 0.5


def _mask_mod(b, h, q_idx, kv_idx):
    return kv_idx >= 0


def _cases():
    for backend, dtype, grad, mods, packed, given, sg in itertools.product(
        ("flex", "triton"), ("f16", "f32"), ("grad", "nograd"), ("none", "score", "mask"), ("one", "packed"),
        ("scored", "given"), ("plain", "sg"),
    ):
        if backend == "triton" and (mods != "none" or sg == "sg"):
            continue  # refused by attend
        if packed == "packed" and sg == "sg":
            continue  # refused by attend
        yield "-".join((backend, dtype, grad, mods, packed, given, sg))


def _attend_events(case, monkeypatch) -> str:
    backend, dtype, grad, mods, packed, given, sg = case.split("-")
    events: list[str] = []
    _seams(monkeypatch)
    _recorders(monkeypatch, events)
    q, k, v = _inputs({"f16": torch.float16, "f32": torch.float32}[dtype], grad == "grad")
    cu = torch.tensor([0, 17, T]) if packed == "packed" else None
    idx = None
    if given == "given":
        idx = torch.zeros(1, 1, T, CONFIG.num_selected, dtype=torch.int32)
    with torch.set_grad_enabled(grad == "grad"):
        attend(q, k, v, config=CONFIG, backend=backend, block_indices=idx, cu_seqlens=cu,
               score_mod=_score_mod if mods == "score" else None, mask_mod=_mask_mod if mods == "mask" else None,
               selection_grad=sg == "sg")
    return _compact(events)


def _decode_events(case, monkeypatch) -> str:
    fused, m = case.split("-")
    events: list[str] = []
    decode = decode_mod._decode_torch

    def torch_step(*args, **kwargs):
        events.append("decode:torch")
        return decode(*args, **kwargs)

    def fused_step(cache, q, k, v, gates, config, scale, compress_k, compress_v, splits=None):
        events.append("decode:fused")
        return decode(cache, q, k, v, gates, config, scale, cache_mod.compressor_or_mean(compress_k, config),
                      cache_mod.compressor_or_mean(compress_v, config))

    monkeypatch.setattr(decode_mod, "_decode_torch", torch_step)
    monkeypatch.setattr(decode_mod, "launch_decode", fused_step)
    cache = NSACache(1, 1, T, 16, config=CONFIG)
    m = int(m[1:])
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, h, m, 16, generator=g) for h in (2, 1, 1))
    try:
        decode_step(cache, q, k, v, fused={"none": None, "true": True, "false": False}[fused])
    except ValueError as e:
        events.append(f"error:{type(e).__name__}")
    return _compact(events)


DECODE_CASES = [f"{fused}-m{m}" for fused in ("none", "true", "false") for m in (1, 2)]


TABLE = """
flex-f16-grad-none-one-scored-plain | compressed:flex(128x128+bwd lists), scoring:triton_lse, selected:flex_fwd_triton_bwd, selected:flex(16x16), window:flex(128x128+bwd lists)
flex-f16-grad-none-one-scored-sg | compressed:flex(128x128+bwd lists), scoring:triton_lse, importance:torch, selected:flex(16x16+bwd lists), window:flex(128x128+bwd lists)
flex-f16-grad-none-one-given-plain | compressed:flex(128x128+bwd lists), selected:flex_fwd_triton_bwd, selected:flex(16x16), window:flex(128x128+bwd lists)
flex-f16-grad-none-one-given-sg | compressed:flex(128x128+bwd lists), importance:torch, selected:flex(16x16+bwd lists), window:flex(128x128+bwd lists)
flex-f16-grad-none-packed-scored-plain | compressed:flex(128x128+bwd lists), scoring:triton_lse, selected:triton, window:flex(128x128+bwd lists)
flex-f16-grad-none-packed-given-plain | compressed:flex(128x128+bwd lists), selected:triton, window:flex(128x128+bwd lists)
flex-f16-grad-score-one-scored-plain | scoring:torch, compressed:flex(128x128+bwd lists), selected:flex(16x16+bwd lists), window:flex(128x128+bwd lists)
flex-f16-grad-score-one-scored-sg | scoring:torch, compressed:flex(128x128+bwd lists), importance:torch, selected:flex(16x16+bwd lists), window:flex(128x128+bwd lists)
flex-f16-grad-score-one-given-plain | compressed:flex(128x128+bwd lists), selected:flex(16x16+bwd lists), window:flex(128x128+bwd lists)
flex-f16-grad-score-one-given-sg | compressed:flex(128x128+bwd lists), importance:torch, selected:flex(16x16+bwd lists), window:flex(128x128+bwd lists)
flex-f16-grad-score-packed-scored-plain | scoring:torch, compressed:flex(128x128+bwd lists), selected:flex(128x128+bwd lists), window:flex(128x128+bwd lists)
flex-f16-grad-score-packed-given-plain | compressed:flex(128x128+bwd lists), selected:flex(128x128+bwd lists), window:flex(128x128+bwd lists)
flex-f16-grad-mask-one-scored-plain | scoring:torch, compressed:flex(128x128+bwd lists), selected:flex(16x16+bwd lists), window:flex(128x128+bwd lists)
flex-f16-grad-mask-one-scored-sg | scoring:torch, compressed:flex(128x128+bwd lists), importance:torch, selected:flex(16x16+bwd lists), window:flex(128x128+bwd lists)
flex-f16-grad-mask-one-given-plain | compressed:flex(128x128+bwd lists), selected:flex(16x16+bwd lists), window:flex(128x128+bwd lists)
flex-f16-grad-mask-one-given-sg | compressed:flex(128x128+bwd lists), importance:torch, selected:flex(16x16+bwd lists), window:flex(128x128+bwd lists)
flex-f16-grad-mask-packed-scored-plain | scoring:torch, compressed:flex(128x128+bwd lists), selected:flex(128x128+bwd lists), window:flex(128x128+bwd lists)
flex-f16-grad-mask-packed-given-plain | compressed:flex(128x128+bwd lists), selected:flex(128x128+bwd lists), window:flex(128x128+bwd lists)
flex-f16-nograd-none-one-scored-plain | compressed:flex(128x128+bwd lists), scoring:triton_lse, selected:flex(16x16), window:flex(128x128+bwd lists)
flex-f16-nograd-none-one-scored-sg | compressed:flex(128x128+bwd lists), scoring:triton_lse, importance:torch, selected:flex(16x16), window:flex(128x128+bwd lists)
flex-f16-nograd-none-one-given-plain | compressed:flex(128x128+bwd lists), selected:flex(16x16), window:flex(128x128+bwd lists)
flex-f16-nograd-none-one-given-sg | compressed:flex(128x128+bwd lists), importance:torch, selected:flex(16x16), window:flex(128x128+bwd lists)
flex-f16-nograd-none-packed-scored-plain | compressed:flex(128x128+bwd lists), scoring:triton_lse, selected:triton, window:flex(128x128+bwd lists)
flex-f16-nograd-none-packed-given-plain | compressed:flex(128x128+bwd lists), selected:triton, window:flex(128x128+bwd lists)
flex-f16-nograd-score-one-scored-plain | scoring:torch, compressed:flex(128x128+bwd lists), selected:flex(16x16), window:flex(128x128+bwd lists)
flex-f16-nograd-score-one-scored-sg | scoring:torch, compressed:flex(128x128+bwd lists), importance:torch, selected:flex(16x16), window:flex(128x128+bwd lists)
flex-f16-nograd-score-one-given-plain | compressed:flex(128x128+bwd lists), selected:flex(16x16), window:flex(128x128+bwd lists)
flex-f16-nograd-score-one-given-sg | compressed:flex(128x128+bwd lists), importance:torch, selected:flex(16x16), window:flex(128x128+bwd lists)
flex-f16-nograd-score-packed-scored-plain | scoring:torch, compressed:flex(128x128+bwd lists), selected:flex(128x128+bwd lists), window:flex(128x128+bwd lists)
flex-f16-nograd-score-packed-given-plain | compressed:flex(128x128+bwd lists), selected:flex(128x128+bwd lists), window:flex(128x128+bwd lists)
flex-f16-nograd-mask-one-scored-plain | scoring:torch, compressed:flex(128x128+bwd lists), selected:flex(16x16), window:flex(128x128+bwd lists)
flex-f16-nograd-mask-one-scored-sg | scoring:torch, compressed:flex(128x128+bwd lists), importance:torch, selected:flex(16x16), window:flex(128x128+bwd lists)
flex-f16-nograd-mask-one-given-plain | compressed:flex(128x128+bwd lists), selected:flex(16x16), window:flex(128x128+bwd lists)
flex-f16-nograd-mask-one-given-sg | compressed:flex(128x128+bwd lists), importance:torch, selected:flex(16x16), window:flex(128x128+bwd lists)
flex-f16-nograd-mask-packed-scored-plain | scoring:torch, compressed:flex(128x128+bwd lists), selected:flex(128x128+bwd lists), window:flex(128x128+bwd lists)
flex-f16-nograd-mask-packed-given-plain | compressed:flex(128x128+bwd lists), selected:flex(128x128+bwd lists), window:flex(128x128+bwd lists)
flex-f32-grad-none-one-scored-plain | scoring:triton, compressed:flex(128x128+bwd lists), selected:flex_fwd_triton_bwd, selected:flex(16x16), window:flex(128x128+bwd lists)
flex-f32-grad-none-one-scored-sg | scoring:triton, compressed:flex(128x128+bwd lists), importance:torch, selected:flex(16x16+bwd lists), window:flex(128x128+bwd lists)
flex-f32-grad-none-one-given-plain | compressed:flex(128x128+bwd lists), selected:flex_fwd_triton_bwd, selected:flex(16x16), window:flex(128x128+bwd lists)
flex-f32-grad-none-one-given-sg | compressed:flex(128x128+bwd lists), importance:torch, selected:flex(16x16+bwd lists), window:flex(128x128+bwd lists)
flex-f32-grad-none-packed-scored-plain | scoring:triton, compressed:flex(128x128+bwd lists), selected:triton, window:flex(128x128+bwd lists)
flex-f32-grad-none-packed-given-plain | compressed:flex(128x128+bwd lists), selected:triton, window:flex(128x128+bwd lists)
flex-f32-grad-score-one-scored-plain | scoring:torch, compressed:flex(128x128+bwd lists), selected:flex(16x16+bwd lists), window:flex(128x128+bwd lists)
flex-f32-grad-score-one-scored-sg | scoring:torch, compressed:flex(128x128+bwd lists), importance:torch, selected:flex(16x16+bwd lists), window:flex(128x128+bwd lists)
flex-f32-grad-score-one-given-plain | compressed:flex(128x128+bwd lists), selected:flex(16x16+bwd lists), window:flex(128x128+bwd lists)
flex-f32-grad-score-one-given-sg | compressed:flex(128x128+bwd lists), importance:torch, selected:flex(16x16+bwd lists), window:flex(128x128+bwd lists)
flex-f32-grad-score-packed-scored-plain | scoring:torch, compressed:flex(128x128+bwd lists), selected:flex(128x128+bwd lists), window:flex(128x128+bwd lists)
flex-f32-grad-score-packed-given-plain | compressed:flex(128x128+bwd lists), selected:flex(128x128+bwd lists), window:flex(128x128+bwd lists)
flex-f32-grad-mask-one-scored-plain | scoring:torch, compressed:flex(128x128+bwd lists), selected:flex(16x16+bwd lists), window:flex(128x128+bwd lists)
flex-f32-grad-mask-one-scored-sg | scoring:torch, compressed:flex(128x128+bwd lists), importance:torch, selected:flex(16x16+bwd lists), window:flex(128x128+bwd lists)
flex-f32-grad-mask-one-given-plain | compressed:flex(128x128+bwd lists), selected:flex(16x16+bwd lists), window:flex(128x128+bwd lists)
flex-f32-grad-mask-one-given-sg | compressed:flex(128x128+bwd lists), importance:torch, selected:flex(16x16+bwd lists), window:flex(128x128+bwd lists)
flex-f32-grad-mask-packed-scored-plain | scoring:torch, compressed:flex(128x128+bwd lists), selected:flex(128x128+bwd lists), window:flex(128x128+bwd lists)
flex-f32-grad-mask-packed-given-plain | compressed:flex(128x128+bwd lists), selected:flex(128x128+bwd lists), window:flex(128x128+bwd lists)
flex-f32-nograd-none-one-scored-plain | scoring:triton, compressed:flex(128x128+bwd lists), selected:flex(16x16), window:flex(128x128+bwd lists)
flex-f32-nograd-none-one-scored-sg | scoring:triton, compressed:flex(128x128+bwd lists), importance:torch, selected:flex(16x16), window:flex(128x128+bwd lists)
flex-f32-nograd-none-one-given-plain | compressed:flex(128x128+bwd lists), selected:flex(16x16), window:flex(128x128+bwd lists)
flex-f32-nograd-none-one-given-sg | compressed:flex(128x128+bwd lists), importance:torch, selected:flex(16x16), window:flex(128x128+bwd lists)
flex-f32-nograd-none-packed-scored-plain | scoring:triton, compressed:flex(128x128+bwd lists), selected:triton, window:flex(128x128+bwd lists)
flex-f32-nograd-none-packed-given-plain | compressed:flex(128x128+bwd lists), selected:triton, window:flex(128x128+bwd lists)
flex-f32-nograd-score-one-scored-plain | scoring:torch, compressed:flex(128x128+bwd lists), selected:flex(16x16), window:flex(128x128+bwd lists)
flex-f32-nograd-score-one-scored-sg | scoring:torch, compressed:flex(128x128+bwd lists), importance:torch, selected:flex(16x16), window:flex(128x128+bwd lists)
flex-f32-nograd-score-one-given-plain | compressed:flex(128x128+bwd lists), selected:flex(16x16), window:flex(128x128+bwd lists)
flex-f32-nograd-score-one-given-sg | compressed:flex(128x128+bwd lists), importance:torch, selected:flex(16x16), window:flex(128x128+bwd lists)
flex-f32-nograd-score-packed-scored-plain | scoring:torch, compressed:flex(128x128+bwd lists), selected:flex(128x128+bwd lists), window:flex(128x128+bwd lists)
flex-f32-nograd-score-packed-given-plain | compressed:flex(128x128+bwd lists), selected:flex(128x128+bwd lists), window:flex(128x128+bwd lists)
flex-f32-nograd-mask-one-scored-plain | scoring:torch, compressed:flex(128x128+bwd lists), selected:flex(16x16), window:flex(128x128+bwd lists)
flex-f32-nograd-mask-one-scored-sg | scoring:torch, compressed:flex(128x128+bwd lists), importance:torch, selected:flex(16x16), window:flex(128x128+bwd lists)
flex-f32-nograd-mask-one-given-plain | compressed:flex(128x128+bwd lists), selected:flex(16x16), window:flex(128x128+bwd lists)
flex-f32-nograd-mask-one-given-sg | compressed:flex(128x128+bwd lists), importance:torch, selected:flex(16x16), window:flex(128x128+bwd lists)
flex-f32-nograd-mask-packed-scored-plain | scoring:torch, compressed:flex(128x128+bwd lists), selected:flex(128x128+bwd lists), window:flex(128x128+bwd lists)
flex-f32-nograd-mask-packed-given-plain | compressed:flex(128x128+bwd lists), selected:flex(128x128+bwd lists), window:flex(128x128+bwd lists)
triton-f16-grad-none-one-scored-plain | compressed:flex(128x128+bwd lists), scoring:triton_lse, selected:triton, window:flex(128x128+bwd lists)
triton-f16-grad-none-one-given-plain | compressed:flex(128x128+bwd lists), selected:triton, window:flex(128x128+bwd lists)
triton-f16-grad-none-packed-scored-plain | compressed:flex(128x128+bwd lists), scoring:triton_lse, selected:triton, window:flex(128x128+bwd lists)
triton-f16-grad-none-packed-given-plain | compressed:flex(128x128+bwd lists), selected:triton, window:flex(128x128+bwd lists)
triton-f16-nograd-none-one-scored-plain | compressed:flex(128x128+bwd lists), scoring:triton_lse, selected:triton, window:flex(128x128+bwd lists)
triton-f16-nograd-none-one-given-plain | compressed:flex(128x128+bwd lists), selected:triton, window:flex(128x128+bwd lists)
triton-f16-nograd-none-packed-scored-plain | compressed:flex(128x128+bwd lists), scoring:triton_lse, selected:triton, window:flex(128x128+bwd lists)
triton-f16-nograd-none-packed-given-plain | compressed:flex(128x128+bwd lists), selected:triton, window:flex(128x128+bwd lists)
triton-f32-grad-none-one-scored-plain | scoring:triton, compressed:flex(128x128+bwd lists), selected:triton, window:flex(128x128+bwd lists)
triton-f32-grad-none-one-given-plain | compressed:flex(128x128+bwd lists), selected:triton, window:flex(128x128+bwd lists)
triton-f32-grad-none-packed-scored-plain | scoring:triton, compressed:flex(128x128+bwd lists), selected:triton, window:flex(128x128+bwd lists)
triton-f32-grad-none-packed-given-plain | compressed:flex(128x128+bwd lists), selected:triton, window:flex(128x128+bwd lists)
triton-f32-nograd-none-one-scored-plain | scoring:triton, compressed:flex(128x128+bwd lists), selected:triton, window:flex(128x128+bwd lists)
triton-f32-nograd-none-one-given-plain | compressed:flex(128x128+bwd lists), selected:triton, window:flex(128x128+bwd lists)
triton-f32-nograd-none-packed-scored-plain | scoring:triton, compressed:flex(128x128+bwd lists), selected:triton, window:flex(128x128+bwd lists)
triton-f32-nograd-none-packed-given-plain | compressed:flex(128x128+bwd lists), selected:triton, window:flex(128x128+bwd lists)
none-m1 | decode:torch
none-m2 | decode:torch
true-m1 | decode:fused
true-m2 | error:ValueError
false-m1 | decode:torch
false-m2 | decode:torch
"""


def _table() -> dict[str, str]:
    rows = [line.split(" | ") for line in TABLE.strip().splitlines()]
    return {case: events for case, events in rows}


@pytest.mark.parametrize("case", list(_cases()))
def test_attend_paths(case, monkeypatch):
    assert _attend_events(case, monkeypatch) == _table()[case]


@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_paths(case, monkeypatch):
    assert _decode_events(case, monkeypatch) == _table()[case]
