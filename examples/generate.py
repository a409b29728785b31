"""Generation throughput of a small decoder-only model, with NSA and with SDPA over a KV cache.

The model is examples/train_lm.py's byte-level ``ByteLM`` (random weights: the point is speed,
not text), built twice with the same weights: once with ``SparseAttention`` layers, each with
its ``NSACache``, once with causal SDPA over a plain preallocated KV cache. For each, the script
prefills a batch of random prompts of mixed lengths (right-padded, with per-row lengths),
then decodes ``--new-tokens`` tokens per row greedily (argmax; the first from the prefill's
logits, one decode step each after that). On CUDA each decode step after ``--warmup-steps``
real ones is captured once in a CUDA graph and replayed (docs/inference.md, "CUDA graphs and
speed"); on the CPU, or with ``--eager``, steps run eagerly. It reports the prefill time, decode
tokens per second and peak memory, and with ``--check`` verifies that the logits of the prefill
and of every decode step equal one full forward over each row's generated sequence.

    python examples/generate.py                                     # GPU defaults, bf16
    python examples/generate.py --prompt-lens 32768 65536 --batch 8  # long contexts
    python examples/generate.py --device cpu --batch 3 --prompt-lens 20 60 --new-tokens 8 \\
        --layers 2 --dim 64 --heads 4 --kv-heads 2 --window 32 --select-block 16 \\
        --num-selected 3 --compress-block 16 --compress-stride 8 --check   # a CPU check
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_lm.py, beside this file

from train_lm import ByteLM, FullAttention, _Help  # noqa: E402  (it also puts the checkout on sys.path)

from nsa_flex import NSACache, NSAConfig, SparseAttention  # noqa: E402
from nsa_flex.triton_support import triton_refusal  # noqa: E402

VOCAB = 256  # ByteLM's: one token per byte
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
# --check: the largest error allowed, relative to the largest logit of the full forward. Half
# precision is refused there: near-tied blocks may be selected differently by the two paths.
CHECK_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}
DECODE_PATHS = {"auto": None, "fused": True, "torch": False}  # decode_step's `fused`


# ------------------------------------------------------------------------------ SDPA cache


class KVCache:
    """A plain preallocated KV cache of one SDPA layer.

    ``k``, ``v``: ``(B, Hkv, L, D)``, RoPE-rotated keys and values, token ``s`` of row ``b`` at
    ``[b, :, s]``; ``lengths``: ``(B,)`` int64, tokens per row. Slots at or past a row's length
    (the padding of a prefill, say) are masked out of every decode step.
    """

    def __init__(self, batch: int, kv_heads: int, max_len: int, dim_head: int, device, dtype) -> None:
        self.k = torch.zeros(batch, kv_heads, max_len, dim_head, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.lengths = torch.zeros(batch, device=device, dtype=torch.int64)
        self.rows = torch.arange(batch, device=device)
        self.slots = torch.arange(max_len, device=device)


def sdpa_prefill(attn: FullAttention, x, cache: KVCache, lengths):
    """``x (B, T, dim)`` right-padded -> ``(B, T, dim)``, filling ``cache`` from position 0.
    Causal attention: a row's padding (after its tokens) never reaches them."""
    B, T, _ = x.shape
    q, k, v = attn.qkv(x)
    q, k = attn.rotary(q), attn.rotary(k)
    cache.k[:, :, :T] = k
    cache.v[:, :, :T] = v
    cache.lengths.copy_(lengths)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=attn.heads != attn.kv_heads)
    return attn.to_out(o.transpose(1, 2).reshape(B, T, -1))


