"""The bench's parts: each times its contenders at one length and returns their rows."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from .. import NSACache, attend, decode_step, masks, select_blocks, triton_backend, varlen
from ..api import _selected_branch
from ..compression import mean_compress
from .peers import flash_nsa_row
from .timing import (
    DOC_MIXES, Problem, Row, _cuda_graph, _fla, _full_flex, _inputs, _measure, _time, _triton_timeable, doc_lengths,
    failure,
)

# fla's NSA layer has no window branch (its needs flash-attn): shown next to its numbers
FLA_STAND_INS = "window: none (fla's needs flash-attn)"


def bench_selected(p: Problem, T: int, reps: int) -> list[Row]:
    q, k, v, _ = _inputs(p, T)
    config, scale = p.config, p.D**-0.5
    idx = select_blocks(q.detach(), mean_compress(k.detach(), config), config=config)
    flex = lambda: _selected_branch(q, k, v, idx, config, scale, backend="flex")  # as attend plans it
    with torch.no_grad():
        ref = flex()
    same = (ref, lambda o: o)
    rows = [_measure("selected", "nsa_flex flex", T, flex, (q, k, v), p.device, reps)]
    ok, why = _triton_timeable(p.device)
    if ok:
        rows.append(_measure("selected", "nsa_flex triton", T,
                             lambda: triton_backend.selected_branch(q, k, v, idx, config, scale), (q, k, v), p.device, reps,
                             check=same))
    else:
        rows.append(Row("selected", "nsa_flex triton", T, note=f"skipped: {why}"))
    fla = _fla()
    if fla is None or p.device.type != "cuda":
        rows.append(Row("selected", "fla parallel_nsa", T, note="skipped: needs fla-core and CUDA"))
    else:
        # fla's layout is (B, T, H, D); padding counts as -1 there too, told apart by counts
        qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        idx_t = idx.transpose(1, 2).long().contiguous()
        counts = (idx_t >= 0).sum(-1)
        rows.append(_measure(
            "selected", "fla parallel_nsa", T,
            lambda: fla(qt, kt, vt, block_indices=idx_t, block_counts=counts, block_size=config.select_block, scale=scale),
            (qt, kt, vt), p.device, reps, check=(ref, lambda o: o.transpose(1, 2)),
        ))
    return rows


def bench_layer(p: Problem, T: int, reps: int) -> list[Row]:
    q, k, v, gates = _inputs(p, T)
    config = p.config
    rows = []
    with torch.no_grad():
        ref = attend(q, k, v, gates, config=config)
    for backend in ("flex", "triton"):
        ok, why = (True, "") if backend == "flex" else _triton_timeable(p.device)
        if not ok:
            rows.append(Row("layer", f"nsa_flex {backend}", T, note=f"skipped: {why}"))
            continue
        rows.append(_measure("layer", f"nsa_flex {backend}", T,
                             lambda b=backend: attend(q, k, v, gates, config=config, backend=b),
                             (q, k, v, gates), p.device, reps,
                             check=None if backend == "flex" else (ref, lambda o: o)))
    fla = _fla()
    if fla is None or p.device.type != "cuda":
        rows.append(Row("layer", "fla parallel_nsa", T, note="skipped: needs fla-core and CUDA", stand_ins=FLA_STAND_INS))
    else:
        qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        g = gates.detach().transpose(1, 2).contiguous()
        rows.append(_measure(
            "layer", "fla parallel_nsa", T,
            lambda: fla(qt, kt, vt, g_cmp=g[..., 0], g_slc=g[..., 1], block_counts=config.num_selected,
                        block_size=config.select_block),
            (qt, kt, vt), p.device, reps,
            note="compression (l=d=64) + top-n + selection", stand_ins=FLA_STAND_INS,
        ))
    rows.append(flash_nsa_row("layer", p, T, q, k, v, gates, [T] * p.B, reps, ref=ref))
    return rows


def bench_full(p: Problem, T: int, reps: int) -> list[Row]:
    q, k, v, _ = _inputs(p, T)
    rows = []
    if p.device.type != "cuda":
        for name in ("SDPA cuDNN", "SDPA flash"):
            rows.append(Row("full", name, T, note="skipped: needs CUDA"))
    else:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for name, kind in (("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION), ("SDPA flash", SDPBackend.FLASH_ATTENTION)):

            def sdpa(kind=kind):
                with sdpa_kernel(kind):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

            try:
                rows.append(_measure("full", name, T, sdpa, (q, k, v), p.device, reps))
            except RuntimeError as e:  # a backend that refuses this shape or GQA
                rows.append(Row("full", name, T, note=f"failed: {failure(e, 100)}"))
    from torch.nn.attention.flex_attention import create_block_mask

    mask = create_block_mask(lambda b, h, qi, kv: kv <= qi, None, None, T, T, device=p.device)
    fn = _full_flex(p.device)
    rows.append(_measure("full", "FlexAttention", T,
                         lambda: fn(q, k, v, block_mask=mask, enable_gqa=True), (q, k, v), p.device, reps))
    return rows


def decode_bytes(config, T: int, B: int, Hq: int, Hkv: int, Dk: int, Dv: int, itemsize: int) -> int:
    """The bytes one decode step must move with ``T`` tokens cached per row (the new one at
    position ``T``): for each row and KV head the visible compressed keys and values, the ``n``
    selected blocks' and the window's raw ones (counted apart, as the kernels read them), the
    new token's K/V written; the queries read and the output written. Scratch is not counted:
    this is the floor that achieved GB/s are measured against. SDPA over the cache moves
    ``B * Hkv * (T + 1) * (Dk + Dv) * itemsize``."""
    t = T  # the new token's position
    n_vis = config.num_compressed(t + 1)
    cur = t // config.select_block
    n_sel = min(config.num_selected, cur + 1)
    sel_tokens = n_sel * config.select_block - (config.select_block - 1 - t % config.select_block)  # the current block holds t+1 mod l'
    kv_tokens = n_vis + sel_tokens + min(config.window, t + 1) + 1
    return B * (Hkv * kv_tokens * (Dk + Dv) + Hq * (Dk + Dv)) * itemsize


def decode_inputs(p: Problem, B: int, T: int, m: int = 1):
    """``(cache, q, k, v, gates)`` of a decode step of ``m`` tokens per row after ``T``: an
    ``NSACache`` of ``B`` rows and ``max_len = T + m`` holding ``T`` random tokens each (with
    their mean-compressed blocks), and the step's random inputs, seeded by ``T``."""
    g = torch.Generator(device=p.device).manual_seed(T)
    cache = NSACache(B, p.Hkv, T + m, p.D, config=p.config, device=p.device, dtype=p.dtype)
    cache.k[:, :, :T].normal_(generator=g)  # in place, in the cache's dtype: no float32 copy
    cache.v[:, :, :T].normal_(generator=g)
    tc = p.config.num_compressed(T)
    for b in range(B):  # a row at a time: the compression's temporaries of 128 rows are large
        cache.k_cmp[b : b + 1, :, :tc] = mean_compress(cache.k[b : b + 1, :, :T], p.config)
        cache.v_cmp[b : b + 1, :, :tc] = mean_compress(cache.v[b : b + 1, :, :T], p.config)
    cache.lengths.fill_(T)
    q, k, v = (torch.empty(B, h, m, p.D, device=p.device, dtype=p.dtype).normal_(generator=g)
               for h in (p.Hq, p.Hkv, p.Hkv))
    gates = torch.rand(B, p.Hq, m, 3, generator=g, device=p.device).to(p.dtype)
    return cache, q, k, v, gates


