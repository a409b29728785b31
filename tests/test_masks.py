"""BlockMask builders: the tile lists must cover the mask_mod exactly where it matters.

Eager FlexAttention reads only the mask_mod, so these properties are what stands between the
block lists and a wrong compiled result: every visible pair lies in a listed tile, every tile
listed as full is fully visible, and (for selections that select_blocks produces) no listed
tile is empty.
"""

import torch
from hypothesis import given, strategies as st

from nsa_flex import NSAConfig, mean_compress, reference as R, select_blocks
from nsa_flex.masks import (
    compressed_block_mask,
    selection_bits,
    selection_block_mask,
    sliding_window_block_mask,
)

from strategies import configs, make_qkv, shapes

block_sizes = st.sampled_from([(128, 128), (16, 16), (32, 16), (16, 64), (64, 32)])
# None: the default, whose KV tile is the selection block (lists built per Q tile)
selection_block_sizes = st.sampled_from([None, None, (128, 128), (16, 16), (32, 16), (16, 64), (64, 32)])


def dense_mask(block_mask, B, H):
    """Evaluate the BlockMask's mask_mod on every in-range pair: ``(B, H, Q, KV)`` bool."""
    q_len, kv_len = block_mask.seq_lengths
    b = torch.arange(B, dtype=torch.int32).view(B, 1, 1, 1)
    h = torch.arange(H, dtype=torch.int32).view(1, H, 1, 1)
    q = torch.arange(q_len, dtype=torch.int32).view(1, 1, q_len, 1)
    kv = torch.arange(kv_len, dtype=torch.int32).view(1, 1, 1, kv_len)
    return block_mask.mask_mod(b, h, q, kv).expand(B, H, q_len, kv_len)


def tiles(num, idx, nk):
    """Dense ``(B, H, nQ, nKV)`` bool from a (count, indices) pair of block lists."""
    listed = torch.arange(idx.shape[-1]) < num[..., None].long()
    out = torch.zeros(*idx.shape[:-1], nk + 1, dtype=torch.bool)
    return out.scatter_(-1, torch.where(listed, idx.long(), nk), True)[..., :nk]


def check_q_lists(block_mask, nq, nk):
    """The transposed lists (what the backward reads) list exactly the same tiles, ascending."""
    pairs = [(block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.q_num_blocks, block_mask.q_indices)]
    if block_mask.full_kv_num_blocks is not None:
        pairs.append((block_mask.full_kv_num_blocks, block_mask.full_kv_indices,
                      block_mask.full_q_num_blocks, block_mask.full_q_indices))
    for kv_num, kv_idx, q_num, q_idx in pairs:
        assert torch.equal(tiles(kv_num, kv_idx, nk).transpose(-2, -1), tiles(q_num, q_idx, nq))
        listed = torch.arange(q_idx.shape[-1]) < q_num[..., None].long()
        steps = q_idx[..., 1:] > q_idx[..., :-1]
        assert (steps | ~listed[..., 1:]).all(), "a Q list is not strictly ascending"


