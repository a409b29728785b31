"""Triton helpers shared by the kernels: tile loads, products, the compressed-block rule, the
overlap of compressed and selection blocks. ``@triton.jit`` functions only."""

import triton
import triton.language as tl


@triton.jit
def _batch_head(bh, Hkv):
    """Program index ``bh = b * Hkv + h`` split into ``(b, h)``, int64: 64-bit offsets, as
    ``B * Hq * T * D`` passes 2**31 at the reference shape once B >= 4."""
    return (bh // Hkv).to(tl.int64), (bh % Hkv).to(tl.int64)


@triton.jit
def _load_rows(ptr, stride_row, stride_col, rows, cols, row_mask, col_mask):
    return tl.load(ptr + rows[:, None] * stride_row + cols[None, :] * stride_col,
                   mask=row_mask[:, None] & col_mask[None, :], other=0.0)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # float32 inputs get true float32 products; Triton's default would be TF32
    if IEEE:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _split_dot(p, w):
    """``p @ w`` for float32 ``p`` and small whole-number weights ``w``, on tensor cores with
    about float32's precision: ``p`` is split into three parts of at most 8 significant bits
    each (24 in all, float32's count) whose sum is exactly ``p``; TF32 holds such parts, and
    ``w``, exactly, so every product is exact and only the accumulation, in float32 (on tensor
    cores, not necessarily rounded as IEEE adds would be), loses precision. A plain TF32
    product would round ``p`` to 11 bits before the top-n compares it; a float32 ("ieee")
    product runs on the CUDA cores and took much of the scoring kernel's time (docs/benchmarks.md).
    (The parts stay float32: Triton's interpreter multiplies bfloat16 tensors made in
    a kernel wrongly.)"""
    hi = p.to(tl.bfloat16).to(tl.float32)
    rest = p - hi
    mid = rest.to(tl.bfloat16).to(tl.float32)
    acc = tl.dot(hi, w, input_precision="tf32")
    acc = tl.dot(mid, w, acc, input_precision="tf32")
    return tl.dot(rest - mid, w, acc, input_precision="tf32")


@triton.jit
def _last_token(i, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr):
    """The last token ``i*d + l - 1`` of compressed block ``i``: where it becomes visible
    (``NSAConfig.compressed_last_token``)."""
    return i * CMP_STRIDE + CMP_BLOCK - 1


@triton.jit
def _num_visible(t, Tc, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr):
    """Compressed blocks whose last token ``i*d + l - 1`` is at or before ``t``, at most ``Tc``
    (``NSAConfig.num_visible_compressed``)."""
    n = tl.where(t >= CMP_BLOCK - 1, (tl.maximum(t, CMP_BLOCK - 1) - (CMP_BLOCK - 1)) // CMP_STRIDE + 1, 0)
    return tl.minimum(n, Tc)


@triton.jit
def _overlap_weights(i, j, jb, R: tl.constexpr, PER_SEL: tl.constexpr, SEL_STEP: tl.constexpr):
    """``(len(i), len(j))`` float32: the stride-chunks of ``d`` tokens that compressed block
    ``i`` (chunks ``i .. i + R - 1``) and selection block ``j`` (chunks ``j*PER_SEL ..``)
    share; 0 for the step's padding columns ``jb >= SEL_STEP`` (paper eq. 9)."""
    first = tl.maximum(i[:, None], (j * PER_SEL)[None, :])
    last = tl.minimum(i[:, None] + R - 1, (j * PER_SEL + PER_SEL - 1)[None, :])
    return tl.where((jb < SEL_STEP)[None, :], tl.maximum(last - first + 1, 0).to(tl.float32), 0.0)


@triton.jit
def _forced(j, cur, N_INITIAL: tl.constexpr, N_LOCAL: tl.constexpr):
    """Whether candidate block ``j`` is forced for a query in block ``cur``: one of the first
    ``N_INITIAL`` or of the ``N_LOCAL`` most recent."""
    return (j < N_INITIAL) | (j > cur - N_LOCAL)