def bench_decode(p: Problem, T: int, reps: int, batches=(1, 8), spec: int = 4) -> list[Row]:
    """One decode step with ``T`` tokens cached: NSA (eager and CUDA graph) against SDPA over
    the whole cache, for each batch size; the fused rows note the GB/s of :func:`decode_bytes`.
    The cache is filled with random K/V (a step's cost does not depend on what it holds); each
    timed step decodes position ``T`` and rewinds, so it can repeat. ``spec > 1`` adds a
    speculative step of ``spec`` tokens per row (``nsa spec``, the PyTorch step: the kernels
    take one token)."""
    rows = []
    for B in batches:
        try:
            cache, q, k1, v1, gates = decode_inputs(p, B, T)
            g = torch.Generator(device=p.device).manual_seed(T + 1)
            k_full, v_full = (torch.empty(B, p.Hkv, T + 1, p.D, device=p.device, dtype=p.dtype).normal_(generator=g)
                              for _ in range(2))
        except (RuntimeError, ValueError) as e:  # out of memory, most likely
            rows.append(Row("decode", f"B={B}", T, note=f"failed: {failure(e, 100)}"))
            continue

        def nsa():
            out = decode_step(cache, q, k1, v1, gates, fused=False)
            cache.lengths.sub_(1)  # rewind: one small kernel (rewind_ would add a clamp)
            cache._bound = T
            return out

        def nsa_fused():
            out = decode_step(cache, q, k1, v1, gates, fused=True)
            cache.lengths.sub_(1)
            cache._bound = T
            return out

        def sdpa():
            return F.scaled_dot_product_attention(q, k_full, v_full, enable_gqa=True)

        times = {}
        contenders = [("nsa", nsa), ("sdpa", sdpa)]
        fused_err = None
        if _triton_timeable(p.device)[0]:
            contenders.insert(1, ("nsa fused", nsa_fused))
            with torch.no_grad():  # the same step both ways, checked before any timing
                want, got = nsa().float(), nsa_fused().float()
            fused_err = float((got - want).norm() / want.norm())
        for name, fn in contenders:
            for graphed in (False, True):
                label = f"{name} B={B}" + (" graph" if graphed else "")
                row = Row("decode", label, T)
                if graphed and p.device.type != "cuda":
                    row.note = "skipped: CUDA graphs need CUDA"
                    rows.append(row)
                    continue
                try:
                    with torch.no_grad():
                        run = _cuda_graph(fn) if graphed else fn
                        row.fwd_ms = _time(run, p.device, reps)
                    times[(name, graphed)] = row.fwd_ms
                except (RuntimeError, AssertionError, ValueError, TypeError) as e:
                    row.note = f"failed: {failure(e)}"
                rows.append(row)
        for row in rows[-2 * len(contenders):]:
            graphed = row.name.endswith("graph")
            full = times.get(("sdpa", graphed))
            if row.name.startswith("nsa") and row.fwd_ms and full:
                row.note = f"full/this: {full / row.fwd_ms:.2f}x"
            if row.name.startswith("nsa fused") and fused_err is not None:
                row.note = f"{row.note}  rel err vs the PyTorch step {fused_err:.1e}".strip()
            if row.name.startswith("nsa fused") and row.fwd_ms:
                nbytes = decode_bytes(p.config, T, B, p.Hq, p.Hkv, p.D, p.D, q.element_size())
                row.note = f"{row.note}  {nbytes / row.fwd_ms / 1e6:.0f} GB/s of {nbytes / 1e6:.1f} MB".strip()
        del cache, k_full, v_full
        if spec > 1:
            rows += _bench_speculative(p, T, reps, B, spec)
    return rows


