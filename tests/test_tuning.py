"""nsa_flex.tuning: every launch decision, against values written out by hand.

The literals were computed by the inline code before it moved here (issue 15): a change to
any of them is a tuning change, to be made on purpose (and timed, docs/benchmarks.md).
"""

import types

import pytest
import torch

from nsa_flex import NSAConfig, tuning

SMALL = NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=3, num_initial=1, num_local=1, window=8)


def test_selected_kernel_meta_at_the_reference_shape():
    bf16 = dict(G=16, SEL_BLOCK=64, DK=128, DV=128, BLOCK_DK=128, BLOCK_DV=128, IEEE=False)
    for kernel in ("fwd", "dq"):
        assert tuning.selected_kernel_meta(16, 128, 128, 64, torch.bfloat16, kernel) == dict(
            bf16, BLOCK_G=16, BLOCK_N=32, num_warps=1, num_stages=2)
    assert tuning.selected_kernel_meta(16, 128, 128, 64, torch.bfloat16, "dkdv") == dict(
        bf16, BLOCK_R=64, BLOCK_N=64, num_warps=4, num_stages=1)
    assert tuning.selected_kernel_meta(16, 128, 128, 64, torch.float32, "dkdv") == dict(
        bf16, IEEE=True, BLOCK_R=16, BLOCK_N=64, num_warps=8, num_stages=2)
    assert tuning.selected_kernel_meta(3, 64, 64, 64, torch.float32) == dict(
        G=3, SEL_BLOCK=64, DK=64, DV=64, BLOCK_DK=64, BLOCK_DV=64, IEEE=True, BLOCK_G=16, BLOCK_N=32,
        num_warps=4, num_stages=2)
    assert tuning.selected_kernel_meta(1, 256, 256, 16, torch.float16)["BLOCK_N"] == 16
    with pytest.raises(ValueError, match="kernel must be"):
        tuning.selected_kernel_meta(1, 16, 16, 16, torch.float16, "bwd")


def test_scoring_top_n_and_segments():
    assert tuning.score_tiles(NSAConfig()) == (64, 15) and tuning.score_tiles(SMALL) == (64, 31)
    assert tuning.scoring_launch(16, 128, NSAConfig()) == dict(
        BLOCK_DK=128, BLOCK_T=4, BLOCK_G=16, BLOCK_C=64, BLOCK_S=16, SEL_STEP=15, num_warps=4, num_stages=2)
    assert tuning.scoring_chunk(1, 4, 1024, 4) == 32768
    assert tuning.top_n_tiles(1024, 16) == dict(BLOCK_SEL=16, BLOCK_NS=1024, ONE_TILE=True)
    assert tuning.top_n_tiles(5000, 3) == dict(BLOCK_SEL=4, BLOCK_NS=2048, ONE_TILE=False)
    assert tuning.top_n_warps(1024) == 2 and tuning.top_n_warps(16) == 1
    assert [tuning.dkdv_segment(n) for n in (1, 65536 * 16, 10**7)] == [1024, 2048, 32768]
    assert tuning.importance_chunk(1, 64, 4095, torch.float32) == 512


def test_decode_splits_and_tiles(monkeypatch):
    monkeypatch.setattr(tuning, "_sm_count", lambda index: 132)  # an H200
    cuda = types.SimpleNamespace(type="cuda", index=0)
    assert tuning.decode_splits(cuda, 4, 4095, 1024, 3) == (66, 57)
    assert tuning.decode_splits(torch.device("cpu"), 1, 100, 10, 3) == (4, 4)
    assert tuple(tuning.decode_tiles(16, 128, 128, NSAConfig(), 4095, 66)) == (64, 64, 8, 64, 16, 128, 128, 32, 128, 64, 4)


def test_batched_decode_choice_splits_and_tiles(monkeypatch):
    monkeypatch.setattr(tuning, "_sm_count", lambda index: 132)  # an H200
    cuda = types.SimpleNamespace(type="cuda", index=0)
    # the reference shape (Hkv = 4, n = 16): batched past 128k (2049 blocks) from B = 8 (rows
    # 32), at 64k (1025 blocks) from B = 128
    assert tuning.decode_batched(cuda, 32, 16, 2049) and tuning.decode_batched(cuda, 512, 16, 1025)
    assert not tuning.decode_batched(cuda, 4, 16, 2049)  # B = 1: ranking in every program is shorter
    assert not tuning.decode_batched(cuda, 128, 16, 1025)  # B = 32 at 64k
    assert not tuning.decode_batched(cuda, 512, 16, 129)  # 8k: few blocks to rank
    assert not tuning.decode_batched(torch.device("cpu"), 512, 16, 2049)
    # 128 rows at 64k: one compressed split each (two programs per SM), 33 key steps of 32 blocks
    assert tuning.batch_decode_splits(cuda, 128, 4095, 1025) == (2, 33)
    assert tuning.batch_decode_splits(cuda, 1, 4095, 1025) == (32, 33)  # at most 32 splits
    # a selection block of 64 overlaps 5 compressed blocks (l = 32, d = 16); merges of 16
    # slots, 4 heads of 128 at once
    assert tuple(tuning.batch_decode_tiles(128, 16, NSAConfig(), 1025, 2, 8)) == (32, 8, 16, 4)