def sdpa_decode(attn: FullAttention, x, cache: KVCache):
    """``x (B, 1, dim)`` -> ``(B, 1, dim)``: append one token per row at ``cache.lengths`` and
    attend it over the whole cache, masked to the row's tokens (static shapes, nothing read on
    the host: capturable in a CUDA graph)."""
    B = x.shape[0]
    q, k, v = attn.qkv(x)
    pos = cache.lengths  # (B,)
    q, k = attn.rotary.rotate_at(q, pos[:, None]), attn.rotary.rotate_at(k, pos[:, None])
    cache.k[cache.rows, :, pos] = k[:, :, 0]
    cache.v[cache.rows, :, pos] = v[:, :, 0]
    seen = (cache.slots <= pos[:, None])[:, None, None]  # (B, 1, 1, L)
    # The query heads of one KV head as that head's G queries: no K/V repeated per query head.
    q = q.reshape(B, attn.kv_heads, attn.heads // attn.kv_heads, -1)
    o = F.scaled_dot_product_attention(q, cache.k, cache.v, attn_mask=seen)  # (B, Hkv, G, D)
    cache.lengths.add_(1)
    return attn.to_out(o.reshape(B, 1, -1))


# ------------------------------------------------------------------------------ the model


def new_caches(model: ByteLM, batch: int, max_len: int) -> list:
    """One cache per layer: an ``NSACache`` for NSA, a ``KVCache`` for SDPA."""
    weight = model.head.weight
    caches = []
    for block in model.blocks:
        attn = block.attn
        if isinstance(attn, SparseAttention):
            caches.append(attn.new_cache(batch, max_len))
        else:
            caches.append(KVCache(batch, attn.kv_heads, max_len, attn.dim_head, weight.device, weight.dtype))
    return caches


def cache_bytes(caches: list) -> int:
    tensors = []
    for c in caches:
        tensors += [c.k, c.v, c.k_cmp, c.v_cmp] if isinstance(c, NSACache) else [c.k, c.v]
    return sum(t.numel() * t.element_size() for t in tensors)


def prefill(model: ByteLM, ids, lengths, caches, every_position: bool = False):
    """``ids (B, T)`` right-padded, ``lengths (B,)`` -> the logits ``(B, vocab)`` at each row's
    last token, or with ``every_position`` ``(B, T, vocab)`` (those at a row's padding are
    meaningless); fills the caches."""
    x = model.embed(ids)
    for block, cache in zip(model.blocks, caches):
        h = block.norm1(x)
        if isinstance(block.attn, SparseAttention):
            x = x + block.attn.prefill(h, cache, lengths=lengths)
        else:
            x = x + sdpa_prefill(block.attn, h, cache, lengths)
        x = x + block.mlp(block.norm2(x))
    if not every_position:
        x = x[torch.arange(x.shape[0], device=x.device), lengths - 1]
    return model.head(model.norm(x))


def decode(model: ByteLM, ids, caches, fused=None):
    """``ids (B, 1)``, the last token of each row -> logits ``(B, vocab)`` of the next one;
    appends the token to every cache."""
    x = model.embed(ids)
    for block, cache in zip(model.blocks, caches):
        h = block.norm1(x)
        if isinstance(block.attn, SparseAttention):
            x = x + block.attn.decode(h, cache, fused=fused)
        else:
            x = x + sdpa_decode(block.attn, h, cache)
        x = x + block.mlp(block.norm2(x))
    return model.head(model.norm(x))[:, -1]


def build_models(args) -> dict[str, ByteLM]:
    """Both models on the CPU in float32, the SDPA one with the NSA one's weights wherever they
    share a parameter (all of its own: embedding, norms, MLPs, Q/K/V/output projections)."""
    config = nsa_config(args)
    torch.manual_seed(args.seed)
    nsa = ByteLM("nsa", args.layers, args.dim, args.heads, args.kv_heads, config)
    sdpa = ByteLM("sdpa", args.layers, args.dim, args.heads, args.kv_heads, config)
    own, theirs = sdpa.state_dict(), nsa.state_dict()
    missing = sorted(set(own) - set(theirs))
    if missing:
        raise RuntimeError(f"the SDPA model has parameters the NSA model lacks: {missing}")
    sdpa.load_state_dict({name: theirs[name] for name in own})
    for module in nsa.modules():
        if isinstance(module, SparseAttention):
            module.backend = args.backend  # how prefill (and --check's forward) attends
    return {"nsa": nsa, "sdpa": sdpa}


def nsa_config(args) -> NSAConfig:
    return NSAConfig(compress_block=args.compress_block, compress_stride=args.compress_stride,
                     select_block=args.select_block, num_selected=args.num_selected, window=args.window)


# ------------------------------------------------------------------------------ progress


class Progress:
    """A progress bar on stderr: tqdm's when it is installed, else one line redrawn in place."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.n, self._shown = total, desc, 0, 0.0
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, desc=desc, unit="tok", file=sys.stderr, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self._shown >= 0.2 or self.n >= self.total:
            self._shown = now
            done = 30 * self.n // max(self.total, 1)
            sys.stderr.write(f"\r{self.desc} [{'#' * done}{'.' * (30 - done)}] {self.n}/{self.total} tokens per row")
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            sys.stderr.write("\n")


# ------------------------------------------------------------------------------ generation


def use_graphs(args) -> bool:
    """Whether decode steps are replayed from a CUDA graph: on CUDA, unless ``--eager``."""
    return args.device.type == "cuda" and not args.eager


def capture(body):
    """``body()`` captured in a CUDA graph, which must have run (warm-up) before; returns the
    graph's replay. Nothing runs now: each replay runs ``body``'s kernels on the tensors
    it used, so ``body`` reads and writes static buffers only."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph.replay


def generate(name: str, model: ByteLM, prompts, lengths, args) -> dict:
    """Prefill ``prompts (B, T)`` (right-padded, ``lengths (B,)``), then decode greedily: each
    new token is the argmax of its logits (the lowest token id among exact ties, as
    ``torch.argmax`` documents), so a model, its weights and the prompts fix the output.

    Returns a dict: ``tokens (B, new_tokens)`` (the first from the prefill), the timings, the
    peak memory; with ``args.check`` also the logits ``prefill_logits (B, T, vocab)`` and
    ``step_logits (B, new_tokens - 1, vocab)`` of the decode steps, on the CPU."""
    device = args.device
    B, N, W = prompts.shape[0], args.new_tokens, args.warmup_steps
    cuda = device.type == "cuda"
    graphed = use_graphs(args)
    fused = DECODE_PATHS[args.decode_path]

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    caches = new_caches(model, B, args.context)
    rows = torch.arange(B, device=device)
    tokens = torch.zeros(B, N, device=device, dtype=torch.int64)
    step_logits = []
    bar = Progress(N, f"{name:4} decode")
    with torch.no_grad():
        prefill(model, prompts, lengths, caches, args.check)  # warm-up: FlexAttention compiles on CUDA
        sync()
        start = time.perf_counter()
        logits = prefill(model, prompts, lengths, caches, args.check)
        sync()
        prefill_s = time.perf_counter() - start
        tokens[:, 0] = (logits[rows, lengths - 1] if args.check else logits).argmax(-1)
        bar.update()

        def step(i):  # decode step i: the input is new token i, the output predicts token i + 1
            out = decode(model, tokens[:, i : i + 1], caches, fused)
            tokens[:, i + 1] = out.argmax(-1)
            if args.check:
                step_logits.append(out.cpu())
            bar.update()

        # Warm-up steps are real steps (their tokens count); on CUDA they run on a side stream,
        # as CUDA graphs want, and compile the Triton kernels before the capture.
        side = torch.cuda.Stream(device) if graphed and cuda else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            for i in range(W):
                step(i)
        if side is not None:
            torch.cuda.current_stream(device).wait_stream(side)
        if graphed:
            static_ids = tokens[:, W : W + 1].clone()
            static_logits = torch.empty(B, VOCAB, device=device, dtype=model.head.weight.dtype)

            def body():  # one step of the whole model; its argmax is the next replay's input
                static_logits.copy_(decode(model, static_ids, caches, fused))
                static_ids.copy_(static_logits.argmax(-1, keepdim=True))

            replay = capture(body)

        sync()
        start = time.perf_counter()
        for i in range(W, N - 1):
            if graphed:
                replay()
                tokens[:, i + 1] = static_ids[:, 0]
                if args.check:
                    step_logits.append(static_logits.to("cpu", copy=True))  # the buffer is reused
                bar.update()
            else:
                step(i)
        sync()
        decode_s = time.perf_counter() - start
    bar.close()
    if graphed:
        for cache in caches:  # replays advance the lengths on the device only
            if isinstance(cache, NSACache):
                cache.sync_bound()
        del replay  # and with it the graph and its memory
    timed = N - 1 - W
    result = dict(
        prefill_ms=prefill_s * 1e3, prefill_tokens=int(lengths.sum()),
        prefill_tokens_per_s=int(lengths.sum()) / prefill_s, decode_steps_timed=timed,
        decode_ms_per_step=decode_s * 1e3 / timed, decode_tokens_per_s=B * timed / decode_s,
        decode_mode="CUDA graph" if graphed else "eager", cache_mib=cache_bytes(caches) / 2**20,
        peak_mib=torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
        tokens=tokens.cpu(),
    )
    if args.check:
        result["prefill_logits"] = logits.cpu()
        result["step_logits"] = torch.stack(step_logits, dim=1)
    return result


@torch.no_grad()
def check_against_forward(model: ByteLM, prompts, lengths, result: dict) -> tuple[float, int]:
    """The prefill's and decode steps' logits against one full forward over each row's prompt
    and generated tokens (the last of which is never fed back). Returns the largest error
    relative to the largest logit of the forward, and at how many of the ``B * new_tokens``
    positions the forward's argmax is the generated token."""
    tokens = result["tokens"]
    S = tokens.shape[1] - 1
    err, agree = 0.0, 0
    for b, P in enumerate(lengths.tolist()):
        seq = torch.cat([prompts[b, :P], tokens[b, :S].to(prompts.device)])
        full = model(seq[None])[0].cpu().double()  # (P + S, vocab)
        got = torch.cat([result["prefill_logits"][b, :P], result["step_logits"][b]]).double()
        row_err = float((got - full).abs().max() / full.abs().max())
        err = max(err, row_err if math.isfinite(row_err) else math.inf)  # max() would drop a NaN
        agree += int((full[P - 1 :].argmax(-1) == tokens[b]).sum())
    return err, agree


def run(args) -> dict:
    """Both (or one) models end to end; returns what ``main`` reports, per attention."""
    device, dtype = args.device, args.dtype
    gen = torch.Generator().manual_seed(args.seed)
    lo, hi = args.prompt_lens
    lengths = torch.randint(lo, hi + 1, (args.batch,), generator=gen)
    prompts = torch.randint(0, VOCAB, (args.batch, int(lengths.max())), generator=gen)
    prompts[torch.arange(prompts.shape[1]) >= lengths[:, None]] = 0  # padding: never read
    prompts, lengths = prompts.to(device), lengths.to(device)
    models = build_models(args)
    kinds = ["nsa", "sdpa"] if args.attention == "both" else [args.attention]
    results = {}
    for name in kinds:
        model = models.pop(name).to(device=device, dtype=dtype).eval()
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        results[name] = generate(name, model, prompts, lengths, args)
        if args.check:
            err, agree = check_against_forward(model, prompts, lengths, results[name])
            results[name].update(check_error=err, check_tolerance=CHECK_TOLERANCE[dtype],
                                 check_ok=err <= CHECK_TOLERANCE[dtype], greedy_agree=agree)
        del model
    results["prompt_lengths"] = lengths.cpu()
    return results


def report(results: dict) -> list[str]:
    lines = []
    for name in ("nsa", "sdpa"):
        r = results.get(name)
        if r is None:
            continue
        peak = "n/a on the CPU" if r["peak_mib"] is None else f"{r['peak_mib']:,.0f} MiB"
        lines.append(
            f"{name:4}: prefill {r['prefill_ms']:9.2f} ms ({r['prefill_tokens_per_s']:12,.0f} tok/s) | decode "
            f"{r['decode_tokens_per_s']:10,.0f} tok/s ({r['decode_ms_per_step']:.3f} ms/step over "
            f"{r['decode_steps_timed']} steps, {r['decode_mode']}) | peak memory {peak}, KV cache "
            f"{r['cache_mib']:,.1f} MiB"
        )
    if "nsa" in results and "sdpa" in results:
        nsa, sdpa = results["nsa"], results["sdpa"]
        lines.append(f"nsa/sdpa: decode tokens/s {nsa['decode_tokens_per_s'] / sdpa['decode_tokens_per_s']:.2f}x, "
                     f"prefill time {nsa['prefill_ms'] / sdpa['prefill_ms']:.2f}x")
    for name in ("nsa", "sdpa"):
        r = results.get(name)
        if r is not None and "check_error" in r:
            verdict = "ok" if r["check_ok"] else "FAILED"
            lines.append(
                f"check {name}: logits of the prefill and {r['step_logits'].shape[1]} decode steps against the "
                f"full forward: max error {r['check_error']:.1e} of the largest logit (tolerance "
                f"{r['check_tolerance']:.0e}): {verdict}; greedy tokens equal the forward's argmax at "
                f"{r['greedy_agree']}/{r['tokens'].numel()}"
            )
    return lines


def to_json(results: dict, args) -> dict:
    meta = {k: (str(v) if isinstance(v, (torch.device, torch.dtype, Path)) else v) for k, v in vars(args).items()}
    runs = {}
    for name in ("nsa", "sdpa"):
        if name in results:
            runs[name] = {k: (v.tolist() if k == "tokens" else v) for k, v in results[name].items()
                          if k not in ("prefill_logits", "step_logits")}
    return dict(args=meta, torch=torch.__version__, prompt_lengths=results["prompt_lengths"].tolist(), runs=runs)


# ------------------------------------------------------------------------------ arguments


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_Help)
    ap.add_argument("--attention", choices=["nsa", "sdpa", "both"], default="both",
                    help="which model to run: NSA, SDPA over a KV cache, or both, one after the other")
    ap.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None,
                    help="weights, activations and caches (default: bfloat16 on CUDA, float32 on the CPU)")
    ap.add_argument("--batch", type=int, default=8, help="prompts decoded together, B")
    ap.add_argument("--prompt-lens", type=int, nargs=2, default=[1024, 8192], metavar=("MIN", "MAX"),
                    help="each row's prompt length is drawn uniformly from [MIN, MAX]; shorter rows are right-padded")
    ap.add_argument("--new-tokens", type=int, default=256,
                    help="tokens generated per row: one from the prefill, then one decode step each")
    ap.add_argument("--context", type=int, default=None,
                    help="cache length per row, max_len (default: MAX of --prompt-lens plus --new-tokens); "
                         "SDPA and NSA's PyTorch decode step read all of it, masked")
    ap.add_argument("--warmup-steps", type=int, default=2,
                    help="decode steps run (and counted) before timing starts; on CUDA, before the graph capture")
    ap.add_argument("--eager", action="store_true", help="on CUDA, decode eagerly instead of replaying a CUDA graph")
    ap.add_argument("--decode-path", choices=list(DECODE_PATHS), default="auto",
                    help="NSA decode step: the fused Triton kernels, PyTorch operations, or the library's choice "
                         "(the kernels on CUDA)")
    ap.add_argument("--backend", choices=["flex", "triton", "reference"], default="flex",
                    help="NSA: the attend backend of the prefill and of --check's full forward")
    ap.add_argument("--layers", type=int, default=4, help="transformer blocks")
    ap.add_argument("--dim", type=int, default=384, help="model width: a multiple of --heads, with an even head size")
    ap.add_argument("--heads", type=int, default=6, help="query heads per attention layer")
    ap.add_argument("--kv-heads", type=int, default=2,
                    help="key/value heads (grouped-query attention); divides --heads")
    ap.add_argument("--compress-block", type=int, default=32, help="NSA: tokens per compressed block, l")
    ap.add_argument("--compress-stride", type=int, default=16, help="NSA: stride of the compressed blocks, d")
    ap.add_argument("--select-block", type=int, default=64, help="NSA: tokens per selection block, l'")
    ap.add_argument("--num-selected", type=int, default=16, help="NSA: selection blocks per query, n")
    ap.add_argument("--window", type=int, default=512, help="NSA: sliding-window length in tokens, w")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights and of the prompts")
    ap.add_argument("--check", action="store_true",
                    help="also verify the logits of prefill and decode steps against a full forward over each "
                         "generated sequence (float32 or float64; small sizes: the forward runs row by row)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results (timings, tokens) to this file")
    return ap


