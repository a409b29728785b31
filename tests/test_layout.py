"""The package's layout: no import cycle (imports inside functions count), and small modules.

Read from the source with ``ast``, nothing imported: an import anywhere in a module, at its top
or inside a function, is an edge of the graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "nsa_flex"

# Modules past MAX_LINES, each with the reason it stays whole (none).
MAX_LINES = 500
LONG_MODULES: dict[str, str] = {}

# The layers, lowest first: a module imports only modules of lower layers (imports inside
# functions included), so the dependency order runs one way. A new module takes its place here.
LAYERS = [
    # checks, layouts and kernel helpers that need nothing of the library
    ["_validation", "_layout", "gating", "kernels", "kernels.primitives"],
    # the config; what Triton can run; RoPE; the kernels (jit only)
    ["config", "triton_support", "rotary", "kernels.top_n", "kernels.scoring", "kernels.selected"],
    # every launch decision; which path runs; packed rows; selections; top-n; the oracle
    ["tuning", "dispatch", "varlen", "block_indices", "top_n", "reference", "kernels.decode"],
    # compression, scoring, mask_mods, the custom ops beside their launchers, FlexAttention calls
    ["compression", "buckets", "scoring", "masks.mods", "ops.scoring", "ops.selected", "flex.call",
     "kernels.decode_batch"],
    # BlockMasks; the selection entry points; the triton backend; the cache's state
    ["masks.block_masks", "ops", "selection", "triton_backend", "inference.cache"],
    ["masks.selected", "inference.decode_fused"],
    ["masks", "flex.branches", "inference.decode"],
    ["flex"],
    ["api"],  # attend(): validates, plans, runs the branches
    ["inference.prompt", "distributed"],  # distributed: context parallelism over attend
    ["inference"],
    ["module"],
    ["nsa_flex"],
    # the demo, the bench and the property-test kit sit above the package
    ["__main__", "bench.timing", "testing.strategies"],
    ["testing.checks"],
    ["testing.contracts"],
    ["testing"],
    ["bench.peers"],
    ["bench.parts"],
    ["bench.cli"],
    ["bench", "bench.__main__"],
]
LAYER = {(m if m == "nsa_flex" else f"nsa_flex.{m}"): i for i, layer in enumerate(LAYERS) for m in layer}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _nodes(tree):
    """Every node of ``tree`` but those under ``if TYPE_CHECKING:`` (imports for annotations
    only, never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The nsa_flex modules ``name`` imports, anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in _nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "nsa_flex"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "nsa_flex":
                target = node.module
            else:
                continue
            names = {f"{target}.{a.name}" for a in node.names}
            subs = names & known  # `from . import x` with x a module
            # the package itself too, unless every name is one of its modules
            out |= subs if subs == names else subs | {target}
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> set[frozenset[str]]:
    """Every simple cycle, as the set of its modules (small graph: a DFS from each node)."""
    found = set()

    def walk(start, node, path):
        for nxt in edges[node]:
            if nxt == start:
                found.add(frozenset(path))
            elif nxt not in path and nxt > start:  # each cycle once, from its smallest module
                walk(start, nxt, path + [nxt])

    for start in edges:
        walk(start, start, [start])
    return found


def test_the_graph_sees_lazy_imports():
    edges = graph()
    assert "nsa_flex.config" in edges["nsa_flex.api"]  # a top-level import
    # ... and one inside a function (the launchers import their kernels when they first run)
    assert "nsa_flex.kernels.selected" in edges["nsa_flex.ops.selected"]


def test_no_import_cycle():
    assert cycles(graph()) == set()


def test_each_module_imports_only_lower_layers():
    edges = graph()
    assert set(edges) == set(LAYER), f"place these in LAYERS: {set(edges) ^ set(LAYER)}"
    upward = {(m, x) for m, xs in edges.items() for x in xs if LAYER[x] >= LAYER[m]}
    assert not upward, sorted(upward)


def test_kernel_modules_hold_only_jit_functions():
    for name, path in modules().items():
        if name.startswith("nsa_flex.kernels."):
            tree = ast.parse(path.read_text())
            for node in tree.body:
                if isinstance(node, ast.FunctionDef):
                    assert any(ast.unparse(d) == "triton.jit" for d in node.decorator_list), (name, node.name)
                else:  # the docstring and the imports, nothing else
                    assert isinstance(node, (ast.Import, ast.ImportFrom)) or (
                        isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)), (name, ast.dump(node)[:80])


def test_modules_stay_small():
    long = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    long = {name: n for name, n in long.items() if n > MAX_LINES}
    assert set(long) <= set(LONG_MODULES), long


# The public names before the restructure (issue 15): each __all__ then, and the paths the docs
# named. Moves must keep every one importable from the same place.
PUBLIC = {
    "nsa_flex": ["BACKENDS", "BlockCompressor", "NSAAux", "NSACache", "NSAConfig", "SparseAttention", "attend",
                 "block_scores", "decode_step", "masks", "mean_compress", "prefill", "reference", "select_blocks",
                 "varlen"],
    "nsa_flex.masks": ["KV_BLOCK", "Q_BLOCK", "block_mask_from_tiles", "causal_mask", "compressed_block_mask",
                       "compressed_mask", "compressed_varlen_block_mask", "document_mask", "selection_bits",
                       "selection_block_mask", "selection_mask", "selection_tile", "sliding_window_block_mask",
                       "sliding_window_mask", "sliding_window_varlen_block_mask"],
    "nsa_flex.reference": ["ReferenceOutput", "attend", "compressed_attention", "compressed_kv_positions",
                           "masked_attention", "mean_compress", "overlap_matrix", "select_blocks",
                           "selected_attention", "selection_scores", "top_n", "window_attention"],
    "nsa_flex.varlen": ["Documents", "compressed_cu_seqlens", "documents"],
    "nsa_flex.compression": ["BlockCompressor", "block_view", "mean_compress"],
    "nsa_flex.rotary": ["RotaryEmbedding", "rotate_half"],
    "nsa_flex.buckets": ["bucket_length", "check_length_buckets", "pad_documents"],
    "nsa_flex.selection": ["block_importance", "block_scores", "select_blocks", "sort_unique_blocks", "top_n_blocks",
                           "straight_through_score_mod"],
    "nsa_flex.triton_backend": ["available", "invert_selection", "selected_attention", "selected_branch",
                                "kernel_indices"],
    "nsa_flex.api": ["attend", "NSAAux", "BACKENDS"],
    "nsa_flex.module": ["SparseAttention"],
    "nsa_flex.config": ["NSAConfig"],
}
OPS = ["selected_attention", "selected_attention_backward", "attach_selected_backward", "select_blocks_fused"]


def test_public_names_stay_where_they_were():
    import importlib

    import torch

    for module, names in PUBLIC.items():
        mod = importlib.import_module(module)
        assert [n for n in names if not hasattr(mod, n)] == [], module
    for op in OPS:  # the registered operator names
        assert hasattr(torch.ops.nsa_flex, op), op