def check_block_mask(block_mask, B, H, tight=True):
    qb, kb = block_mask.BLOCK_SIZE
    q_len, kv_len = block_mask.seq_lengths
    nq, nk = -(-q_len // qb), -(-kv_len // kb)
    dense = dense_mask(block_mask, B, H)
    bm_b, bm_h = block_mask.kv_num_blocks.shape[:2]
    partial = tiles(block_mask.kv_num_blocks, block_mask.kv_indices, nk).expand(B, H, nq, nk)
    full = torch.zeros_like(partial)
    if block_mask.full_kv_num_blocks is not None:
        full = tiles(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, nk).expand(B, H, nq, nk)
    assert not (partial & full).any(), "a tile is listed both partial and full"
    check_q_lists(block_mask, nq, nk)
    # pad to whole tiles; padding counts as not visible
    padded = torch.zeros(B, H, nq * qb, nk * kb, dtype=torch.bool)
    padded[..., :q_len, :kv_len] = dense
    per_tile = padded.view(B, H, nq, qb, nk, kb)
    visible_somewhere = per_tile.any(dim=(3, 5))
    assert not (visible_somewhere & ~(partial | full)).any(), "a visible pair lies in an unlisted tile"
    in_range = torch.zeros_like(padded)
    in_range[..., :q_len, :kv_len] = True
    all_visible = (per_tile | ~in_range.view(B, H, nq, qb, nk, kb)).all(dim=(3, 5))
    assert not (full & ~all_visible).any(), "a tile listed as full has a hidden pair"
    if tight:
        assert not ((partial | full) & ~visible_somewhere).any(), "a listed tile has nothing visible"
    return dense


@given(configs(), st.integers(1, 600), block_sizes)
def test_compressed_block_mask_covers_its_mask(config, T, block_size):
    if config.num_compressed(T) == 0:
        return
    bm = compressed_block_mask(T, config, block_size=block_size)
    dense = check_block_mask(bm, 1, 1)
    kv_pos = R.compressed_kv_positions(T, config)
    assert torch.equal(dense[0, 0], kv_pos[None, :] <= torch.arange(T)[:, None])


@given(st.integers(1, 600), st.integers(1, 700), block_sizes)
def test_window_block_mask_covers_its_mask(T, window, block_size):
    bm = sliding_window_block_mask(T, window, block_size=block_size)
    dense = check_block_mask(bm, 1, 1)
    s = torch.arange(T)
    assert torch.equal(dense[0, 0], (s[None] <= s[:, None]) & (s[None] > s[:, None] - window))


@given(configs(), shapes(max_t=500, max_work=3_000_000), selection_block_sizes, st.integers(0, 2**31 - 1))
def test_selection_block_mask_from_select_blocks(config, shape, block_size, seed):
    q, k, _ = make_qkv(shape, seed)
    idx = select_blocks(q, mean_compress(k, config), config=config)
    bm = selection_block_mask(idx, config, group_size=shape.G, block_size=block_size)
    dense = check_block_mask(bm, shape.B, shape.Hkv)
    # folded rows: row t*G + g is token t; every head of a group sees the same keys
    allowed = R._allowed_by_selection(idx, config, shape.T)
    assert torch.equal(dense, allowed.repeat_interleave(shape.G, dim=2))


@given(configs(), st.integers(1, 300), st.sampled_from([1, 2, 3, 5, 16]), selection_block_sizes, st.integers(0, 2**31 - 1))
def test_selection_block_mask_from_arbitrary_indices(config, T, G, block_size, seed):
    # padding anywhere, repeated blocks and blocks after the query: still covered, still exact
    gen = torch.Generator().manual_seed(seed)
    ns = config.num_select_blocks(T)
    idx = torch.randint(-1, ns, (2, 2, T, config.num_selected), generator=gen, dtype=torch.int32)
    bm = selection_block_mask(idx, config, group_size=G, block_size=block_size)
    dense = check_block_mask(bm, 2, 2, tight=False)
    allowed = R._allowed_by_selection(idx, config, T)
    assert torch.equal(dense, allowed.repeat_interleave(G, dim=2))


def test_selection_bits_pack_and_dedupe():
    config = NSAConfig(compress_block=4, compress_stride=2, select_block=2, num_selected=4, num_initial=0, num_local=0)
    T = 80  # 40 blocks: two words
    idx = torch.tensor([[[[0, 31, 31, -1]] * T]], dtype=torch.int32)
    idx[0, 0, 5] = torch.tensor([39, 32, -1, 1])
    bits = selection_bits(idx, config)
    assert bits.shape == (1, 1, T, 2) and bits.dtype == torch.int32
    assert bits[0, 0, 0, 0].item() == (1 | (1 << 31)) - 2**32  # bit 31 is the sign bit
    assert bits[0, 0, 0, 1].item() == 0
    assert bits[0, 0, 5, 0].item() == 2 and bits[0, 0, 5, 1].item() == (1 | (1 << 7))


def test_full_tiles_exist_for_aligned_blocks():
    # With select_block 64 and 128-wide tiles, old blocks every query of a tile chose are full.
    config = NSAConfig(num_selected=4, num_initial=1, num_local=2)
    T = 1024
    idx = torch.full((1, 1, T, 4), -1, dtype=torch.int32)
    idx[..., 0] = 0
    idx[..., 1] = 1
    t = torch.arange(T)
    idx[0, 0, :, 2] = torch.clamp(t // 64 - 1, min=2)
    idx[0, 0, :, 3] = torch.clamp(t // 64, min=3)
    bm = selection_block_mask(idx, config, block_size=(128, 128))
    check_block_mask(bm, 1, 1, tight=False)
    assert int(bm.full_kv_num_blocks[0, 0, 2:].min()) >= 1  # tile 0 (blocks 0 and 1) is full


def test_repeated_blocks_do_not_make_a_tile_full():
    # Tokens 128..191 select [0, 0], tokens 192..255 select [0, 1]: counting the repeat twice
    # would call KV tile 0 (blocks 0 and 1) full for the first Q tile, whose tokens never
    # selected block 1.
    config = NSAConfig(num_selected=2, num_initial=0, num_local=0)
    T = 256
    idx = torch.zeros(1, 1, T, 2, dtype=torch.int32)
    idx[0, 0, 192:, 1] = 1
    bm = selection_block_mask(idx, config, block_size=(128, 128))
    dense = check_block_mask(bm, 1, 1, tight=False)
    assert not dense[0, 0, 128:192, 64:128].any()
    assert int(bm.full_kv_num_blocks[0, 0, 1]) == 0


def test_default_selection_tiles_are_one_token_by_one_block():
    # G=16 rows (one token) by l'=64 keys (one block): a token lists exactly its own blocks,
    # the older ones as full, its own (cut by causality) as partial.
    config = NSAConfig()
    T, G = 1000, 16
    q, k, _ = make_qkv(shapes_fixed(T, G), 0)
    idx = select_blocks(q, mean_compress(k, config), config=config)
    bm = selection_block_mask(idx, config, group_size=G)
    assert bm.BLOCK_SIZE == (16, 64)
    check_block_mask(bm, 1, 1)
    per_token = (idx >= 0).sum(-1)
    assert torch.equal(bm.kv_num_blocks + bm.full_kv_num_blocks, per_token.to(torch.int32))
    # partial: the own block only, unless the token is its last and so sees all of it
    t = torch.arange(T)
    assert torch.equal(bm.kv_num_blocks[0, 0], (t % 64 != 63).to(torch.int32))


@given(st.sampled_from([1, 2, 3, 6, 16, 24]), st.sampled_from([16, 32, 64]), st.integers(1, 400), st.integers(0, 2**31 - 1))
def test_default_selection_tiles_with_several_tokens_per_tile(G, ls, T, seed):
    # G < 16 puts several tokens in a Q tile (G = 3, 6 and 24 also cut tokens across tiles):
    # a block is full only if every one of them chose it
    config = NSAConfig(compress_block=16, compress_stride=16, select_block=ls, num_selected=4, num_initial=1, num_local=1)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, config.num_select_blocks(T), (1, 2, T, 4), generator=gen, dtype=torch.int32)
    bm = selection_block_mask(idx, config, group_size=G)
    assert bm.BLOCK_SIZE[1] == ls
    dense = check_block_mask(bm, 1, 2, tight=False)
    assert torch.equal(dense, R._allowed_by_selection(idx, config, T).repeat_interleave(G, dim=2))


def shapes_fixed(T, G):
    from strategies import Shape

    return Shape(1, 1, G, T, 32, 32)


def test_builders_reject_bad_sizes():
    import pytest

    with pytest.raises(ValueError, match="window"):
        sliding_window_block_mask(10, 0)
    with pytest.raises(ValueError, match="group_size"):
        selection_block_mask(torch.zeros(1, 1, 10, 2, dtype=torch.int32), NSAConfig(num_selected=2, num_initial=0), group_size=0)


def test_forward_only_selection_mask_skips_the_transposed_lists():
    config = NSAConfig()
    q, k, _ = make_qkv(shapes_fixed(700, 4), 1)
    idx = select_blocks(q, mean_compress(k, config), config=config)
    full = selection_block_mask(idx, config, group_size=4)
    fwd = selection_block_mask(idx, config, group_size=4, transposed=False)
    assert fwd.q_indices is None and fwd.full_q_indices is None and full.q_indices is not None
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        assert torch.equal(getattr(fwd, name), getattr(full, name)), name
