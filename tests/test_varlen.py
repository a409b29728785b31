"""Packed documents (``cu_seqlens``): a packed row equals running each document alone.

For every backend, forward and gradients, random document lengths (empty ones, 1, lengths
below one block, several blocks). The triton backend runs under Triton's interpreter on the CPU
(tiny shapes, float32); tests/test_gpu_varlen.py runs moderate sizes on a GPU.
"""

import itertools

import pytest
import torch
from hypothesis import example, given, settings, strategies as st

import nsa_flex
from nsa_flex import BlockCompressor, NSAConfig, SparseAttention, attend, mean_compress, select_blocks
from nsa_flex import reference as R
from nsa_flex.masks import (
    compressed_varlen_block_mask,
    selection_block_mask,
    sliding_window_varlen_block_mask,
)
from nsa_flex.testing import assert_documents_isolated, assert_matches_reference
from nsa_flex.triton_backend import available
from nsa_flex.varlen import Documents, compressed_cu_seqlens, documents

from conftest import dynamo_limits
from strategies import configs, rel_err
from test_masks import block_sizes, check_block_mask
from test_selection import assert_ascending_then_padding, chosen_scores

TOL = 1e-10  # float64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not available(torch.device(DEVICE))[0], reason="no CUDA and no Triton interpreter")


@pytest.fixture(autouse=True)
def room_to_recompile():
    # On the CPU, flex gradients go through a Dynamo-traced call with one graph per shape (and
    # these tests try many lengths); drop the graphs afterwards so later tests start afresh.
    with dynamo_limits(4096, 1 << 16):
        yield
    torch._dynamo.reset()


@st.composite
def doc_lengths(draw, max_docs: int = 4, max_len: int = 80):
    """1 to ``max_docs`` document lengths: empty ones, 1, around block sizes, and any."""
    length = st.one_of(st.sampled_from([0, 1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33]), st.integers(1, max_len))
    return draw(st.lists(length, min_size=1, max_size=max_docs).filter(lambda ls: sum(ls) >= 1))


def close(a, b, tol=TOL):
    """Relative error below ``tol``, or an absolute one where both are ~0 (a gradient that
    vanishes, e.g. a softmax over one key, is rounding noise on both sides)."""
    return float((a.double() - b.double()).norm()) <= tol * max(float(b.double().norm()), 1.0)


def cu_of(lengths, dtype=torch.int32):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=dtype)


def pieces(lengths):
    """The token slice of each non-empty document."""
    out, s = [], 0
    for n in lengths:
        if n:
            out.append(slice(s, s + n))
        s += n
    return out


def cmp_slices(lengths, config):
    """The compressed-block slice of each non-empty document."""
    out, c = [], 0
    for n in lengths:
        tc = config.num_compressed(n)
        if n:
            out.append(slice(c, c + tc))
        c += tc
    return out


def make_inputs(lengths, config, Hkv, G, Dk, Dv, seed, dtype=torch.float64, given_cmp=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    tc = sum(config.num_compressed(n) for n in lengths)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()

    q, k, v = rnd(1, Hkv * G, T, Dk), rnd(1, Hkv, T, Dk), rnd(1, Hkv, T, Dv)
    gates = torch.rand(1, Hkv * G, T, 3, generator=g, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
    k_cmp = rnd(1, Hkv, tc, Dk) if given_cmp else None
    v_cmp = rnd(1, Hkv, tc, Dv) if given_cmp else None
    return q, k, v, gates, k_cmp, v_cmp


def _grads(loss, leaves):
    # a k_cmp without blocks (every document shorter than one) takes no part in the loss
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]


def packed_and_separate(backend, lengths, config, inputs, seed, fixed_selection=False):
    """Run the packed row and each document alone on the same leaves; return outputs, the
    selections and the gradients of one weighted loss for both."""
    q, k, v, gates, k_cmp, v_cmp = inputs
    leaves = [x for x in inputs if x is not None]
    cu = cu_of(lengths)
    out, aux = attend(q, k, v, gates, config=config, k_cmp=k_cmp, v_cmp=v_cmp, backend=backend,
                      cu_seqlens=cu, return_aux=True)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.device)
    grads = _grads((out.double() * w).sum(), leaves)

    outs, idxs = [], []
    for tok, blk in zip(pieces(lengths), cmp_slices(lengths, config)):
        part = lambda x, s: None if x is None else x[:, :, s]  # noqa: E731
        o, a = attend(q[:, :, tok], k[:, :, tok], v[:, :, tok], gates[:, :, tok], config=config,
                      k_cmp=part(k_cmp, blk), v_cmp=part(v_cmp, blk), backend=backend, return_aux=True,
                      block_indices=aux.block_indices[:, :, tok] if fixed_selection else None)
        outs.append(o)
        idxs.append(a.block_indices)
    sep = torch.cat(outs, dim=2)
    sep_grads = _grads((sep.double() * w).sum(), leaves)
    return (out, aux.block_indices, grads), (sep, torch.cat(idxs, dim=2), sep_grads)


