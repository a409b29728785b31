"""Top-n (nsa_flex.top_n and the Triton top-n of nsa_flex.ops.scoring): the tie rule, and the
kernel equal to top_n_blocks exactly."""

from unittest import mock

import pytest
import torch
from hypothesis import given, settings, strategies as st

from nsa_flex import NSAConfig
from nsa_flex.top_n import top_n_blocks
from nsa_flex.triton_support import triton_missing

from strategies import configs

needs_triton = pytest.mark.skipif(bool(triton_missing()), reason="needs the triton package")


def test_top_n_ties_take_the_lower_block_whatever_the_row_width():
    config = NSAConfig(compress_block=4, compress_stride=4, select_block=4, num_selected=3, num_initial=0, num_local=1)
    # query at position 17 (block 4 is its own, forced): blocks 0..3 tie at 0.5, a tie topk would break freely
    scores = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.0])
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for width in (5, 9, 40):
            s = torch.zeros(1, 1, 1, width, dtype=dtype)
            s[..., :5] = scores.to(dtype)
            idx = top_n_blocks(s, config, positions=torch.tensor([[[17]]]))
            assert idx.flatten().tolist() == [0, 1, 4], (dtype, width)
    # ties at zero, too; and a tiny positive score still beats zero
    s = torch.tensor([0.0, 0.0, 1e-30, 0.0, 0.0]).view(1, 1, 1, 5)
    assert top_n_blocks(s, config, 17).flatten().tolist() == [0, 2, 4]


@given(st.integers(0, 2**31 - 1))
def test_top_n_float32_and_float64_agree(seed):
    """Both tie rules (float32 widened and nudged, float64 sorted stably) pick the same blocks."""
    config = NSAConfig(compress_block=4, compress_stride=4, select_block=4, num_selected=5, num_initial=1, num_local=1)
    g = torch.Generator().manual_seed(seed)
    # few distinct values: many exact ties, zeros, and values a float32 step apart
    s = torch.randint(0, 4, (2, 3, 30, 12), generator=g).float() / 3
    s = s + (torch.rand(s.shape, generator=g) < 0.2) * torch.finfo(torch.float32).eps
    assert torch.equal(top_n_blocks(s, config, 10), top_n_blocks(s.double(), config, 10))
    # a per-row offset equals q_start
    pos = torch.arange(10, 40).view(1, 1, 30).expand(2, 1, 30)
    assert torch.equal(top_n_blocks(s, config, positions=pos), top_n_blocks(s, config, 10))


@needs_triton
@pytest.mark.parametrize("keys_in_registers", [2048, 16])  # one tile; tiles re-read each round
@settings(max_examples=15)
@given(configs(), st.integers(1, 700), st.integers(1, 24), st.integers(0, 2**31 - 1))
def test_top_n_kernel_is_top_n_blocks_exactly(keys_in_registers, config, T, C, seed):
    # The Triton top-n (CUDA's default, here under the interpreter) against top_n_blocks on
    # scores with many exact ties, zeros and neighbours a float32 step apart: the tie rule
    # (equal scores: the lower block first) fixes one answer, so the indices must be equal.
    from nsa_flex import tuning
    from nsa_flex.ops.scoring import launch_top_n as _top_n_fused
    from nsa_flex.top_n import top_n_blocks

    gen = torch.Generator().manual_seed(seed)
    ns = config.num_select_blocks(T)
    C = min(C, T)  # the last C queries (few programs: the interpreter is slow)
    start = T - C
    levels = torch.tensor([0.0, 0.25, 0.5, 0.5 + 2**-24, 1.0, 3.0])
    scores = levels[torch.randint(0, len(levels), (1, 2, C, ns), generator=gen)]
    expected = top_n_blocks(scores, config, start)
    # as the scoring kernel writes them: forced blocks +inf (non-candidates are never read)
    pos = torch.arange(start, T)[:, None] // config.select_block
    j = torch.arange(ns)
    forced = (j <= pos) & ((j < config.num_initial) | (j > pos - config.num_local))
    with mock.patch.object(tuning, "KEYS_IN_REGISTERS", keys_in_registers):
        got = _top_n_fused(scores.masked_fill(forced, float("inf")), config, start)
    assert torch.equal(got, expected)