def _device(ap: argparse.ArgumentParser, name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        ap.error(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            ap.error(f"--device {name}: no CUDA device is available here (this torch: {torch.__version__})")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            ap.error(f"--device {name}: this machine has {count} CUDA device{'s' if count != 1 else ''}")
    return device


def parse_args(argv=None) -> argparse.Namespace:
    ap = parser()
    args = ap.parse_args(argv)
    args.device = _device(ap, args.device)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.type == "cuda" else "float32"
    args.dtype = DTYPES[args.dtype]
    for flag in ("batch", "new_tokens", "layers", "dim", "heads", "kv_heads"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    lo, hi = args.prompt_lens
    if not 1 <= lo <= hi:
        ap.error(f"--prompt-lens needs 1 <= MIN <= MAX, got {lo} {hi}")
    if args.warmup_steps < 1:
        ap.error(f"--warmup-steps must be >= 1 (the steps before a CUDA graph capture), got {args.warmup_steps}")
    if args.new_tokens < args.warmup_steps + 2:
        ap.error(f"--new-tokens must be at least --warmup-steps + 2 = {args.warmup_steps + 2} (one token from the "
                 f"prefill, the warm-up steps, at least one timed step), got {args.new_tokens}")
    if args.context is None:
        args.context = hi + args.new_tokens
    elif args.context < hi + args.new_tokens:
        ap.error(f"--context must hold the longest prompt and the new tokens: >= {hi} + {args.new_tokens}, "
                 f"got {args.context}")
    if args.dim % args.heads or (args.dim // args.heads) % 2:
        ap.error(f"--dim ({args.dim}) must be a multiple of --heads ({args.heads}) with an even head size")
    if args.heads % args.kv_heads:
        ap.error(f"--kv-heads ({args.kv_heads}) must divide --heads ({args.heads})")
    try:
        nsa_config(args)
    except ValueError as e:
        ap.error(f"the NSA options: {e}")
    kernels = [flag for flag, asked in (("--decode-path fused", args.decode_path == "fused"),
                                        ("--backend triton", args.backend == "triton")) if asked]
    refusal = triton_refusal(args.device, args.dtype) if kernels and args.attention != "sdpa" else None
    if refusal is not None:
        ap.error(f"{kernels[0]}: {refusal[1]}")
    if args.check and args.dtype not in CHECK_TOLERANCE:
        ap.error(f"--check needs --dtype float32 or float64 (got {str(args.dtype).removeprefix('torch.')}): in half "
                 "precision the decode step and the forward may select near-tied blocks differently")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    lo, hi = args.prompt_lens
    layers = f"{args.layers} layer{'s' if args.layers != 1 else ''}"
    print(f"generate: device {args.device}, {str(args.dtype).removeprefix('torch.')}; {layers} x {args.dim} wide "
          f"({args.heads} heads, {args.kv_heads} KV heads); batch {args.batch}, prompts of {lo}..{hi} tokens, "
          f"{args.new_tokens} new tokens per row, context {args.context}")
    with torch.cuda.device(args.device) if args.device.type == "cuda" else contextlib.nullcontext():
        results = run(args)
    print(f"prompt lengths: {results['prompt_lengths'].tolist()}")
    for line in report(results):
        print(line)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(to_json(results, args), indent=1))
    checked = [r for name, r in results.items() if name != "prompt_lengths" and "check_ok" in r]
    return 0 if all(r["check_ok"] for r in checked) else 1


if __name__ == "__main__":
    sys.exit(main())