@pytest.mark.parametrize("backend", ["reference", "flex"])
@settings(max_examples=15)
@given(configs(max_block=32), doc_lengths(), st.integers(1, 2), st.sampled_from([1, 2, 3]), st.booleans(),
       st.integers(0, 2**31 - 1))
@example(NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=3, num_initial=1, num_local=1, window=8),
         [20, 1, 0, 37, 5], 2, 2, True, 0)
def test_packed_equals_separate(backend, config, lengths, Hkv, G, given_cmp, seed):
    inputs = make_inputs(lengths, config, Hkv, G, 16, 24, seed, given_cmp=given_cmp)
    (out, idx, grads), (sep, sep_idx, sep_grads) = packed_and_separate(backend, lengths, config, inputs, seed)
    assert out.shape == sep.shape and torch.isfinite(out).all()
    assert torch.equal(idx, sep_idx), "the packed selection differs from the documents'"
    assert rel_err(out, sep) < TOL
    for a, b in zip(grads, sep_grads):
        assert close(a, b)


@needs_triton
@settings(max_examples=5)
@given(doc_lengths(max_docs=3, max_len=40), st.sampled_from([1, 3]), st.integers(0, 2**31 - 1))
@example([9, 0, 1, 30], 3, 1)
def test_packed_equals_separate_triton(lengths, G, seed):
    config = NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=3, num_initial=1, num_local=1, window=8)
    inputs = make_inputs(lengths, config, 1, G, 16, 16, seed, dtype=torch.float32, device=DEVICE)
    (out, idx, grads), (sep, _, sep_grads) = packed_and_separate("triton", lengths, config, inputs, seed, fixed_selection=True)
    assert rel_err(out, sep) < 1e-5
    for a, b in zip(grads, sep_grads):
        assert close(a, b, 1e-5)
    # and against the float64 reference on the same selection
    q, k, v, gates, k_cmp, v_cmp = [x.detach().double().cpu() for x in inputs]
    ref = attend(q, k, v, gates, config=config, k_cmp=k_cmp, v_cmp=v_cmp, backend="reference",
                 cu_seqlens=cu_of(lengths), block_indices=idx.cpu())
    assert rel_err(out, ref) < 1e-5


def packed_selected_and_reference(G, idx, select_block, cu, g):
    """The triton backend's selected attention over a packed row (``G`` query heads, one KV
    head, doc-local ``idx (1, 1, T, n)``, scale 0.3) and the float64 reference's ``o_slc``:
    ``(o, grads, ref, ref_grads)``, the gradients those of one random weighting, in q, k, v.
    ``q, k, v`` and the weighting are drawn from ``g``."""
    from nsa_flex.triton_backend import selected_attention

    T = idx.shape[2]
    q, k, v = (torch.randn(1, h, T, 16, generator=g).to(DEVICE).requires_grad_() for h in (G, 1, 1))
    o, _ = selected_attention(q, k, v, idx.to(DEVICE), select_block, 0.3, cu_seqlens=cu)
    w = torch.randn(o.shape, generator=g).to(DEVICE)
    grads = torch.autograd.grad((o * w).sum(), (q, k, v))
    config = NSAConfig(compress_block=4, compress_stride=4, select_block=select_block, num_selected=3,
                       num_initial=0, num_local=0)
    ref_in = [x.detach().double().cpu().requires_grad_() for x in (q, k, v)]
    ref = R.attend(*ref_in, config=config, block_indices=idx, scale=0.3, cu_seqlens=cu).o_slc
    ref_grads = torch.autograd.grad((ref * w.double().cpu()).sum(), ref_in)
    return o, grads, ref, ref_grads


