"""Every tile, warp, stage, split and chunk decision, in one place, keyed by its inputs.

The kernels and FlexAttention calls take their launch settings from here, never inline, so a
tuning change is one edit and a reader sees every choice side by side (flash-attn's
``hopper/tile_size.h`` habit). Module constants are read when a function is called, so tests
may patch them (``SEGMENT``, ``MAX_SLOTS``, ``KEYS_IN_REGISTERS``). The numbers measured behind
these choices are in docs/benchmarks.md ("Measurements behind the design"); the reasons stay
here.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from ._validation import check_int
from .config import NSAConfig, check_config

LOG2E = 1.4426950408889634  # log2(e): the kernels' softmax runs in base 2

# FlexAttention's default tile; its kernels' default block sizes divide it. (Public as
# nsa_flex.masks.Q_BLOCK / KV_BLOCK.)
Q_BLOCK = 128
KV_BLOCK = 128

# Bytes one chunk's (B, Hq, chunk, Tc) score tensor may take in the PyTorch selection. The
# softmax output is a second such tensor and the mask and the mapping add smaller ones, so
# selection's extra memory is about two to three times this (the GPU test checks < 2 GiB at
# T=65536, the reference shape). The scoring kernel's (B, Hkv, chunk, Ns) buffer uses it too.
CHUNK_BYTES = 512 * 2**20

# The top-n kernels (the full forward's and the decode step's) hold up to this many block keys
# per query in registers (T = 128k with l' = 64); more are read again from memory in each of
# their n rounds.
KEYS_IN_REGISTERS = 2048

# A budget for each selected-branch kernel's shared memory, under the H200's 227 KiB per block
# with room for Triton's own staging: an upper bound counting every loop-carried load as
# pipelined.
SMEM_BUDGET = 192 * 2**10

# Segments of a block's query list in the dK/dV pass (see kernels.selected's
# selected_dkdv_partial_kernel): at least SEGMENT queries each, more where the scratch would
# pass MAX_SLOTS slots per (batch row, KV head).
SEGMENT = 1024
MAX_SLOTS = 512


def pow2(x: int, least: int = 16) -> int:
    """The smallest power of two ``>= x`` and ``>= least`` (Triton tile sizes; 16 is
    ``tl.dot``'s smallest)."""
    return max(least, 1 << max(0, x - 1).bit_length())


# ------------------------------------------------------------------------ FlexAttention


def flex_kernel_options(q: torch.Tensor, v: torch.Tensor, block_size: tuple[int, int]) -> dict | None:
    """Tile sizes for FlexAttention's CUDA kernels, chosen to fit shared memory on every dtype
    and head dim (``None`` on the CPU).

    Inductor's single default config for the forward kernel overflowed the H200's 227 KiB of
    shared memory in some cases (bf16 with D=64 at T=4099; fp32 with Dk=192: 240-272 KiB
    asked), and with autotuning off it has no fallback. 64x64 tiles with two stages fit:
    fp32 with D=256 needs ~200 KiB (64x32 tiles past D=128). These are safe rather than tuned.
    """
    if not q.is_cuda:
        return None
    return flex_tile_options(q.element_size(), max(q.shape[-1], v.shape[-1]), tuple(block_size))


def flex_tile_options(element_size: int, head_dim: int, block_size: tuple[int, int] = (128, 128)) -> dict:
    """Kernel tiles that divide the BlockMask's ``(Q tile, KV tile)``, as FlexAttention needs.

    The forward's warps and stages carry FlexAttention's ``fwd_`` prefix, so that the backward
    keeps Inductor's own (unprefixed, they would apply to both kernels, and 4 warps, 2 stages
    made the backward of the compressed and window branches several times slower).
    ``BLOCK_M``/``BLOCK_N`` stay unprefixed: only the forward reads them, and FlexAttention's
    decoding kernel (queries shorter than 128) checks an unprefixed ``BLOCK_M`` before it
    strips prefixes (torch 2.11; without it, it derives a ``BLOCK_M`` that need not divide the
    tiles and finds no kernel). For the selected branch's small tiles (one token's 16 rows by
    one 64-key block) the backward's tiles are given too, ``bwd_``-prefixed: its defaults
    (64-128 rows) would not divide them.
    """
    qb, kb = block_size
    wide = element_size >= 4 and head_dim > 128
    n = min(32 if wide else 64, kb)
    options = {"BLOCK_M": min(64, qb), "BLOCK_N": n, "fwd_num_stages": 2, "fwd_num_warps": 4}
    if qb < 128 or kb < 128:
        # dK/dV: BLOCK_N1 keys against BLOCK_M1 query rows at a time (N1 % M1 == 0);
        # dQ: BLOCK_M2 rows against BLOCK_N2 keys at a time (M2 % N2 == 0).
        m2 = min(64, qb)
        options.update(bwd_BLOCK_M1=min(qb, n, 32), bwd_BLOCK_N1=n, bwd_BLOCK_M2=m2, bwd_BLOCK_N2=min(m2, n),
                       bwd_num_stages=2, bwd_num_warps=4)
    return options


def selection_tile(group_size: int, config: NSAConfig) -> tuple[int, int]:
    """The ``(Q tile, KV tile)`` the flex backend uses for the selected branch.

    KV tiles are the selection blocks themselves when ``l'`` is a power of two from 16 to 128
    (tiles then never straddle two blocks, so a tile is listed only for a block someone
    chose). A Q tile holds the ``G`` rows of one token, padded to 16 (the smallest matrix
    product tile): a tile of several tokens would list the union of their selections, and with
    ``n = 16`` blocks per token that union is mostly blocks each token does not use.

    Raises:
        TypeError, ValueError: ``group_size`` not a positive int, ``config`` not an
            :class:`NSAConfig`.
    """
    check_int("group_size", group_size, 1)
    check_config(config)
    ls = config.select_block
    if ls & (ls - 1) or not 16 <= ls <= 128:
        return Q_BLOCK, KV_BLOCK
    return pow2(group_size), ls


def flex_selected_tile(is_cuda: bool, group_size: int, config: NSAConfig, needs_backward: bool) -> tuple[int, int]:
    """The selected branch's BlockMask tile on FlexAttention: :func:`selection_tile` (one token
    by one block) unless FlexAttention's CUDA backward must run, which gets 128x128 tiles.

    Inductor (torch 2.11-2.13) drops every backward kernel config whose tiles do not divide the
    BlockMask's, before it looks at the tile sizes we pass, and its only half-precision config
    on Hopper for head dims 65-128 has 64/128-row tiles: with 16x64 tiles it finds no kernel
    ("NoValidChoicesError"). 128x128 tiles list the union of the blocks of 128 / G tokens, so
    they cost several times the work; eager CUDA training without user modifiers avoids them
    (the ``flex_fwd_triton_bwd`` path of :mod:`nsa_flex.dispatch`), user modifiers cannot.
    """
    if is_cuda and needs_backward:
        return Q_BLOCK, KV_BLOCK
    return selection_tile(group_size, config)


def compressed_kv_per_head(is_cuda: bool, group_size: int, needs_backward: bool) -> bool:
    """Whether the compressed branch gives each query head its own copy of ``k_cmp``/``v_cmp``.

    FlexAttention's dK/dV kernel gives each KV tile one program, which walks the queries of
    all G heads of its group in turn. With ~T/d compressed keys that is few programs with long
    walks (at 64k and the reference shape, 32 tiles x 4 KV heads for 132 SMs); one copy of the
    keys per query head gives G times as many, G times shorter. The copies are small (T/d
    rows) and autograd sums their gradients back over the group.
    """
    return group_size > 1 and is_cuda and needs_backward


# ------------------------------------------------------------- selected-branch kernels


def selected_kernel_meta(G: int, Dk: int, Dv: int, select_block: int, dtype: torch.dtype, kernel: str = "fwd") -> dict:
    """Tile sizes and launch settings of one selected-branch kernel: ``"fwd"``, ``"dq"`` or
    ``"dkdv"`` (both dK/dV kernels).

    ``fwd``/``dq`` stream key tiles of ``BLOCK_N`` keys past the group's ``BLOCK_G`` resident
    rows; ``dkdv`` streams row tiles of ``BLOCK_R`` (several queries' heads) past a resident
    ``BLOCK_N``-key tile and its float32 dK/dV accumulators. Tiles shrink (pipeline stages
    first) until the shared-memory bound fits ``SMEM_BUDGET`` for every dtype, head dim up to
    256 and group size.
    """
    block_g, block_dk, block_dv = pow2(G), pow2(Dk), pow2(Dv)
    size = torch.empty((), dtype=dtype).element_size()
    half = dtype != torch.float32
    d = block_dk + block_dv
    meta = dict(G=G, SEL_BLOCK=select_block, DK=Dk, DV=Dv, BLOCK_DK=block_dk, BLOCK_DV=block_dv,
                # float32 inputs get true float32 products (Triton's default would be TF32)
                IEEE=not half)
    if kernel in ("fwd", "dq"):
        # 32 keys, one warp, 2 stages: the best of 18 settings on the H200 (bf16, D=128, at
        # G=16 and G=4; scripts/probe_selected_tma.py, docs/benchmarks.md). The kernels are a
        # gather bound by L2 traffic, and one-warp programs keep more loads in flight per SM
        # (forward 15.4 against 20.2 ms at two warps, dQ 17.6 against 19.7, G=16, T=64k); TMA
        # tensor-descriptor loads were no faster. Wider rows or head dims keep 4 warps for the
        # accumulator's registers. float32's exact products run without tensor cores: past 16 rows of
        # D=128, 16-key tiles and 8 warps, or registers spill (seen compiling for sm_90).
        wide = not half and block_g * d > 16 * 256
        block_n = min(16 if wide else 32, pow2(select_block))
        stages = 2
        if half:
            warps = 1 if block_g <= 16 and max(block_dk, block_dv) <= 128 else 4
        else:
            warps = 8 if wide else 4
        resident = block_g * (block_dk if kernel == "fwd" else d) * size  # q (and dO)

        def smem(n, st):
            return resident + st * n * d * size
    elif kernel == "dkdv":
        # Key tile: up to 64 keys, fewer where the two float32 accumulators (BLOCK_N x D each,
        # in registers: 64 a thread at 8 warps) would pass 64 KiB, i.e. past D=128. Row tile: up
        # to 64 rows (at least the group), fewer where a q+dO tile would pass 64 KiB, or 16 KiB
        # in float32, whose exact products run without tensor cores and spill registers on
        # wider tiles (seen compiling for sm_90).
        block_n = min(64, pow2(select_block))
        while block_n > 16 and block_n * d * 4 > 64 * 2**10:
            block_n //= 2
        rows = max(64, block_g)
        while rows > block_g and rows * d * size > (64 if half else 16) * 2**10:
            rows //= 2
        stages = 2

        def smem(n, st):
            # K, V resident; q, dO pipelined; p and dS staged for the products
            return n * d * size + st * rows * d * size + 2 * rows * n * size
        meta["BLOCK_R"] = rows
    else:
        raise ValueError(f"kernel must be 'fwd', 'dq' or 'dkdv', got {kernel!r}")
    while smem(block_n, stages) > SMEM_BUDGET and (stages > 1 or block_n > 16):
        if stages > 1:
            stages -= 1
        else:
            block_n //= 2
    if kernel == "dkdv":
        if half:
            # 4 warps, one stage: the fastest of 36 settings on the H200 at the reference shape
            # (scripts/profile_selected.py --sweep=dkdv; docs/benchmarks.md), although 4 warps
            # spill a few registers
            warps, stages = 4, 1
        else:
            # float32: 8 warps, as at 4 the accumulators and score tiles spill registers (seen
            # compiling for sm_90 at G=3, D=64 and G=16, D=128); 4 for tiles too small for 8
            warps = 8 if block_n * d >= 64 * 64 else 4
    else:
        meta["BLOCK_G"] = block_g
    meta.update(BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    return meta


def dkdv_segment(list_len: int) -> int:
    """Queries per segment of the dK/dV pass when the lists of one (batch row, head) hold
    ``list_len = T * n`` entries in all: a power of two, at least ``SEGMENT``, and large enough
    that the later segments fit ``MAX_SLOTS`` slots."""
    return max(SEGMENT, pow2(-(-list_len // MAX_SLOTS), least=1))


# ------------------------------------------------------------------ scoring and top-n


def score_tiles(config: NSAConfig) -> tuple[int, int]:
    """``(BLOCK_C, SEL_STEP)`` of the scoring kernels: a step of ``SEL_STEP`` selection blocks
    needs ``SEL_STEP * l'/d + r - 1`` compressed blocks in one tile of ``BLOCK_C``."""
    r = config.compress_block // config.compress_stride
    per_sel = config.select_block // config.compress_stride
    block_c = max(64, pow2(per_sel + r - 1))
    return block_c, (block_c - r + 1) // per_sel


def importance_chunk(B: int, Hq: int, tc: int, dtype: torch.dtype) -> int:
    """Queries per chunk of the PyTorch importance: ``(B, Hq, chunk, Tc)`` scores within
    ``CHUNK_BYTES``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max(1, CHUNK_BYTES // max(1, B * Hq * tc * itemsize))


def scoring_launch(G: int, Dk: int, config: NSAConfig) -> dict:
    """Tiles of the scoring kernel: ``BLOCK_T`` tokens times the group's ``BLOCK_G`` heads, 64
    rows a program; ``BLOCK_C`` compressed blocks, ``SEL_STEP`` selection blocks a step."""
    block_c, step = score_tiles(config)
    block_g = pow2(G, least=1)
    return dict(BLOCK_DK=pow2(Dk), BLOCK_T=max(1, 64 // block_g), BLOCK_G=block_g, BLOCK_C=block_c,
                BLOCK_S=pow2(step), SEL_STEP=step, num_warps=4, num_stages=2)


def scoring_chunk(B: int, Hkv: int, ns: int, block_t: int) -> int:
    """Queries the scoring kernel scores at once: ``(B, Hkv, chunk, Ns)`` float32 within
    ``CHUNK_BYTES``, at least one program's ``block_t``."""
    return max(block_t, CHUNK_BYTES // max(1, B * Hkv * ns * 4))


def top_n_tiles(ns: int, n: int) -> dict:
    """The top-n's tiles (both its kernels): ``BLOCK_NS`` keys a round, all of them in
    registers (``ONE_TILE``) up to ``KEYS_IN_REGISTERS``; ``BLOCK_SEL`` slots."""
    block_ns = pow2(min(ns, KEYS_IN_REGISTERS))
    return dict(BLOCK_SEL=pow2(n, 2), BLOCK_NS=block_ns, ONE_TILE=ns <= block_ns)


def top_n_warps(block_ns: int) -> int:
    """Warps of the full forward's top-n kernel: one per 512 keys of a round, 1 to 4."""
    return max(1, min(4, block_ns // 512))


# ------------------------------------------------------------------------------ decode


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def decode_splits(device: torch.device, rows: int, tc: int, ns: int, sel_step: int) -> tuple[int, int]:
    """``(S1, S2)``: programs per (row, KV head) of the fused decode step's compressed branch and
    of its block keys.

    Two programs per SM in all, rounded down so that they run as one wave (the compressed
    kernel's registers hold two per SM at the reference shape); on the CPU interpreter a
    handful. Never more than the work has tiles: 16 compressed blocks for ``S1``; for ``S2``
    whole steps of ``sel_step`` selection blocks, the same number for every program.
    """
    if device.type == "cuda":
        target = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        target = 4
    per_row = max(1, target // rows)
    steps = -(-ns // sel_step)
    return max(1, min(per_row, -(-tc // 16))), -(-steps // -(-steps // per_row))


class DecodeTiles(NamedTuple):
    """The fused decode step's tiles (:func:`decode_tiles`)."""

    block_n: int  # keys a step of the selected and window programs
    tile: int  # keys per selected/window program: one selection block, rounded up to block_n
    n_window: int  # window programs, ceil(w / tile)
    block_c_split: int  # compressed blocks a step of a compressed split
    block_g: int
    block_dk: int
    block_dv: int
    block_l: int  # tokens of a compressed block, for the mean the first kernel computes
    block_s1: int  # the compressed splits that the block-keys kernel merges
    block_p: int  # partial states the combine kernel merges at once
    num_warps: int  # every kernel of the step, both sets


def decode_tiles(G: int, Dk: int, Dv: int, config: NSAConfig, tc: int, s1: int) -> DecodeTiles:
    """Tiles of the fused decode step, for ``tc`` compressed slots split ``s1`` ways."""
    ls, n = config.select_block, config.num_selected
    block_n = 32 if max(Dk, Dv) > 128 else 64
    block_n = min(block_n, pow2(ls))
    tile = block_n * -(-ls // block_n)
    nw = -(-config.window // tile)
    return DecodeTiles(
        block_n=block_n, tile=tile, n_window=nw, block_c_split=min(64, pow2(-(-tc // s1))), block_g=pow2(G),
        block_dk=pow2(Dk), block_dv=pow2(Dv), block_l=pow2(config.compress_block, 1), block_s1=pow2(s1, 1),
        block_p=min(64, pow2(max(s1, n, nw))), num_warps=4,
    )


def decode_batched(device: torch.device, rows: int, n: int, ns: int) -> bool:
    """Whether the fused decode step runs ``kernels.decode_batch``'s three launches instead of
    ``kernels.decode``'s four: where ranking each row's keys in every one of its ``n`` selected
    programs costs the four launches most. That is past ``KEYS_IN_REGISTERS`` candidate blocks
    (``max_len`` above 128k at the reference shape: every round of a ranking reads the keys
    again) once the selected programs fill two per SM, and from 1024 blocks (64k) once they
    fill 16 per SM. Measured on an H200 at the reference shape (docs/inference.md: the batched
    kernels 5% faster at 128k with B = 8, 1.57x with B = 128, 10% at 64k with B = 128; 2%
    slower at 64k with B = 32, slower at 8k and at B = 1). Never on the CPU (tests pick each)."""
    if device.type != "cuda":
        return False
    sm = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    selected = rows * n
    return (ns > KEYS_IN_REGISTERS and selected >= 2 * sm) or (ns >= 1024 and selected >= 16 * sm)


def batch_decode_splits(device: torch.device, rows: int, tc: int, ns: int) -> tuple[int, int]:
    """``(S1, S2)`` of ``kernels.decode_batch``: compressed splits as :func:`decode_splits`
    (at most 32, two steps of a merge); one keys program per step of ``block_j`` candidate
    blocks (:func:`batch_decode_tiles`), as they are short."""
    s1, _ = decode_splits(device, rows, tc, ns, 1)
    return min(s1, 32), -(-ns // _batch_block_j(ns))


def _batch_block_j(ns: int) -> int:
    return min(32, pow2(ns, 1))


class BatchDecodeTiles(NamedTuple):
    """``kernels.decode_batch``'s tiles beyond :class:`DecodeTiles` (:func:`batch_decode_tiles`)."""

    block_j: int  # selection blocks a step of the keys
    block_o: int  # compressed blocks that overlap one selection block, r - 1 + l'/d, padded
    block_sl: int  # partial states a step of a merge
    heads: int  # heads a merge takes at once


def batch_decode_tiles(Dv: int, G: int, config: NSAConfig, ns: int, s1: int, n_window: int) -> BatchDecodeTiles:
    """Tiles of ``kernels.decode_batch`` for ``ns`` selection blocks and ``s1`` compressed splits:
    merges of at most 16 slots, their ``(slots, heads, Dv)`` tiles at most 8192 floats."""
    d = config.compress_stride
    block_sl = min(16, pow2(max(s1, n_window, config.num_selected), 1))
    return BatchDecodeTiles(
        block_j=_batch_block_j(ns), block_o=pow2(config.compress_block // d - 1 + config.select_block // d, 1),
        block_sl=block_sl, heads=max(1, min(pow2(G, 1), 8192 // (block_sl * pow2(Dv)))),
    )
