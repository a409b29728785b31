"""Every public helper refuses bad input with a TypeError/ValueError that names the argument,
when it is called: not later, when a mask_mod runs, and not as an AttributeError or a torch
error from deep inside (issue 14, section 3).

One table: each row is a bad call, the exception it must raise, and a fragment of the message
(the argument's name). ``attend``'s own checks are in test_attend.py.
"""

import pytest
import torch

from nsa_flex import BlockCompressor, NSAConfig, SparseAttention, buckets, compression, masks, rotary, scoring, selection
from nsa_flex import triton_backend, varlen

CFG = NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=3, window=8)
T = 40  # Ns = 5 selection blocks, Tc = 9 compressed blocks
X = torch.randn(1, 2, T, 8)
IDX = torch.zeros(1, 2, T, 3, dtype=torch.int32)
DOCS = varlen.documents(torch.tensor([0, 20, 40]))
BITS = masks.selection_bits(IDX, CFG)
TILE = torch.ones(1, 1, 1, 1, dtype=torch.bool)
IMPORTANCE = torch.zeros(1, 2, T, 5)


def _index(value, shape=(1, 2, T, 3)):
    return torch.full(shape, value, dtype=torch.int32)


BAD_CALLS = [
    # --- masks: mask_mod factories (checked in the factory, never in the traced mask_mod)
    ("sliding_window_mask zero", lambda: masks.sliding_window_mask(0), ValueError, "window"),
    ("sliding_window_mask negative", lambda: masks.sliding_window_mask(-3), ValueError, "window"),
    ("sliding_window_mask float", lambda: masks.sliding_window_mask(2.5), TypeError, "window"),
    ("sliding_window_mask bool", lambda: masks.sliding_window_mask(True), TypeError, "window"),
    ("sliding_window_mask None", lambda: masks.sliding_window_mask(None), TypeError, "window"),
    ("compressed_mask None", lambda: masks.compressed_mask(None), TypeError, "config"),
    ("compressed_mask str", lambda: masks.compressed_mask("cfg"), TypeError, "config"),
    ("selection_mask select_block 0", lambda: masks.selection_mask(BITS, 0), ValueError, "select_block"),
    ("selection_mask select_block float", lambda: masks.selection_mask(BITS, 2.5), TypeError, "select_block"),
    ("selection_mask group_size 0", lambda: masks.selection_mask(BITS, 8, 0), ValueError, "group_size"),
    ("selection_mask bits float", lambda: masks.selection_mask(BITS.float(), 8), TypeError, "bits"),
    ("selection_mask bits list", lambda: masks.selection_mask([1], 8), TypeError, "bits"),
    ("selection_mask bits 3-D", lambda: masks.selection_mask(BITS[0], 8), ValueError, "bits"),
    ("selection_mask doc_start float", lambda: masks.selection_mask(BITS, 8, 1, torch.zeros(T)), TypeError, "doc_start"),
    ("selection_mask doc_start length", lambda: masks.selection_mask(BITS, 8, 1, torch.zeros(T - 1, dtype=torch.int32)),
     ValueError, "doc_start"),
    ("selection_mask doc_start device", lambda: masks.selection_mask(BITS, 8, 1, torch.zeros(T, dtype=torch.int32, device="meta")),
     ValueError, "doc_start"),
    ("document_mask list", lambda: masks.document_mask([0, 0, 1]), TypeError, "doc_id"),
    ("document_mask float", lambda: masks.document_mask(torch.zeros(3)), TypeError, "doc_id"),
    ("document_mask 2-D", lambda: masks.document_mask(torch.zeros(1, 3, dtype=torch.int32)), ValueError, "doc_id"),
    # --- masks: selection bits and BlockMask builders
    ("selection_bits index too high", lambda: masks.selection_bits(_index(5), CFG), ValueError, "block_indices must lie in"),
    ("selection_bits index below -1", lambda: masks.selection_bits(_index(-2), CFG), ValueError, "block_indices must lie in"),
    ("selection_bits float index", lambda: masks.selection_bits(IDX.float(), CFG), TypeError, "block_indices"),
    ("selection_bits bool index", lambda: masks.selection_bits(IDX.bool(), CFG), TypeError, "block_indices"),
    ("selection_bits list", lambda: masks.selection_bits([[0]], CFG), TypeError, "block_indices"),
    ("selection_bits 3-D", lambda: masks.selection_bits(IDX[0], CFG), ValueError, "block_indices"),
    ("selection_bits config None", lambda: masks.selection_bits(IDX, None), TypeError, "config"),
    ("selection_block_mask index too high", lambda: masks.selection_block_mask(_index(5), CFG), ValueError, "block_indices must lie in"),
    ("selection_block_mask float index", lambda: masks.selection_block_mask(IDX.float(), CFG), TypeError, "block_indices"),
    ("selection_block_mask config str", lambda: masks.selection_block_mask(IDX, "cfg"), TypeError, "config"),
    ("selection_block_mask group_size float", lambda: masks.selection_block_mask(IDX, CFG, group_size=2.0), TypeError, "group_size"),
    ("selection_block_mask mask_mod", lambda: masks.selection_block_mask(IDX, CFG, mask_mod=3), TypeError, "mask_mod"),
    ("selection_block_mask block_size int", lambda: masks.selection_block_mask(IDX, CFG, block_size=16), TypeError, "block_size"),
    ("selection_block_mask block_size 0", lambda: masks.selection_block_mask(IDX, CFG, block_size=(0, 16)), ValueError, "block_size"),
    ("selection_block_mask doc_start float", lambda: masks.selection_block_mask(IDX, CFG, doc_start=torch.zeros(T)), TypeError, "doc_start"),
    ("selection_block_mask doc_start length",
     lambda: masks.selection_block_mask(IDX, CFG, doc_start=torch.zeros(T - 1, dtype=torch.int32)), ValueError, "doc_start"),
    ("selection_block_mask transposed int", lambda: masks.selection_block_mask(IDX, CFG, transposed=1), TypeError, "transposed"),
    ("selection_tile group_size 0", lambda: masks.selection_tile(0, CFG), ValueError, "group_size"),
    ("selection_tile group_size None", lambda: masks.selection_tile(None, CFG), TypeError, "group_size"),
    ("selection_tile config None", lambda: masks.selection_tile(1, None), TypeError, "config"),
    ("sliding_window_block_mask seq_len negative", lambda: masks.sliding_window_block_mask(-5, 8), ValueError, "seq_len"),
    ("sliding_window_block_mask seq_len 0", lambda: masks.sliding_window_block_mask(0, 8), ValueError, "seq_len"),
    ("sliding_window_block_mask seq_len float", lambda: masks.sliding_window_block_mask(2.5, 8), TypeError, "seq_len"),
    ("sliding_window_block_mask window 0", lambda: masks.sliding_window_block_mask(10, 0), ValueError, "window"),
    ("sliding_window_block_mask block_size 0",
     lambda: masks.sliding_window_block_mask(10, 8, block_size=(0, 128)), ValueError, "block_size"),
    ("sliding_window_block_mask mask_mod", lambda: masks.sliding_window_block_mask(10, 8, mask_mod=3), TypeError, "mask_mod"),
    ("sliding_window_block_mask device", lambda: masks.sliding_window_block_mask(10, 8, device="nope"), ValueError, "device"),
    ("sliding_window_block_mask device None", lambda: masks.sliding_window_block_mask(10, 8, device=None), TypeError, "device"),
    ("compressed_block_mask config str", lambda: masks.compressed_block_mask(40, "cfg"), TypeError, "config"),
    ("compressed_block_mask seq_len None", lambda: masks.compressed_block_mask(None, CFG), TypeError, "seq_len"),
    ("compressed_block_mask seq_len float", lambda: masks.compressed_block_mask(40.0, CFG), TypeError, "seq_len"),
    ("compressed_block_mask seq_len short", lambda: masks.compressed_block_mask(5, CFG), ValueError, "seq_len"),
    ("compressed_block_mask mask_mod", lambda: masks.compressed_block_mask(40, CFG, mask_mod=3), TypeError, "mask_mod"),
    ("compressed_block_mask block_size", lambda: masks.compressed_block_mask(40, CFG, block_size=(-1, 1)), ValueError, "block_size"),
    ("block_mask_from_tiles list", lambda: masks.block_mask_from_tiles([[True]], None, (10, 10), masks.causal_mask),
     TypeError, "any_tiles"),
    ("block_mask_from_tiles int tiles",
     lambda: masks.block_mask_from_tiles(TILE.int(), None, (10, 10), masks.causal_mask), TypeError, "any_tiles"),
    ("block_mask_from_tiles 3-D", lambda: masks.block_mask_from_tiles(TILE[0], None, (10, 10), masks.causal_mask),
     ValueError, "any_tiles"),
    ("block_mask_from_tiles tile count",
     lambda: masks.block_mask_from_tiles(torch.ones(1, 1, 3, 3, dtype=torch.bool), None, (10, 10), masks.causal_mask),
     ValueError, "any_tiles"),
    ("block_mask_from_tiles full_tiles shape",
     lambda: masks.block_mask_from_tiles(TILE, torch.ones(1, 1, 2, 1, dtype=torch.bool), (10, 10), masks.causal_mask),
     ValueError, "full_tiles"),
    ("block_mask_from_tiles seq_lengths int", lambda: masks.block_mask_from_tiles(TILE, None, 10, masks.causal_mask),
     TypeError, "seq_lengths"),
    ("block_mask_from_tiles seq_lengths negative",
     lambda: masks.block_mask_from_tiles(TILE, None, (-1, 10), masks.causal_mask), ValueError, "seq_lengths"),
    ("block_mask_from_tiles mask_mod", lambda: masks.block_mask_from_tiles(TILE, None, (10, 10), 3), TypeError, "mask_mod"),
    ("compressed_varlen_block_mask tensor", lambda: masks.compressed_varlen_block_mask(torch.tensor([0, 40]), CFG),
     TypeError, "docs"),
    ("compressed_varlen_block_mask config None", lambda: masks.compressed_varlen_block_mask(DOCS, None), TypeError, "config"),
    ("compressed_varlen_block_mask num_blocks float",
     lambda: masks.compressed_varlen_block_mask(DOCS, CFG, num_blocks=2.5), TypeError, "num_blocks"),
    ("compressed_varlen_block_mask num_blocks low", lambda: masks.compressed_varlen_block_mask(DOCS, CFG, num_blocks=2),
     ValueError, "num_blocks"),
    ("compressed_varlen_block_mask mask_mod", lambda: masks.compressed_varlen_block_mask(DOCS, CFG, mask_mod=3),
     TypeError, "mask_mod"),
    ("compressed_varlen_block_mask block_size",
     lambda: masks.compressed_varlen_block_mask(DOCS, CFG, block_size=(0, 128)), ValueError, "block_size"),
    ("sliding_window_varlen_block_mask tensor", lambda: masks.sliding_window_varlen_block_mask(torch.tensor([0, 40]), 8),
     TypeError, "docs"),
    ("sliding_window_varlen_block_mask window", lambda: masks.sliding_window_varlen_block_mask(DOCS, 0), ValueError, "window"),
    ("sliding_window_varlen_block_mask mask_mod", lambda: masks.sliding_window_varlen_block_mask(DOCS, 8, mask_mod=3),
     TypeError, "mask_mod"),
    # --- compression
    ("mean_compress config None", lambda: compression.mean_compress(X, None), TypeError, "config"),
    ("mean_compress list", lambda: compression.mean_compress([1.0], CFG), TypeError, "x"),
    ("mean_compress integer x", lambda: compression.mean_compress(X.long(), CFG), TypeError, "x"),
    ("mean_compress 3-D", lambda: compression.mean_compress(X[0], CFG), ValueError, "x"),
    ("block_view config None", lambda: compression.block_view(X, None), TypeError, "config"),
    ("block_view list", lambda: compression.block_view([1.0], CFG), TypeError, "x"),
    ("BlockCompressor out_bias", lambda: BlockCompressor(8, CFG, out_bias="yes"), TypeError, "out_bias"),
    ("BlockCompressor.forward list", lambda: BlockCompressor(8, CFG)([1.0]), TypeError, "x"),
    ("BlockCompressor.forward integer x", lambda: BlockCompressor(8, CFG)(X.long()), TypeError, "x"),
    ("BlockCompressor.forward dtype", lambda: BlockCompressor(8, CFG)(X.double()), TypeError, "x has dtype"),
    ("BlockCompressor.forward device", lambda: BlockCompressor(8, CFG)(X.to("meta")), ValueError, "x is on meta"),
    # --- varlen
    ("documents device", lambda: varlen.documents(torch.tensor([0, 3]), device="nope"), ValueError, "device"),
    ("resolve seq_len float", lambda: varlen.resolve(torch.tensor([0, 40]), 40.0, torch.device("cpu")), TypeError, "seq_len"),
    ("resolve device", lambda: varlen.resolve(torch.tensor([0, 40]), 40, None), TypeError, "device"),
    ("compressed_cu_seqlens config None", lambda: varlen.compressed_cu_seqlens(torch.tensor([0, 40]), None),
     TypeError, "config"),
    ("Documents.num_compressed config None", lambda: DOCS.num_compressed(None), TypeError, "config"),
    ("Documents.compressed_blocks config str", lambda: DOCS.compressed_blocks("cfg"), TypeError, "config"),
    ("Documents.selection_blocks 0", lambda: DOCS.selection_blocks(0), ValueError, "select_block"),
    ("Documents.selection_blocks float", lambda: DOCS.selection_blocks(2.5), TypeError, "select_block"),
    ("Documents wrong length", lambda: varlen.Documents((3,), DOCS.doc_id, DOCS.pos, DOCS.start), ValueError, "Documents.doc_id"),
    ("Documents lengths list", lambda: varlen.Documents([20, 20], DOCS.doc_id, DOCS.pos, DOCS.start), TypeError,
     "Documents.lengths"),
    # --- rotary
    ("rotate_half list", lambda: rotary.rotate_half([1.0]), TypeError, "x"),
    ("rotate_half odd", lambda: rotary.rotate_half(torch.zeros(3)), ValueError, "x"),
    ("rotate_half 0-d", lambda: rotary.rotate_half(torch.tensor(1.0)), ValueError, "x"),
    ("RotaryEmbedding base inf", lambda: rotary.RotaryEmbedding(8, base=float("inf")), ValueError, "base"),
    ("RotaryEmbedding.forward list", lambda: rotary.RotaryEmbedding(8)([1.0]), TypeError, "x"),
    ("RotaryEmbedding.forward bool positions",
     lambda: rotary.RotaryEmbedding(8)(X, positions=torch.zeros(T, dtype=torch.bool)), TypeError, "positions"),
    ("RotaryEmbedding.forward float positions", lambda: rotary.RotaryEmbedding(8)(X, positions=torch.zeros(T)),
     TypeError, "positions"),
    ("RotaryEmbedding.cos_sin negative", lambda: rotary.RotaryEmbedding(8).cos_sin(-1), ValueError, "seq_len"),
    ("RotaryEmbedding.cos_sin float", lambda: rotary.RotaryEmbedding(8).cos_sin(2.5), TypeError, "seq_len"),
    ("RotaryEmbedding.cos_sin offset float", lambda: rotary.RotaryEmbedding(8).cos_sin(3, offset=2.5), TypeError, "offset"),
    ("RotaryEmbedding.cos_sin positions list", lambda: rotary.RotaryEmbedding(8).cos_sin(3, positions=[0, 1, 2]),
     TypeError, "positions"),
    ("RotaryEmbedding.rotate_at list", lambda: rotary.RotaryEmbedding(8).rotate_at([1.0], torch.zeros(1, T, dtype=torch.long)),
     TypeError, "x"),
    ("RotaryEmbedding.rotate_at positions device",
     lambda: rotary.RotaryEmbedding(8).rotate_at(X, torch.zeros(1, T, dtype=torch.long, device="meta")), ValueError, "positions"),
    # --- buckets
    ("bucket_length 0", lambda: buckets.bucket_length(0, "pow2"), ValueError, "seq_len"),
    ("bucket_length negative", lambda: buckets.bucket_length(-3, (4, 8)), ValueError, "seq_len"),
    ("bucket_length float", lambda: buckets.bucket_length(2.5, "pow2"), TypeError, "seq_len"),
    ("bucket_length bool", lambda: buckets.bucket_length(True, "pow2"), TypeError, "seq_len"),
    ("bucket_length decreasing", lambda: buckets.bucket_length(3, (8, 4)), ValueError, "buckets"),
    ("bucket_length empty", lambda: buckets.bucket_length(3, ()), ValueError, "buckets"),
    ("bucket_length None", lambda: buckets.bucket_length(3, None), TypeError, "buckets"),
    ("pad_documents tensor", lambda: buckets.pad_documents(torch.tensor([0, 40]), 50), TypeError, "docs"),
    ("pad_documents float", lambda: buckets.pad_documents(DOCS, 50.5), TypeError, "padded_len"),
    # --- selection
    ("sort_unique_blocks list", lambda: selection.sort_unique_blocks([1], 5), TypeError, "block_indices"),
    ("sort_unique_blocks float", lambda: selection.sort_unique_blocks(IDX.float(), 5), TypeError, "block_indices"),
    ("sort_unique_blocks 0-d", lambda: selection.sort_unique_blocks(torch.tensor(1), 5), ValueError, "block_indices"),
    ("sort_unique_blocks too high", lambda: selection.sort_unique_blocks(_index(5), 5), ValueError, "block_indices must lie in"),
    ("sort_unique_blocks num_blocks float", lambda: selection.sort_unique_blocks(IDX, 2.5), TypeError, "num_blocks"),
    ("sort_unique_blocks num_blocks negative", lambda: selection.sort_unique_blocks(IDX, -1), ValueError, "num_blocks"),
    ("straight_through_score_mod list", lambda: scoring.straight_through_score_mod([1], 8, 1), TypeError, "importance"),
    ("straight_through_score_mod integer", lambda: scoring.straight_through_score_mod(IMPORTANCE.long(), 8, 1),
     TypeError, "importance"),
    ("straight_through_score_mod blocks", lambda: scoring.straight_through_score_mod(IMPORTANCE[..., :4], 8, 1),
     ValueError, "importance"),
    ("straight_through_score_mod select_block", lambda: scoring.straight_through_score_mod(IMPORTANCE, 0, 1),
     ValueError, "select_block"),
    ("straight_through_score_mod group_size", lambda: scoring.straight_through_score_mod(IMPORTANCE, 8, 0),
     ValueError, "group_size"),
    ("straight_through_score_mod score_mod", lambda: scoring.straight_through_score_mod(IMPORTANCE, 8, 1, 3),
     TypeError, "score_mod"),
    ("select_blocks mask_mod", lambda: selection.select_blocks(X, compression.mean_compress(X, CFG), config=CFG, mask_mod=3),
     TypeError, "mask_mod"),
    ("select_blocks score_mod", lambda: selection.select_blocks(X, compression.mean_compress(X, CFG), config=CFG, score_mod=3),
     TypeError, "score_mod"),
    ("select_blocks chunk_size float",
     lambda: selection.select_blocks(X, compression.mean_compress(X, CFG), config=CFG, chunk_size=2.5), TypeError, "chunk_size"),
    ("block_scores mask_mod", lambda: selection.block_scores(X, compression.mean_compress(X, CFG), config=CFG, mask_mod=3),
     TypeError, "mask_mod"),
    # --- triton backend (on the CPU these run under Triton's interpreter; the checks come first)
    ("triton selected_attention select_block float", lambda: triton_backend.selected_attention(X, X, X, IDX, 2.5, 0.3),
     TypeError, "select_block"),
    ("triton invert_selection list", lambda: triton_backend.invert_selection([1], 5), TypeError, "idx"),
    ("triton invert_selection float", lambda: triton_backend.invert_selection(IDX.float(), 5), TypeError, "idx"),
    ("triton invert_selection too high", lambda: triton_backend.invert_selection(_index(9), 5), ValueError, "idx must lie in"),
    ("triton invert_selection num_blocks", lambda: triton_backend.invert_selection(IDX, 2.5), TypeError, "num_blocks"),
    ("triton available None", lambda: triton_backend.available(None), TypeError, "device"),
    # --- module
    ("SparseAttention rotary_base inf", lambda: SparseAttention(16, 2, dim_head=8, config=CFG, rotary_base=float("inf")),
     ValueError, "rotary_base"),
    ("SparseAttention.forward list", lambda: SparseAttention(16, 2, dim_head=8, config=CFG)([1.0]), TypeError, "x"),
]