@needs_triton
def test_triton_selected_attention_packed_matches_reference():
    # selected_attention alone, doc-local indices chosen at random, including ones past the
    # query's block (they select nothing) and -1
    lengths, ls = [13, 0, 1, 25], 4
    T = sum(lengths)
    cu = cu_of(lengths)
    docs = documents(cu)
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(-1, 7, (1, 1, T, 3), generator=g, dtype=torch.int32)
    doc_blocks = torch.tensor([-(-n // ls) for n in lengths])[docs.doc_id.long()].view(1, 1, T, 1)
    idx = torch.where(idx < doc_blocks, idx, -1)
    o, grads, ref, ref_grads = packed_selected_and_reference(2, idx, ls, cu, g)
    assert rel_err(o, ref) < 1e-5
    for a, b in zip(grads, ref_grads):
        assert close(a, b, 1e-5)
    assert docs.lengths == tuple(lengths)


MODS = dict(
    score_mod=lambda s, b, h, qi, kv: s - 0.05 * (h + 1) * (qi - kv) + 0.01 * (kv % 7),
    mask_mod=lambda b, h, qi, kv: (kv % 5 != 3) | (kv == qi),
)


@given(configs(max_block=32), doc_lengths(), st.integers(0, 2**31 - 1))
def test_mods_see_packed_positions(config, lengths, seed):
    # the same mods, given packed positions, on the flex backend and the reference
    q, k, v, gates, _, _ = make_inputs(lengths, config, 1, 2, 16, 16, seed, given_cmp=False)
    cu = cu_of(lengths)
    # the selection, the output and each branch; and no document reaches another through them
    assert_matches_reference(attend, q, k, v, gates, rtol=TOL, config=config, cu_seqlens=cu, **MODS)
    assert_documents_isolated(attend, q, k, v, gates, cu_seqlens=cu, seed=seed, config=config, **MODS)


def test_sparse_attention_packed_equals_separate():
    # RoPE positions and learned compression restart at each document
    torch.manual_seed(0)
    config = NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=3, num_initial=1, num_local=1, window=12)
    layer = SparseAttention(32, heads=4, kv_heads=2, dim_head=16, config=config).double()
    lengths = [21, 1, 0, 40, 6]
    x = torch.randn(1, sum(lengths), 32, dtype=torch.float64)
    y, aux = layer(x, cu_seqlens=cu_of(lengths), return_aux=True)
    y.square().sum().backward()
    packed_grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    sep = torch.cat([layer(x[:, tok]) for tok in pieces(lengths)], dim=1)
    sep.square().sum().backward()
    assert rel_err(y, sep) < TOL
    for p, g in zip(layer.parameters(), packed_grads):
        assert close(g, p.grad)
    # a Documents made once is accepted in place of cu_seqlens, with the same result
    docs = documents(cu_of(lengths))
    assert isinstance(docs, Documents) and torch.equal(layer(x, cu_seqlens=docs), y.detach())


def test_rope_restarts_per_document():
    from nsa_flex.rotary import RotaryEmbedding

    rope = RotaryEmbedding(16)
    x = torch.randn(1, 2, 10, 16, dtype=torch.float64)
    docs = documents(cu_of([4, 6]))
    y = rope(x, positions=docs.pos)
    assert torch.allclose(y[:, :, 4:], rope(x[:, :, 4:]))
    assert torch.allclose(y[:, :, :4], rope(x[:, :, :4]))


@given(configs(max_block=32), doc_lengths(max_len=120), st.integers(0, 2**31 - 1))
def test_compression_and_selection_follow_documents(config, lengths, seed):
    q, k, _, _, _, _ = make_inputs(lengths, config, 2, 2, 16, 16, seed, given_cmp=False)
    q, k = q.detach(), k.detach()
    cu = cu_of(lengths, torch.int64)
    k_cmp = mean_compress(k, config, cu)
    assert torch.equal(k_cmp, torch.cat([mean_compress(k[:, :, tok], config) for tok in pieces(lengths)], dim=2))
    offsets = compressed_cu_seqlens(cu, config)
    assert offsets.tolist() == [0, *itertools.accumulate(config.num_compressed(n) for n in lengths)]
    comp = BlockCompressor(16, config).double()
    torch.testing.assert_close(comp(k, cu_seqlens=cu), torch.cat([comp(k[:, :, tok]) for tok in pieces(lengths)], dim=2))
    idx = select_blocks(q, k_cmp, config=config, cu_seqlens=cu, chunk_size=7)
    sep = [select_blocks(q[:, :, tok], k_cmp[:, :, blk], config=config) for tok, blk in
           zip(pieces(lengths), cmp_slices(lengths, config))]
    assert torch.equal(idx, torch.cat(sep, dim=2))


@given(configs(max_block=32), doc_lengths(max_len=120), st.integers(1, 50), st.booleans(), st.integers(0, 2**31 - 1))
def test_packed_importance_is_each_documents_own(config, lengths, chunk, with_mod, seed):
    # The PyTorch scoring of a packed row, chunk by chunk (chunks cut documents, and meet
    # several): each query's importances are those of its document scored alone, in doc-local
    # blocks, zero past its document's blocks; a score_mod sees packed positions.
    from nsa_flex import scoring
    from nsa_flex.varlen import shift_score_mod

    def mod(score, b, h, q_idx, kv_idx):
        return score - 0.01 * (q_idx - kv_idx)

    score_mod = mod if with_mod else None
    q, k, _, _, _, _ = make_inputs(lengths, config, 2, 3, 16, 16, seed, given_cmp=False)
    q, k = q.detach(), k.detach()
    docs = documents(cu_of(lengths))
    k_cmp = mean_compress(k, config, docs)
    with torch.no_grad():
        got = list(scoring.packed_importance(q, k_cmp, config, 0.3, score_mod, None, chunk, docs))
    assert [start for start, _, _ in got] == list(range(0, sum(lengths), chunk))
    rows = [(p[:, :, r], int(pos[r])) for _, p, pos in got for r in range(p.shape[2])]
    for (start, n), tok, blk in zip(((a, n) for a, n in zip(docs.starts, lengths) if n), pieces(lengths),
                                    cmp_slices(lengths, config)):
        ns = config.num_select_blocks(n)
        want = torch.zeros(1, 2, n, ns, dtype=torch.float64)
        if blk.stop > blk.start:
            _, want = next(scoring.chunk_importance(q[:, :, tok], k_cmp[:, :, blk], config, 0.3,
                                                    shift_score_mod(score_mod, start), None, None))
        for t in range(n):
            row, pos = rows[start + t]
            assert pos == t
            torch.testing.assert_close(row[..., :ns], want[:, :, t], rtol=1e-12, atol=1e-14)
            assert not row[..., ns:].any()


@needs_triton
@settings(max_examples=8, deadline=None)  # the interpreter is slow
@given(configs(max_block=32), doc_lengths(max_docs=5, max_len=90), st.sampled_from([1, 3]), st.booleans(),
       st.integers(0, 2**31 - 1))
@example(NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=3, num_initial=1, num_local=1),
         [1, 0, 2, 7, 70, 9], 1, False, 0)  # tiny documents share a tile of 64 queries
@example(NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=3, num_initial=1, num_local=1),
         [3, 7, 0, 5], 3, True, 1)  # no document holds a compressed block
