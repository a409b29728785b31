"""The fused decode step's launch: Triton kernels for one token per row, split flash-decoding
style so that a single row spreads over the whole GPU. Four launches (``nsa_flex.kernels.decode``)
for a few rows, three (``nsa_flex.kernels.decode_batch``) for many rows of long contexts
(:func:`nsa_flex.tuning.decode_batched`); the split counts and tiles are :mod:`nsa_flex.tuning`'s."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import tuning
from .cache import compress_new_blocks, compressor_or_mean, write_rows

__all__ = ["launch_decode"]


def launch_decode(cache, q, k, v, gates, config, scale, compress_k, compress_v, splits=None,
                  batched=None) -> tuple[Tensor, Tensor]:
    """``decode._decode_torch`` for one token per row, in Triton launches.

    ``compress_k``/``compress_v`` as given to ``decode_step``: both ``None`` (the block mean)
    lets the first kernel write the new token and compress the block it completes; otherwise
    those two stay PyTorch operations. ``batched``: ``kernels.decode_batch`` (``True``) or
    ``kernels.decode`` (``False``) instead of :func:`nsa_flex.tuning.decode_batched`'s choice;
    ``splits``: ``(S1, S2)`` instead of :func:`nsa_flex.tuning.decode_splits` or
    :func:`nsa_flex.tuning.batch_decode_splits` (tests). Returns the output and the chosen
    blocks ``(B, Hkv, 1, n)``.
    """
    L = cache.max_len
    mean = compress_k is None and compress_v is None
    if not mean:
        start = cache.lengths
        t = start[:, None]
        write_rows(cache._k, torch.where(t < L, t, L), k)
        write_rows(cache._v, torch.where(t < L, t, L), v)
        compress_new_blocks(cache, start, 1, compressor_or_mean(compress_k, config), compressor_or_mean(compress_v, config))
    if batched is None:
        batched = tuning.decode_batched(q.device, q.shape[0] * k.shape[1], config.num_selected, config.num_select_blocks(L))
    launch = _launch_batch if batched else _launch_split
    return launch(cache, q, k, v, gates, config, scale, mean, splits)


def _shapes(cache, q, k, v, config):
    B, Hq, _, Dk = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    L = cache.max_len
    return B, Hq, Hkv, Hq // Hkv, Dk, Dv, L, config.num_compressed(L), config.num_select_blocks(L), config.num_selected


def _scratch(rows, G, tc, ns, n, P, Dv, device):
    """One float32 buffer, split: logits ``(R, G, Tc)``, keys ``(R, Ns)``, partial states
    ``m, l (R, P, G)`` and ``acc (R, P, G, Dv)``, chosen blocks ``(R, n)`` (int32); flat."""
    sizes = (rows * G * max(tc, 1), rows * ns, rows * P * G, rows * P * G, rows * P * G * Dv, rows * n)
    logits, keys, pm, pl, pacc, idx = torch.empty(sum(sizes), device=device, dtype=torch.float32).split(sizes)
    return logits, keys, pm, pl, pacc, idx.view(torch.int32)


def _launch_split(cache, q, k, v, gates, config, scale, mean, splits):
    """``kernels.decode``'s four launches."""
    from ..kernels.decode import block_keys_kernel, combine_kernel, compressed_split_kernel, sparse_split_kernel

    B, Hq, Hkv, G, Dk, Dv, L, tc, ns, n = _shapes(cache, q, k, v, config)
    l, d, ls, w = config.compress_block, config.compress_stride, config.select_block, config.window
    block_c, step = tuning.score_tiles(config)
    rows = B * Hkv
    s1, s2 = splits if splits is not None else tuning.decode_splits(q.device, rows, tc, ns, step)
    tiles = tuning.decode_tiles(G, Dk, Dv, config, tc, s1)
    nw = tiles.n_window  # a selected block, or a window tile, per program
    P = s1 + n + nw
    logits, keys, pm, pl, pacc, idx = _scratch(rows, G, tc, ns, n, P, Dv, q.device)
    out = torch.empty(B, Hq, 1, Dv, device=q.device, dtype=q.dtype)
    kc, vc = cache._k_cmp, cache._v_cmp
    scale_log2 = scale * tuning.LOG2E
    ieee = q.dtype == torch.float32
    dims = dict(G=G, BLOCK_G=tiles.block_g, BLOCK_DV=tiles.block_dv, num_warps=tiles.num_warps)

    compressed_split_kernel[(rows, s1)](
        q, cache._k, cache._v, k, v, kc, vc, cache.lengths, logits, pm, pl, pacc,
        q.stride(0), q.stride(1), q.stride(3), *cache._k.stride(), *cache._v.stride(),
        k.stride(0), k.stride(1), k.stride(3), v.stride(0), v.stride(1), v.stride(3),
        *kc.stride(), *vc.stride(), Hkv, L, tc, P, scale_log2,
        CMP_BLOCK=l, CMP_STRIDE=d, DK=Dk, DV=Dv, BLOCK_C=tiles.block_c_split, BLOCK_DK=tiles.block_dk,
        BLOCK_L=tiles.block_l, WRITE_NEW=mean, MEAN=mean, IEEE=ieee, **dims,
    )
    block_keys_kernel[(rows, s2)](
        cache.lengths, logits, pm, pl, keys, Hkv, L, tc, ns, P, s1,
        G=G, CMP_BLOCK=l, CMP_STRIDE=d, SEL_BLOCK=ls, N_INITIAL=config.num_initial, N_LOCAL=config.num_local,
        BLOCK_G=tiles.block_g, BLOCK_S1=tiles.block_s1, BLOCK_C=block_c, BLOCK_S=tuning.pow2(step), SEL_STEP=step,
        num_warps=tiles.num_warps,
    )
    sparse_split_kernel[(rows, n + nw)](
        q, cache._k, cache._v, cache.lengths, keys, idx, pm, pl, pacc,
        q.stride(0), q.stride(1), q.stride(3), *cache._k.stride(), *cache._v.stride(),
        Hkv, L, ns, P, s1, scale_log2,
        SEL_BLOCK=ls, N_SEL=n, WINDOW=w, DK=Dk, DV=Dv, TILE=tiles.tile, BLOCK_N=tiles.block_n,
        BLOCK_DK=tiles.block_dk, IEEE=ieee, **tuning.top_n_tiles(ns, n), **dims,
    )
    g_strides = gates.stride() if gates is not None else (0, 0, 0, 0)
    combine_kernel[(B * Hq,)](
        pm, pl, pacc, gates if gates is not None else out, out, cache.lengths,
        g_strides[0], g_strides[1], g_strides[3], out.stride(0), out.stride(1), out.stride(3),
        Hq, L, P, s1, G=G, N_SEL=n, DV=Dv, BLOCK_DV=tiles.block_dv, BLOCK_P=tiles.block_p,
        GATED=gates is not None, num_warps=tiles.num_warps,
    )
    return out, idx.view(B, Hkv, 1, n)