@pytest.mark.parametrize("call, exc, words", [row[1:] for row in BAD_CALLS], ids=[row[0] for row in BAD_CALLS])
def test_bad_call_raises_naming_the_argument(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


def test_the_table_names_each_case_once():
    names = [row[0] for row in BAD_CALLS]
    assert len(names) == len(set(names))


GOOD_CALLS = [
    # what the checks must still let through
    ("device as a string", lambda: masks.sliding_window_block_mask(10, 8, device="cpu")),
    ("block_size as a list", lambda: masks.compressed_block_mask(40, CFG, block_size=[16, 16])),
    ("int64 selection with -1 and the last block", lambda: masks.selection_bits(_index(-1).long().index_fill_(3, torch.tensor([0]), 4), CFG)),
    ("no selected block at all (n = 0)", lambda: masks.selection_block_mask(torch.zeros(1, 2, T, 0, dtype=torch.int32), CFG)),
    ("int64 doc ids", lambda: masks.document_mask(DOCS.doc_id.long())),
    ("resolve with a device string", lambda: varlen.resolve(DOCS, 40, "cpu")),
    ("available with a device string", lambda: triton_backend.available("cpu")),
    ("block_mask_from_tiles without mask_mod", lambda: masks.block_mask_from_tiles(TILE, None, (10, 10), None)),
]


@pytest.mark.parametrize("call", [row[1] for row in GOOD_CALLS], ids=[row[0] for row in GOOD_CALLS])
def test_good_call_passes(call):
    call()


def test_checks_trace_without_graph_breaks():
    """The factories' checks are plain Python on static facts, and the value range check is
    skipped while tracing, so ``torch.compile(fullgraph=True)`` traces the builders."""

    def build(idx):
        bits = masks.selection_bits(idx, CFG)
        window = masks.sliding_window_mask(CFG.window)
        return bits, window(0, 0, torch.tensor(5), torch.tensor(3))

    idx = torch.randint(-1, CFG.num_select_blocks(T), (1, 2, T, 3), dtype=torch.int32)
    bits, seen = torch.compile(build, fullgraph=True, backend="eager")(idx)
    assert torch.equal(bits, masks.selection_bits(idx, CFG)) and bool(seen)