def _bench_speculative(p: Problem, T: int, reps: int, B: int, m: int) -> list[Row]:
    """``nsa spec m=M B=B`` rows: a decode step of ``m`` tokens per row (eager, and graphed on
    CUDA), rewound after each timing."""
    rows = []
    try:
        cache, q, k, v, gates = decode_inputs(p, B, T, m)
    except (RuntimeError, ValueError) as e:
        return [Row("decode", f"nsa spec m={m} B={B}", T, note=f"failed: {failure(e, 100)}")]

    def step():
        out = decode_step(cache, q, k, v, gates)
        cache.lengths.sub_(m)
        cache._bound = T
        return out

    for graphed in (False, True):
        row = Row("decode", f"nsa spec m={m} B={B}" + (" graph" if graphed else ""), T,
                  note=f"{m} tokens per row, the PyTorch step")
        if graphed and p.device.type != "cuda":
            row.note = "skipped: CUDA graphs need CUDA"
        else:
            try:
                with torch.no_grad():
                    row.fwd_ms = _time(_cuda_graph(step) if graphed else step, p.device, reps)
            except (RuntimeError, AssertionError, ValueError, TypeError) as e:
                row.note = f"failed: {failure(e)}"
        rows.append(row)
    del cache
    return rows


def bench_varlen(p: Problem, T: int, reps: int, mixes: dict[str, tuple[int, int]] | None = None,
                 seed: int = 0) -> list[Row]:
    """Packed documents: for each mix (name -> each document's ``(lo, hi)`` tokens, default
    :data:`DOC_MIXES`' ``"mix"``), ``p.B`` rows of ``T`` tokens, each split into documents by
    :func:`doc_lengths` (row ``b`` with seed ``seed + b``), laid end to end as one packed row of
    ``p.B * T`` tokens. Each row is labelled with its mix; a mix that does not fit in ``T`` gives
    one skipped row."""
    rows = []
    for mix, (lo, hi) in (mixes or {"mix": DOC_MIXES["mix"]}).items():
        try:
            lengths = [n for b in range(p.B) for n in doc_lengths(T, lo, hi, seed + b)]
        except ValueError as e:
            new = [Row("varlen", "every contender", T, note=f"skipped: {mix} ({lo}..{hi} tokens): {e}")]
        else:
            new = _varlen_rows(p, T, reps, lengths)
        for r in new:
            r.mix = mix
        rows += new
    return rows