def _launch_batch(cache, q, k, v, gates, config, scale, mean, splits):
    """``kernels.decode_batch``'s three launches."""
    from ..kernels.decode_batch import compressed_window_kernel, select_kernel, selected_combine_kernel

    B, Hq, Hkv, G, Dk, Dv, L, tc, ns, n = _shapes(cache, q, k, v, config)
    l, d, ls, w = config.compress_block, config.compress_stride, config.select_block, config.window
    rows = B * Hkv
    s1, s2 = splits if splits is not None else tuning.batch_decode_splits(q.device, rows, tc, ns)
    tiles = tuning.decode_tiles(G, Dk, Dv, config, tc, s1)
    nw = tiles.n_window  # window programs of the first kernel
    more = tuning.batch_decode_tiles(Dv, G, config, ns, s1, nw)
    P = s1 + nw + n + 2  # partial-state slots per row (kernels.decode_batch)
    logits, keys, pm, pl, pacc, idx = _scratch(rows, G, tc, ns, n, P, Dv, q.device)
    out = torch.empty(B, Hq, 1, Dv, device=q.device, dtype=q.dtype)
    kc, vc = cache._k_cmp, cache._v_cmp
    arrivals = cache._arrivals
    scale_log2 = scale * tuning.LOG2E
    ieee = q.dtype == torch.float32
    dims = dict(G=G, BLOCK_DV=tiles.block_dv, num_warps=tiles.num_warps)
    merges = dict(BLOCK_SL=more.block_sl, HEADS=more.heads)

    compressed_window_kernel[(rows, s1 + nw)](
        q, cache._k, cache._v, k, v, kc, vc, cache.lengths, logits, pm, pl, pacc,
        q.stride(0), q.stride(1), q.stride(3), *cache._k.stride(), *cache._v.stride(),
        k.stride(0), k.stride(1), k.stride(3), v.stride(0), v.stride(1), v.stride(3),
        *kc.stride(), *vc.stride(), Hkv, L, tc, P, s1, scale_log2,
        CMP_BLOCK=l, CMP_STRIDE=d, WINDOW=w, DK=Dk, DV=Dv, TILE=tiles.tile, BLOCK_G=tiles.block_g,
        BLOCK_C=tiles.block_c_split, BLOCK_N=tiles.block_n, BLOCK_DK=tiles.block_dk,
        BLOCK_L=tiles.block_l, WRITE_NEW=mean, MEAN=mean, IEEE=ieee, **dims,
    )
    select_kernel[(rows, s2 + -(-G // more.heads))](
        cache.lengths, logits, pm, pl, pacc, keys, idx, arrivals, Hkv, L, tc, ns, P, s1, nw, s2,
        CMP_BLOCK=l, CMP_STRIDE=d, SEL_BLOCK=ls, N_SEL=n, N_INITIAL=config.num_initial, N_LOCAL=config.num_local,
        DV=Dv, BLOCK_G=tuning.pow2(G, 1), BLOCK_S1=tiles.block_s1, BLOCK_J=more.block_j, BLOCK_O=more.block_o,
        **tuning.top_n_tiles(ns, n), **merges, **dims,
    )
    g_strides = gates.stride() if gates is not None else (0, 0, 0, 0)
    selected_combine_kernel[(rows, n)](
        q, cache._k, cache._v, cache.lengths, idx, pm, pl, pacc, arrivals, gates if gates is not None else out, out,
        q.stride(0), q.stride(1), q.stride(3), *cache._k.stride(), *cache._v.stride(),
        g_strides[0], g_strides[1], g_strides[3], out.stride(0), out.stride(1), out.stride(3),
        B, Hkv, L, P, s1, nw, scale_log2,
        SEL_BLOCK=ls, N_SEL=n, DK=Dk, DV=Dv, TILE=tiles.tile, BLOCK_G=tiles.block_g, BLOCK_N=tiles.block_n,
        BLOCK_DK=tiles.block_dk, GATED=gates is not None, IEEE=ieee, **merges, **dims,
    )
    return out, idx.view(B, Hkv, 1, n)
