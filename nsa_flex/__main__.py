"""``python -m nsa_flex``: run one ``SparseAttention`` layer on random data and show what it did.

It checks the output against the same layer run with ``backend="reference"`` in float64, times
forward and forward+backward, reports how sparse the selected branch is, and draws which
selection blocks one head's queries chose.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from typing import Callable

import torch
from torch import Tensor

from .config import NSAConfig
from .module import SparseAttention

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
# Relative error allowed against the float64 reference (the tests' bounds, docs/semantics.md:
# 1e-5 in float32 without TF32, 2e-2 in bf16).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
# The float64 reference materialises T x T scores per head; past this length on the GPU it
# checks a prefix, which causality makes independent of later tokens.
CUDA_REFERENCE_LEN = 2048


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m nsa_flex", description=__doc__.split("\n")[0].replace("``", ""))
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: cuda if a GPU is available, else cpu)")
    parser.add_argument("--seq-len", type=int, default=None, help="T (default: 8192 on cuda, 1024 on cpu)")
    parser.add_argument(
        "--dtype", choices=DTYPES, default=None, help="default: bfloat16 on cuda, float32 on cpu"
    )
    parser.add_argument("--compile", action="store_true", help="wrap the layer in torch.compile (default: eager)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default: 10 on cuda, 3 on cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the layer's weights and the input (default: 0)")
    args = parser.parse_args(argv)
    if args.seq_len is not None and args.seq_len < 1:
        parser.error(f"--seq-len must be >= 1, got {args.seq_len}")
    if args.reps is not None and args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    args.device = _device(parser, args.device)
    return args


def _device(parser: argparse.ArgumentParser, name: str | None) -> torch.device:
    """``--device`` as a ``torch.device``; a name the demo cannot run on is a one-line usage error."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device {name}: no CUDA device is available here (this torch: {torch.__version__})")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            parser.error(f"--device {name}: this machine has {count} CUDA device{'s' if count != 1 else ''}")
    return device


def build(device: torch.device, dtype: torch.dtype) -> SparseAttention:
    """The demo layer: paper-sized on the GPU, small enough for eager FlexAttention on the CPU."""
    if device.type == "cuda":
        layer = SparseAttention(1024, heads=16, kv_heads=2, dim_head=128, config=NSAConfig())
    else:
        config = NSAConfig(select_block=64, num_selected=8, window=128)
        layer = SparseAttention(256, heads=8, kv_heads=2, dim_head=32, config=config)
    return layer.to(device=device, dtype=dtype)