def test_flex_tiles():
    assert tuning.selection_tile(16, NSAConfig()) == (16, 64)
    assert tuning.selection_tile(3, NSAConfig(select_block=48)) == (128, 128)  # l' not a power of two
    assert tuning.flex_selected_tile(True, 16, NSAConfig(), needs_backward=True) == (128, 128)
    assert tuning.flex_selected_tile(False, 16, NSAConfig(), needs_backward=True) == (16, 64)
    assert tuning.compressed_kv_per_head(True, 16, True) and not tuning.compressed_kv_per_head(True, 1, True)


def test_kernel_tiles():
    cpu = torch.empty(1, 1, 1, 64)
    assert tuning.flex_kernel_options(cpu, cpu, (128, 128)) is None  # CPU
    for size, dim, block_n in [(2, 64, 64), (2, 256, 64), (4, 128, 64), (4, 192, 32), (4, 256, 32)]:
        opts = tuning.flex_tile_options(size, dim)
        assert opts["BLOCK_N"] == block_n and opts["BLOCK_M"] == 64 and opts["fwd_num_stages"] == 2
        # the BlockMask's 128-wide tiles must be multiples of the kernel's
        assert 128 % opts["BLOCK_M"] == 0 and 128 % opts["BLOCK_N"] == 0
        # warps and stages are the forward's: the backward keeps Inductor's own
        assert set(opts) == {"BLOCK_M", "BLOCK_N", "fwd_num_stages", "fwd_num_warps"}


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("block_size", [(16, 64), (16, 16), (32, 32), (64, 128), (128, 64)])
def test_kernel_tiles_divide_small_block_masks(size, dim, block_size):
    # FlexAttention's rules: sparse tiles are multiples of the kernel tiles, forward and
    # backward, and the backward's inner loops step evenly (N1 % M1 == 0, M2 % N2 == 0)
    qb, kb = block_size
    o = tuning.flex_tile_options(size, dim, block_size)
    assert qb % o["BLOCK_M"] == 0 and kb % o["BLOCK_N"] == 0
    if block_size != (128, 128):
        assert qb % o["bwd_BLOCK_M1"] == 0 and kb % o["bwd_BLOCK_N1"] == 0 and o["bwd_BLOCK_N1"] % o["bwd_BLOCK_M1"] == 0
        assert qb % o["bwd_BLOCK_M2"] == 0 and kb % o["bwd_BLOCK_N2"] == 0 and o["bwd_BLOCK_M2"] % o["bwd_BLOCK_N2"] == 0


@pytest.mark.parametrize(
    "dtype, D, G, select_block, block_n, block_n_dkdv",
    [(torch.bfloat16, 128, 16, 64, 32, 64), (torch.bfloat16, 256, 16, 64, 32, 32), (torch.float32, 128, 16, 64, 32, 64),
     (torch.float32, 256, 16, 64, 16, 32), (torch.float32, 192, 16, 64, 16, 32), (torch.bfloat16, 64, 16, 8, 16, 16),
     (torch.bfloat16, 64, 16, 48, 32, 64), (torch.float32, 256, 64, 64, 16, 16), (torch.bfloat16, 256, 64, 64, 32, 32),
     (torch.float16, 64, 1, 64, 32, 64)],
)
def test_tiles_fit_shared_memory(dtype, D, G, select_block, block_n, block_n_dkdv):
    size = torch.empty((), dtype=dtype).element_size()
    # an upper bound on each kernel's shared memory if every loop-carried load were pipelined:
    # forward/dQ stream K and V tiles past resident q (and dO); dK/dV streams q and dO rows
    # past resident K and V tiles, staging p^T and dS^T for the products
    for kernel in ("fwd", "dq"):
        meta = tuning.selected_kernel_meta(G, D, D, select_block, dtype, kernel)
        assert meta["BLOCK_N"] == block_n
        g, n, dk, dv, stages = meta["BLOCK_G"], meta["BLOCK_N"], meta["BLOCK_DK"], meta["BLOCK_DV"], meta["num_stages"]
        resident = g * (dk if kernel == "fwd" else dk + dv) * size
        assert resident + stages * n * (dk + dv) * size <= tuning.SMEM_BUDGET <= 200 * 2**10  # the H200 has 227 KiB per block
    meta = tuning.selected_kernel_meta(G, D, D, select_block, dtype, "dkdv")
    assert meta["BLOCK_N"] == block_n_dkdv and meta["BLOCK_R"] >= G
    r, n, dk, dv, stages = meta["BLOCK_R"], meta["BLOCK_N"], meta["BLOCK_DK"], meta["BLOCK_DV"], meta["num_stages"]
    assert n * (dk + dv) * size + stages * r * (dk + dv) * size + 2 * r * n * size <= tuning.SMEM_BUDGET