def test_fused_scores_take_packed_rows(config, lengths, G, with_lse, seed):
    # The Triton scoring and top-n kernels (CUDA's path) over a packed row, in one set of
    # launches, under the CPU interpreter in float32: each document's selection is that of the
    # float64 reference on the document alone, from the kernel's own log-sum-exp or from the
    # packed compressed branch's (FlexAttention's, as attend hands it over).
    from nsa_flex.flex import branches
    from nsa_flex.ops.scoring import launch_scoring

    q, k, v, _, _, _ = make_inputs(lengths, config, 2, G, 16, 16, seed, dtype=torch.float32, given_cmp=False)
    q, k, v = q.detach(), k.detach(), v.detach()
    docs = documents(cu_of(lengths))
    k_cmp, v_cmp = mean_compress(k, config, docs), mean_compress(v, config, docs)
    lse = None
    if with_lse:
        _, lse = branches.compressed_branch(q, k_cmp, v_cmp, config, 0.3, docs=docs, return_lse=True)
    doc_id, cu, cmp_cu = docs.scoring_tables(config)
    assert cu.tolist() == cu_of(lengths).tolist() and cmp_cu.tolist() == list(docs.compressed_offsets(config))
    idx = launch_scoring(q, k_cmp, config, 0.3, chunk_size=37, lse=lse,  # chunks cut documents and tiles
                         packed=(doc_id, cu, cmp_cu, docs.num_select_blocks(config)))
    assert idx.shape == (1, 2, sum(lengths), config.num_selected) and idx.dtype == torch.int32
    for tok, blk in zip(pieces(lengths), cmp_slices(lengths, config)):
        ref_idx, ref_scores = R.select_blocks(q[:, :, tok].double(), k_cmp[:, :, blk].double(), config, 0.3)
        got = idx[:, :, tok]
        assert torch.equal((got >= 0).sum(-1), (ref_idx >= 0).sum(-1))
        torch.testing.assert_close(chosen_scores(got, ref_scores), chosen_scores(ref_idx, ref_scores),
                                   rtol=1e-5, atol=1e-6)
    assert_ascending_then_padding(idx)