def relative_error(out: Tensor, ref: Tensor) -> float:
    """``‖out − ref‖ / ‖ref‖`` in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def time_ms(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in milliseconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def block_sparsity(block_indices: Tensor, config: NSAConfig) -> tuple[int, int]:
    """``(selected, causal)``: how many (query, block) pairs the selected branch attends, and
    how many full causal attention would (block ``j`` is causal for query ``t`` iff
    ``j <= t // l'``), summed over batch and KV heads.

    Args:
        block_indices: ``(B, Hkv, T, n)``, ``-1`` padded.
    """
    B, H, T, _ = block_indices.shape
    selected = int((block_indices >= 0).sum())
    causal_per_row = int((torch.arange(T) // config.select_block + 1).sum())
    return selected, B * H * causal_per_row


def blocks_per_query(config: NSAConfig, T: int) -> str:
    """How many selection blocks a query takes at most, in words: ``min(n, Ns)`` of the ``Ns``
    blocks of ``T`` tokens."""
    n, ns = config.num_selected, config.num_select_blocks(T)
    if n <= ns:
        return f"each query takes at most {n} of the {ns} blocks"
    blocks = f"{ns} block{'s' if ns != 1 else ''}"
    return (f"each query takes at most {blocks}: T={T} has {blocks} of {config.select_block} tokens, "
            f"fewer than num_selected={n}")


def selection_picture(block_indices: Tensor, config: NSAConfig, rows: int = 64, cols: int = 64) -> str:
    """ASCII map of one head's selection: a row per (sampled) query, a column per (group of)
    selection blocks; ``#`` selected, ``.`` causal but not selected, `` `` in the future.

    Args:
        block_indices: ``(T, n)`` for one batch row and KV head, ``-1`` padded.
    """
    T = block_indices.shape[0]
    ns = config.num_select_blocks(T)
    rows, cols = min(rows, T), min(cols, ns)
    queries = torch.linspace(0, T - 1, rows).round().long()
    idx = block_indices[queries].long().cpu()
    idx = torch.where(idx < 0, ns, idx)  # padding goes to a spare column, dropped below
    chosen = torch.zeros(rows, ns + 1, dtype=torch.bool).scatter_(1, idx, True)[:, :ns]
    causal = torch.arange(ns)[None, :] <= (queries // config.select_block)[:, None]
    column = torch.arange(ns) * cols // ns  # selection block -> picture column
    lines = []
    for r in range(rows):
        cells = []
        for c in range(cols):
            blocks = column == c
            if chosen[r, blocks].any():
                cells.append("#")
            elif causal[r, blocks].any():
                cells.append(".")
            else:
                cells.append(" ")
        lines.append(f"{int(queries[r]):>7} |{''.join(cells)}|")
    per_col = -(-ns // cols)
    header = f"query   blocks 0..{ns - 1} of {config.select_block} tokens (<= {per_col} per column)"
    return "\n".join([header] + lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device
    on_cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if on_cuda else torch.float32)
    T = args.seq_len or (8192 if on_cuda else 1024)
    reps = args.reps or (10 if on_cuda else 3)
    if on_cuda:
        # The float32 tolerance assumes full-precision matmuls.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(args.seed)

    layer = build(device, dtype)
    reference = copy.deepcopy(layer).double()
    reference.backend = "reference"
    model = torch.compile(layer) if args.compile else layer
    x = torch.randn(1, T, layer.dim, device=device, dtype=dtype)
    print(
        f"nsa_flex demo: device={device} dtype={str(dtype).removeprefix('torch.')} B=1 T={T} "
        f"dim={layer.dim} heads={layer.heads} kv_heads={layer.kv_heads} "
        f"dim_head={layer.dim_head} backend={layer.backend!r} compile={args.compile}"
    )
    print(f"config: {layer.config}")
    if not on_cuda and not args.compile:
        print("note: FlexAttention runs eagerly on the CPU (scores materialised); --compile fuses it")

    with torch.no_grad():
        out, aux = model(x, return_aux=True)
        ref_len = min(T, CUDA_REFERENCE_LEN) if on_cuda else T
        ref = reference(x[:, :ref_len].double())
    err = relative_error(out[:, :ref_len], ref)
    tol = TOLERANCE[dtype]
    passed = err < tol and bool(torch.isfinite(out).all())
    what = "all" if ref_len == T else "the first"
    print(
        f"check: {what} {ref_len} positions vs backend='reference' in float64: "
        f"rel err {err:.2e} (tolerance {tol:.0e}) {'PASS' if passed else 'FAIL'}"
    )

    with torch.no_grad():
        fwd = time_ms(lambda: model(x), device, reps)
    print(f"forward (no grad):  {fwd:9.2f} ms  (median of {reps})")

    if args.compile and not on_cuda:
        # Inductor's CPU FlexAttention template is inference-only (torch 2.13).
        print("forward+backward:   skipped: compiled FlexAttention has no backward on the CPU")
    else:
        x_grad = x.detach().requires_grad_()
        fwd_bwd = time_ms(lambda: model(x_grad).sum().backward(), device, reps)
        print(f"forward+backward:   {fwd_bwd:9.2f} ms  (median of {reps})")

    config = layer.config
    selected, causal = block_sparsity(aux.block_indices, config)
    print(f"selected branch: {selected} of {causal} causal (query, block) pairs ({selected / causal:.1%}); "
          f"{blocks_per_query(config, T)}")
    print("selection of batch 0, KV head 0 ('#' selected, '.' causal but skipped, ' ' future):")
    print(selection_picture(aux.block_indices[0, 0], config))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
