"""select_blocks (the chunked selection every backend shares) against the reference."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from hypothesis import given, settings, strategies as st

from nsa_flex import NSAConfig, mean_compress, reference as R, select_blocks
from nsa_flex.triton_support import triton_missing
from nsa_flex.selection import block_importance

from strategies import Shape, configs, make_qkv, shapes

# the scoring and top-n kernels, under Triton's interpreter on the CPU
needs_triton = pytest.mark.skipif(bool(triton_missing()), reason="needs the triton package")


def chosen_scores(idx, scores):
    """Sorted scores of the chosen blocks (padding as -1): equal for any valid tie-break."""
    vals = scores.gather(-1, idx.clamp_min(0).long())
    vals = torch.where(idx >= 0, vals, torch.full_like(vals, -1.0))
    return vals.sort(dim=-1).values


@given(configs(), shapes(max_t=400, max_work=600_000), st.integers(1, 97), st.integers(0, 2**31 - 1))
def test_select_blocks_matches_reference(config, shape, chunk, seed):
    q, k, _ = make_qkv(shape, seed)
    k_cmp = mean_compress(k, config)
    ref_idx, ref_scores = R.select_blocks(q, k_cmp, config, 0.3)
    idx = select_blocks(q, k_cmp, config=config, scale=0.3, chunk_size=chunk)
    assert idx.shape == ref_idx.shape and idx.dtype == torch.int32
    # the same number of valid entries, forced ones included, and equally good picks
    assert torch.equal((idx >= 0).sum(-1), (ref_idx >= 0).sum(-1))
    torch.testing.assert_close(chosen_scores(idx, ref_scores), chosen_scores(ref_idx, ref_scores), rtol=1e-9, atol=1e-12)
    assert_ascending_then_padding(idx)


def assert_ascending_then_padding(idx):
    valid = idx >= 0
    assert (valid[..., 1:] <= valid[..., :-1]).all(), "padding only after the valid entries"
    both = valid[..., 1:] & valid[..., :-1]
    assert (idx.diff(dim=-1)[both] > 0).all(), "valid entries strictly ascending"


@given(configs(), st.integers(1, 300), st.integers(0, 2**31 - 1))
def test_overlap_mapping_equals_the_token_rule(config, T, seed):
    tc = config.num_compressed(T)
    p = torch.rand(2, 3, tc, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(block_importance(p, config, T), p @ R.overlap_matrix(T, config))


def test_score_and_mask_mods_shape_the_selection():
    config = NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=3, num_initial=0, num_local=1)
    q, k, _ = make_qkv(__import__("strategies").Shape(1, 1, 2, 64, 16, 16), seed=5)
    k_cmp = mean_compress(k, config)
    # a score_mod that strongly favours early blocks makes them win
    favour_early = lambda s, b, h, qi, ki: s - 1.0 * ki  # steep, but no exp underflow ties
    idx = select_blocks(q, k_cmp, config=config, score_mod=favour_early)
    ref, _ = R.select_blocks(q, k_cmp, config, 16**-0.5, score_mod=favour_early)
    assert torch.equal(idx, ref)
    assert (idx[0, 0, 63, :2] == torch.tensor([0, 1], dtype=torch.int32)).all()
    # a mask_mod hiding everything leaves only forced blocks plus zero-score candidates
    nothing = lambda b, h, qi, ki: ki < 0
    idx_masked = select_blocks(q, k_cmp, config=config, mask_mod=nothing)
    assert (idx_masked[..., 63, :] >= 0).sum() == 3


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.bytes = max(self.bytes, t.numel() * t.element_size())
        return out


def test_memory_is_bounded_by_the_chunk():
    # T=4096, Hq=32, Tc=255: the whole score matrix would be 128 MiB; a chunk of 64 queries
    # is 2 MiB, and no intermediate may be larger than a few chunks' worth.
    config = NSAConfig()
    q = torch.randn(1, 32, 4096, 16)
    k_cmp = torch.randn(1, 2, config.num_compressed(4096), 16)
    with LargestTensor() as seen:
        idx = select_blocks(q, k_cmp, config=config, chunk_size=64)
    assert seen.bytes <= 4 * 2**20
    # and the chunking does not change the answer
    assert torch.equal(idx, select_blocks(q, k_cmp, config=config))


@pytest.mark.parametrize(
    "bad, exc, match",
    [
        (lambda q, kc: (q[0], kc), ValueError, "q must have 4"),
        (lambda q, kc: (q, kc[:, :, :-1]), ValueError, "Tc"),
        (lambda q, kc: (q, kc.float()), TypeError, "k_cmp"),
        (lambda q, kc: (q, kc[:, :, :, :8]), ValueError, "head dim"),
        (lambda q, kc: (q[:, :3], kc), ValueError, "multiple"),
        (lambda q, kc: ("q", kc), TypeError, "q must be a torch.Tensor"),
    ],
)
def test_select_blocks_rejects_bad_input(bad, exc, match):
    config = NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=3)
    q = torch.randn(1, 4, 40, 16, dtype=torch.float64)
    kc = torch.randn(1, 2, config.num_compressed(40), 16, dtype=torch.float64)
    with pytest.raises(exc, match=match):
        select_blocks(*bad(q, kc), config=config)


def test_steps_reject_bad_input():
    from nsa_flex.selection import top_n_blocks

    config = NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=3)
    with pytest.raises(ValueError, match="Tc = 9"):
        block_importance(torch.rand(1, 1, 8), config, 40)
    with pytest.raises(TypeError, match="p_cmp must have a floating"):
        block_importance(torch.ones(1, 1, 9, dtype=torch.long), config, 40)
    with pytest.raises(ValueError, match="seq_len must be >= 1"):
        block_importance(torch.rand(1, 1, 0), config, 0)
    with pytest.raises(ValueError, match="scores must cover the 5 blocks"):
        top_n_blocks(torch.rand(1, 1, 40, 4), config)
    with pytest.raises(ValueError, match="q_start must be >= 0"):
        top_n_blocks(torch.rand(1, 1, 40, 5), config, q_start=-1)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        top_n_blocks(torch.rand(5), config)


@needs_triton
@pytest.mark.parametrize("G", [1, 3, 16])
@settings(max_examples=10)  # the interpreter is slow
@given(configs(), st.integers(1, 300), st.integers(1, 2), st.integers(0, 2**31 - 1))
def test_fused_scores_kernel_matches_reference(G, config, T, Hkv, seed):
    # The Triton scoring kernel (CUDA's default path) under the CPU interpreter, float32.
    from nsa_flex.ops.scoring import launch_scoring as _select_fused

    shape = Shape(1, Hkv, G, T, 32, 16)
    q, k, _ = make_qkv(shape, seed)
    q, k_cmp = q.float(), mean_compress(k, config).float()
    ref_idx, ref_scores = R.select_blocks(q.double(), k_cmp.double(), config, 0.3)
    idx = _select_fused(q, k_cmp, config, 0.3, chunk_size=128)  # T > 128: chunks meet too
    assert idx.shape == ref_idx.shape and idx.dtype == torch.int32
    assert torch.equal((idx >= 0).sum(-1), (ref_idx >= 0).sum(-1))
    torch.testing.assert_close(chosen_scores(idx, ref_scores), chosen_scores(ref_idx, ref_scores), rtol=1e-5, atol=1e-6)
    assert_ascending_then_padding(idx)


@needs_triton
@settings(max_examples=10)
@given(configs(), st.integers(1, 200), st.booleans(), st.integers(0, 2**31 - 1))
def test_fused_scores_from_the_compressed_branch_lse(config, T, grad, seed):
    # attend() on CUDA hands the scoring kernel the compressed branch's log-sum-exp (one pass
    # instead of two): FlexAttention's, as compressed_branch returns it, with or without
    # autograd (on the CPU those are different FlexAttention paths).
    from nsa_flex.flex import branches
    from nsa_flex.ops.scoring import launch_scoring as _select_fused

    q, k, v = make_qkv(Shape(2, 2, 3, T, 32, 16), seed)
    q, k_cmp, v_cmp = q.float(), mean_compress(k, config).float(), mean_compress(v, config).float()
    ref_idx, ref_scores = R.select_blocks(q.double(), k_cmp.double(), config, 0.3)
    if k_cmp.shape[2] == 0:
        return  # nothing compressed: select_blocks never calls the kernel
    with torch.set_grad_enabled(grad):
        _, lse = branches.compressed_branch(q.requires_grad_(grad), k_cmp, v_cmp, config, 0.3, return_lse=True)
    q, lse = q.detach(), lse.detach()
    # natural log, -inf for a query that sees no block
    s = (q.double() @ k_cmp.double().repeat_interleave(3, dim=1).transpose(-1, -2)) * 0.3
    last = torch.arange(k_cmp.shape[2]) * config.compress_stride + config.compress_block - 1
    s = s.masked_fill(last > torch.arange(T)[:, None], float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, dim=-1), rtol=1e-5, atol=1e-5)
    idx = _select_fused(q, k_cmp, config, 0.3, chunk_size=128, lse=lse)
    assert torch.equal((idx >= 0).sum(-1), (ref_idx >= 0).sum(-1))
    torch.testing.assert_close(chosen_scores(idx, ref_scores), chosen_scores(ref_idx, ref_scores), rtol=1e-5, atol=1e-6)
    assert_ascending_then_padding(idx)


@needs_triton
def test_fused_scores_read_the_given_lse():
    # The kernel really reads the lse it is given (per batch row and head): lowering one head's
    # log-sum-exp by 30 weighs that head e^30 times more in the group's sum, so the selection
    # becomes that head's own; what the unchanged lse gives differs from it.
    from nsa_flex.flex import branches
    from nsa_flex.ops.scoring import launch_scoring as _select_fused

    config = NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=4, num_initial=1,
                       num_local=1, window=16)
    q, k, v = make_qkv(Shape(2, 1, 3, 160, 32, 16), 3)
    q, k_cmp, v_cmp = q.float(), mean_compress(k, config).float(), mean_compress(v, config).float()
    _, lse = branches.compressed_branch(q, k_cmp, v_cmp, config, 0.3, return_lse=True)
    shifted = lse.clone()
    shifted[1, 2] -= 30.0  # batch row 1, head 2
    idx = _select_fused(q, k_cmp, config, 0.3, lse=lse)
    head_2 = _select_fused(q, k_cmp, config, 0.3, lse=shifted)
    alone_idx, alone_scores = R.select_blocks(q[1:, 2:].double(), k_cmp[1:].double(), config, 0.3)
    torch.testing.assert_close(chosen_scores(head_2[1:], alone_scores), chosen_scores(alone_idx, alone_scores),
                               rtol=1e-4, atol=1e-6)
    assert torch.equal(head_2[:1], idx[:1])  # the other batch row is untouched
    assert not torch.equal(head_2[1:], idx[1:])
