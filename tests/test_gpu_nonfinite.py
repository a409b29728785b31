"""Non-finite values on CUDA (docs/design.md, "Non-finite values"): FlexAttention's tiles bound
where a NaN value goes; the Triton kernels (selected branch, scoring, fused decode) keep it to the
queries that see it. Small shapes, seconds each.
"""

import pytest
import torch

from nsa_flex import NSAConfig, attend, mean_compress, reference as R, select_blocks
from nsa_flex.flex import compressed_branch, window_branch
from nsa_flex.masks import KV_BLOCK, Q_BLOCK, compressed_block_mask, sliding_window_block_mask
from nsa_flex.selection import top_n_blocks

from test_nonfinite import CONFIG, CU, NAN, _expected, _fused_nan_row, _inputs, _packed_inputs, _seen_by, _selection, _step_and_compare

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("gpu_numerics")]

TILES = NSAConfig(compress_block=16, compress_stride=8, select_block=64, num_selected=4, window=64)


def _listed(block_mask, key_tile):
    """``(nQ,)`` bool: Q tiles whose lists (partial or full) hold KV tile ``key_tile``."""
    def lists(num, idx):
        n = idx.shape[-1]
        return ((idx[0, 0] == key_tile) & (torch.arange(n, device=idx.device) < num[0, 0, :, None])).any(-1)

    out = lists(block_mask.kv_num_blocks, block_mask.kv_indices)
    if block_mask.full_kv_num_blocks is not None:
        out |= lists(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    return out.cpu()


@pytest.mark.parametrize("branch", ["window", "compressed"])
def test_flex_on_cuda_reaches_no_query_outside_the_tiles_that_list_the_value(branch):
    # window: 5 Q tiles, two of which list key 300's tile; compressed: 159 blocks, two KV tiles
    T, s, dim = (640, 300, 3) if branch == "window" else (1280, 140, 3)
    q, k, v = _inputs(T, torch.float32, B=1, Hkv=1, G=2, D=64, device="cuda")
    t = torch.arange(T)
    if branch == "window":
        run = lambda v: window_branch(q, k, v, TILES, 0.125)  # noqa: E731
        mask = sliding_window_block_mask(T, TILES.window, device="cuda")
        key_tile, seen = s // KV_BLOCK, (t >= s) & (t < s + TILES.window)
    else:
        k, v = mean_compress(k, TILES), mean_compress(v, TILES)  # block 140 is seen from token 1135
        run = lambda v: compressed_branch(q, k, v, TILES, 0.125)  # noqa: E731
        mask = compressed_block_mask(T, TILES, device="cuda")
        key_tile, seen = s // KV_BLOCK, t >= s * TILES.compress_stride + TILES.compress_block - 1
    clean = run(v)
    bad = v.clone()
    bad[0, 0, s, dim] = NAN
    got = run(bad)
    nan_rows = torch.isnan(got[0, :, :, dim]).any(0).cpu()
    assert nan_rows[seen].all()
    listed = _listed(mask, key_tile).repeat_interleave(Q_BLOCK)[:T]
    assert not listed.all()  # some tiles are outside: the bound says something
    assert not nan_rows[~listed].any()
    outside = (~listed).cuda()
    assert torch.equal(got[:, :, outside], clean[:, :, outside])


@pytest.mark.parametrize("what", ["v", "k"])
def test_triton_selected_kernel_on_cuda(what):
    T, G, b, h, s, dim = 200, 2, 1, 0, 121, 5
    q, k, v = _inputs(T, torch.float32, device="cuda")
    idx = _selection(q, k)
    k_cmp, v_cmp = mean_compress(k, CONFIG), mean_compress(v, CONFIG)

    def run(k, v):
        return attend(q, k, v, config=CONFIG, k_cmp=k_cmp, v_cmp=v_cmp, block_indices=idx, backend="triton",
                      return_aux=True)[1].o_slc

    clean = run(k, v)
    bad = {"k": k.clone(), "v": v.clone()}
    bad[what][b, h, s, dim] = NAN
    got = run(bad["k"], bad["v"])
    rows = _seen_by("o_slc", idx.cpu(), T, b, h, s).cuda()
    want = _expected(clean, rows, b, h, G, NAN, dim if what == "v" else None)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_triton_selected_kernel_keeps_packed_documents_apart_on_cuda():
    q, k, v, bad = (x.cuda() for x in _packed_inputs(torch.float32))
    cu = CU.cuda()
    idx = attend(q.double(), k.double(), v.double(), config=CONFIG, backend="reference", cu_seqlens=cu,
                 return_aux=True)[1].block_indices
    clean = attend(q, k, v, config=CONFIG, backend="triton", cu_seqlens=cu, block_indices=idx, return_aux=True)[1]
    got = attend(q, k, bad, config=CONFIG, backend="triton", cu_seqlens=cu, block_indices=idx, return_aux=True)[1]
    t = torch.arange(56, device="cuda")
    want = _expected(clean.o_slc, (t >= 5) & (t < 24), 0, 0, 2, NAN, 3)
    torch.testing.assert_close(got.o_slc, want, rtol=0, atol=0, equal_nan=True)


def test_reference_on_cuda_is_exact():
    T, G, b, h, s, dim = 64, 2, 0, 1, 30, 2
    q, k, v = _inputs(T, device="cuda")
    bad = v.clone()
    bad[b, h, s, dim] = NAN
    got = R.window_attention(q, k, bad, CONFIG, 0.25)
    t = torch.arange(T, device="cuda")
    want = _expected(R.window_attention(q, k, v, CONFIG, 0.25), (t >= s) & (t < s + CONFIG.window), b, h, G, NAN, dim)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_scoring_on_cuda_scores_a_nan_row_zero(dtype):
    """select_blocks' CUDA path (the Triton scoring kernel; bf16 through attend also reuses the
    compressed branch's log-sum-exp): rows before a NaN compressed key choose as without it,
    rows that see it take the forced blocks and the tie rule."""
    config = NSAConfig()
    T = 2048  # 32 blocks, 16 chosen: from token 1024 on, the scores decide
    q, k, v = _inputs(T, dtype, B=1, Hkv=2, G=4, D=64, device="cuda")
    k_cmp = mean_compress(k, config)
    bad = k_cmp.clone()
    bad[0, 1, 20, 4] = NAN  # seen from token 20 * 16 + 31 = 351
    first = 20 * config.compress_stride + config.compress_block - 1
    ties = top_n_blocks(torch.zeros(1, 2, T, config.num_select_blocks(T), device="cuda"), config)
    clean = select_blocks(q, k_cmp, config=config)
    got = select_blocks(q, bad, config=config)
    assert torch.equal(got[:, :, :first], clean[:, :, :first]) and torch.equal(got[:, 0], clean[:, 0])
    assert torch.equal(got[:, 1, first:], ties[:, 1, first:])
    if dtype == torch.bfloat16:
        got = attend(q, k, v, config=config, k_cmp=bad, return_aux=True)[1].block_indices
        assert torch.equal(got[:, 1, first:], ties[:, 1, first:])


def test_fused_decode_on_cuda_equals_the_forward_with_nan():
    _step_and_compare(True, [1] * 12, dtype=torch.float32, device="cuda")
    _step_and_compare(True, [1] * 11, rewind=(6, 3), dtype=torch.float32, device="cuda")
    _step_and_compare(False, [3, 2, 4, 3, 2], dtype=torch.float32, device="cuda")
    _fused_nan_row("cuda")