def test_documents_keep_what_every_layer_derives(monkeypatch):
    # The tables and BlockMasks of a batch's documents are built once and kept with them (each
    # layer of a model asks for the same); other keys, user masks and new Documents build anew.
    config = NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=3, num_initial=1,
                       num_local=1, window=8)
    docs = documents(cu_of([20, 0, 37]))
    assert docs.scoring_tables(config) is docs.scoring_tables(config)
    assert docs.selection_blocks(8) is docs.selection_blocks(8)
    assert docs.selection_blocks(16) is not docs.selection_blocks(8)
    assert compressed_varlen_block_mask(docs, config) is compressed_varlen_block_mask(docs, config)
    assert compressed_varlen_block_mask(docs, config, num_blocks=20) is not compressed_varlen_block_mask(docs, config)
    assert sliding_window_varlen_block_mask(docs, 8) is sliding_window_varlen_block_mask(docs, 8)
    assert sliding_window_varlen_block_mask(docs, 9) is not sliding_window_varlen_block_mask(docs, 8)
    mod = lambda b, h, q_idx, kv_idx: kv_idx >= 0  # noqa: E731
    assert (sliding_window_varlen_block_mask(docs, 8, mask_mod=mod)
            is not sliding_window_varlen_block_mask(docs, 8, mask_mod=mod))
    assert compressed_varlen_block_mask(docs, config, mask_mod=mod) is not compressed_varlen_block_mask(docs, config, mask_mod=mod)
    other = documents(cu_of([20, 0, 37]))
    a, b = compressed_varlen_block_mask(docs, config), compressed_varlen_block_mask(other, config)
    assert a is not b and torch.equal(a.kv_num_blocks, b.kv_num_blocks) and torch.equal(a.kv_indices, b.kv_indices)
    with torch.inference_mode():  # inference tensors are kept apart: autograd cannot save them
        inferred = docs.selection_blocks(8)
        assert inferred is docs.selection_blocks(8) and inferred[0].is_inference()
    assert inferred is not docs.selection_blocks(8) and not docs.selection_blocks(8)[0].is_inference()
    with pytest.raises(ValueError, match="num_blocks"):  # a refused call is not kept either
        compressed_varlen_block_mask(docs, config, num_blocks=3)
    built = []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    docs.memo("key", lambda: built.append(1))
    docs.memo("key", lambda: built.append(1))
    assert built == [1, 1]  # while compiling: built in the graph every time, nothing kept