def _varlen_rows(p: Problem, T: int, reps: int, lengths: list[int]) -> list[Row]:
    """Every varlen contender on one packed row of ``sum(lengths) = p.B * T`` tokens."""
    from torch.nn.attention.flex_attention import and_masks, create_block_mask

    packed = sum(lengths)
    q, k, v, gates = _inputs(replace(p, B=1), packed)
    config = p.config
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=p.device)
    docs = varlen.documents(cu)  # the one host read of cu_seqlens, outside the timings
    note = f"{len(lengths)} doc{'s' * (len(lengths) > 1)}, {min(lengths)}..{max(lengths)} tokens"
    if p.B > 1:
        note += f"; {p.B} rows of {T} as one packed row of {packed}"
    rows = []
    with torch.no_grad():
        ref = attend(q, k, v, gates, config=config, cu_seqlens=docs)
    for backend in ("flex", "triton"):
        ok, why = (True, "") if backend == "flex" else _triton_timeable(p.device)
        if not ok:
            rows.append(Row("varlen", f"nsa_flex {backend}", T, note=f"skipped: {why}"))
            continue
        rows.append(_measure("varlen", f"nsa_flex {backend}", T,
                             lambda b=backend: attend(q, k, v, gates, config=config, backend=b, cu_seqlens=docs),
                             (q, k, v, gates), p.device, reps, note=note,
                             check=None if backend == "flex" else (ref, lambda o: o)))
    fla = _fla()
    if fla is None or p.device.type != "cuda":
        rows.append(Row("varlen", "fla parallel_nsa", T, note="skipped: needs fla-core and CUDA", stand_ins=FLA_STAND_INS))
    else:
        qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        g = gates.detach().transpose(1, 2).contiguous()
        try:
            rows.append(_measure(
                "varlen", "fla parallel_nsa", T,
                lambda: fla(qt, kt, vt, g_cmp=g[..., 0], g_slc=g[..., 1], block_counts=config.num_selected,
                            block_size=config.select_block, cu_seqlens=cu.long()),
                (qt, kt, vt), p.device, reps,
                note=f"{note}; compression (l=d=64) + top-n + selection", stand_ins=FLA_STAND_INS,
            ))
        except Exception as e:  # an fla version whose varlen path refuses this setup
            rows.append(Row("varlen", "fla parallel_nsa", T, note=f"failed: {type(e).__name__}: {str(e)[:100]}",
                            stand_ins=FLA_STAND_INS))
    rows.append(flash_nsa_row("varlen", p, T, q, k, v, gates, lengths, reps, ref=ref, note=note))
    doc_causal = and_masks(masks.causal_mask, masks.document_mask(docs.doc_id))
    mask = create_block_mask(doc_causal, None, None, packed, packed, device=p.device)
    fn = _full_flex(p.device)
    rows.append(_measure("varlen", "FlexAttention doc", T,
                         lambda: fn(q, k, v, block_mask=mask, enable_gqa=True), (q, k, v), p.device, reps,
                         note=f"full causal attention within documents; {note}"))

    bounds = [(s, s + n) for s, n in zip(docs.starts, docs.lengths) if n]  # on the host

    def sdpa_per_document():
        outs = [F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True, enable_gqa=True)
                for s, e in bounds]
        return torch.cat(outs, dim=2)

    rows.append(_measure("varlen", "SDPA per document", T, sdpa_per_document, (q, k, v), p.device, reps,
                         note=f"one SDPA call per document (default backend); {note}"))
    return rows


PARTS = {
    "selected": bench_selected,
    "layer": bench_layer,
    "full": bench_full,
    "decode": bench_decode,
    "varlen": bench_varlen,
}