def test_packed_rows_trace_whole_under_compile():
    # Given a Documents, attend (flex, a score_mod) and the module trace as one graph under
    # fullgraph=True. Dynamo guards on the document lengths: a new layout is one more graph,
    # a layout seen before reuses its graph whatever Documents object carries it. A cu_seqlens
    # tensor is read on the host, which Dynamo cannot trace.
    from torch._dynamo.exc import TorchDynamoException
    from torch._dynamo.testing import CompileCounter

    config = NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=3, num_initial=1,
                       num_local=1, window=16)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 96, 16, generator=g) for h in (4, 2, 2))

    def mod(score, b, h, q_idx, kv_idx):
        return score - 0.01 * (q_idx - kv_idx)

    counter = CompileCounter()
    f = torch.compile(lambda q, k, v, docs: attend(q, k, v, config=config, cu_seqlens=docs, score_mod=mod),
                      backend=counter, fullgraph=True)
    for lengths, graphs in (([40, 56], 1), ([40, 56], 1), ([30, 0, 66], 2), ([40, 56], 2)):
        docs = documents(cu_of(lengths))
        out = f(q, k, v, docs)
        assert counter.frame_count == graphs
        torch.testing.assert_close(out, attend(q, k, v, config=config, cu_seqlens=docs, score_mod=mod),
                                   rtol=1e-6, atol=1e-6)
    with pytest.raises(TorchDynamoException):
        f(q, k, v, cu_of([40, 56]))

    layer = SparseAttention(32, heads=4, kv_heads=2, dim_head=8, config=config).eval()
    x = torch.randn(1, 96, 32, generator=g)
    counter = CompileCounter()
    m = torch.compile(lambda x, docs: layer(x, cu_seqlens=docs), backend=counter, fullgraph=True)
    docs = documents(cu_of([30, 0, 66]))
    with torch.no_grad():
        torch.testing.assert_close(m(x, docs), layer(x, cu_seqlens=docs), rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1


# ------------------------------------------------------------------------ BlockMasks


def dense_packed(lengths, rule):
    """``(T, S)`` bool from ``rule(doc-local q, doc-local key)`` within each document."""
    docs = documents(cu_of(lengths))
    same = docs.doc_id[:, None] == docs.doc_id[None, :]
    return same & rule(docs.pos[:, None], docs.pos[None, :])


@given(configs(max_block=32), doc_lengths(max_len=150), block_sizes)
def test_varlen_block_masks_cover_their_masks(config, lengths, block_size):
    docs = documents(cu_of(lengths))
    T = docs.seq_len
    w = config.window
    dense = check_block_mask(sliding_window_varlen_block_mask(docs, w, block_size=block_size), 1, 1, tight=False)
    assert torch.equal(dense[0, 0], dense_packed(lengths, lambda t, s: (s <= t) & (t - s < w)))
    if docs.num_compressed(config):
        dense = check_block_mask(compressed_varlen_block_mask(docs, config, block_size=block_size), 1, 1, tight=False)
        first, cdoc = docs.compressed_blocks(config)
        last = first + config.compress_block - 1
        expect = (cdoc[None, :] == docs.doc_id[:, None].long()) & (last[None, :] <= torch.arange(T)[:, None])
        assert torch.equal(dense[0, 0], expect)


@given(configs(max_block=32), doc_lengths(max_len=150), block_sizes, st.sampled_from([1, 2, 3]), st.integers(0, 2**31 - 1))
def test_selection_block_mask_with_documents(config, lengths, block_size, G, seed):
    q, k, _, _, _, _ = make_inputs(lengths, config, 2, G, 16, 16, seed, given_cmp=False)
    cu = cu_of(lengths)
    docs = documents(cu)
    idx = select_blocks(q.detach(), mean_compress(k.detach(), config, cu), config=config, cu_seqlens=cu)
    bm = selection_block_mask(idx, config, group_size=G, block_size=block_size, doc_start=docs.start)
    dense = check_block_mask(bm, 1, 2, tight=True)
    # unfold rows and compare with the reference's rule, per document
    allowed = torch.zeros(1, 2, docs.seq_len, docs.seq_len, dtype=torch.bool)
    for tok in pieces(lengths):
        allowed[:, :, tok, tok] = R._allowed_by_selection(idx[:, :, tok], config, tok.stop - tok.start)
    assert torch.equal(dense[:, :, ::G], allowed)


# ----------------------------------------------------------------------------- bad input

CFG = NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=3, num_initial=1, num_local=1, window=8)


def _qkv(B=1, T=40):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, h, T, 16, generator=g, dtype=torch.float64) for h in (2, 1, 1))


BAD = [
    ("not a tensor", [0, 20, 40], TypeError, "cu_seqlens must be a torch.Tensor"),
    ("float", torch.tensor([0.0, 20.0, 40.0]), TypeError, "cu_seqlens must be int32 or int64"),
    ("int16", torch.tensor([0, 20, 40], dtype=torch.int16), TypeError, "cu_seqlens must be int32 or int64"),
    ("2-D", torch.tensor([[0, 20, 40]], dtype=torch.int32), ValueError, "cu_seqlens must be 1-D"),
    ("one entry", torch.tensor([40], dtype=torch.int32), ValueError, "cu_seqlens must be 1-D with N\\+1 >= 2"),
    ("start", torch.tensor([1, 20, 40], dtype=torch.int32), ValueError, "cu_seqlens must start at 0"),
    ("decreasing", torch.tensor([0, 30, 20, 40], dtype=torch.int32), ValueError, "cu_seqlens must not decrease"),
    ("short", torch.tensor([0, 20, 39], dtype=torch.int32), ValueError, "cu_seqlens must end at the packed length T = 40"),
    ("long", torch.tensor([0, 20, 41], dtype=torch.int32), ValueError, "cu_seqlens must end at"),
]


@pytest.mark.parametrize("backend", ["flex", "reference"])
@pytest.mark.parametrize("name, cu, exc, match", BAD, ids=[b[0] for b in BAD])
def test_bad_cu_seqlens_is_named(name, cu, exc, match, backend):
    q, k, v = _qkv()
    with pytest.raises(exc, match=match):
        attend(q, k, v, config=CFG, cu_seqlens=cu, backend=backend)


def test_bad_input_under_cu_seqlens_is_named():
    cu = cu_of([20, 0, 20])
    q, k, v = _qkv(B=2)
    with pytest.raises(ValueError, match="cu_seqlens needs a batch of one packed row"):
        attend(q, k, v, config=CFG, cu_seqlens=cu)
    q, k, v = _qkv()
    # two documents of 20 tokens: 4 compressed blocks each, 8 in all, not Tc(40) = 9
    with pytest.raises(ValueError, match="k_cmp must hold Tc = 8 compressed blocks"):
        attend(q, k, v, config=CFG, cu_seqlens=cu, k_cmp=torch.randn(1, 1, 9, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"block_indices must lie in \[-1, 3\)"):  # longest document: 3 blocks
        attend(q, k, v, config=CFG, cu_seqlens=cu, block_indices=torch.full((1, 1, 40, 3), 3, dtype=torch.int32))
    # in range for the longest document, but not for the token's own (doc-local indices)
    short = cu_of([10, 30])
    idx = torch.zeros(1, 1, 40, 3, dtype=torch.int32)
    idx[0, 0, 5, 1] = 2
    with pytest.raises(ValueError, match=r"token 5 lies in a document of 10 tokens, so its blocks must lie in \[-1, 2\)"):
        attend(q, k, v, config=CFG, cu_seqlens=short, block_indices=idx)
    with pytest.raises(ValueError, match="cu_seqlens needs a batch of one packed row"):
        SparseAttention(32, heads=2, dim_head=16, config=CFG)(torch.randn(2, 40, 32), cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens must end at"):
        mean_compress(k, CFG, cu_of([20, 19]))
    with pytest.raises(ValueError, match="cu_seqlens must end at"):
        select_blocks(q, mean_compress(k, CFG, cu), config=CFG, cu_seqlens=cu_of([41]))
    with pytest.raises(ValueError, match="cu_seqlens .* is on meta"):
        attend(q, k, v, config=CFG, cu_seqlens=documents(cu, device="meta"))


def test_one_document_is_the_plain_call():
    q, k, v = _qkv()
    a = attend(q, k, v, config=CFG)
    b = attend(q, k, v, config=CFG, cu_seqlens=torch.tensor([0, 40]))
    assert rel_err(b, a) < TOL


# ------------------------------------------------------------------------------ bench


def test_bench_varlen_part_runs_quick(tmp_path):
    import json

    from nsa_flex.bench import main

    assert main(["--quick", "--parts", "varlen", "--reps", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {r["part"] for r in rows} == {"varlen"}
    flex = [r for r in rows if r["name"] == "nsa_flex flex"]
    assert flex and all(r["fwd_ms"] > 0 for r in flex)
    doc_masked = [r for r in rows if r["name"] == "FlexAttention doc"]
    assert doc_masked and all(r["fwd_ms"] > 0 for r in doc_masked)
    assert nsa_flex.varlen is not None


def test_packed_rows_keep_the_default_selected_tiles(monkeypatch):
    # doc-local blocks start anywhere, so one-block KV tiles do not apply: the 128x128 default,
    # not a dense count over (16-row, l'-key) tiles, which would be T*G/16 x T/l' per KV head
    from nsa_flex.flex import branches

    sizes = []
    build = branches._selection_block_mask

    def recording(*args, **kwargs):
        mask = build(*args, **kwargs)
        sizes.append(mask.BLOCK_SIZE)
        return mask

    monkeypatch.setattr(branches, "_selection_block_mask", recording)
    config = NSAConfig(compress_block=8, compress_stride=4, select_block=16, num_selected=3, num_initial=1, num_local=1, window=12)
    q, k, v, gates, _, _ = make_inputs([20, 45], config, 1, 16, 16, 16, 0, given_cmp=False)
    with torch.no_grad():
        attend(q, k, v, gates, config=config, cu_seqlens=cu_of([20, 45]))
        attend(q, k, v, gates, config=config)
    assert sizes == [(128, 128), (16, 16)]
