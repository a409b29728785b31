"""Train a small byte-level causal language model with NSA and with full attention (SDPA).

The text is the Python standard library's own ``.py`` sources, read at run time, so nothing is
downloaded. Both models share everything but the attention layer, and train under the same
budget (steps, batch, sequence length, learning rate). The script logs loss and tokens per
second, shows a progress line, and writes ``log.json`` and ``loss.png`` (both curves) to ``--out``.

    python examples/train_lm.py --out runs/lm                       # GPU defaults: T=2048
    python examples/train_lm.py --device cpu --steps 3 --seq-len 128 --layers 1 --dim 64 \\
        --heads 4 --kv-heads 2 --batch 2 --out /tmp/lm               # a smoke run on the CPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from nsa_flex import NSAConfig, SparseAttention  # noqa: E402
from nsa_flex.rotary import RotaryEmbedding  # noqa: E402


def stdlib_bytes(max_bytes: int) -> torch.Tensor:
    """The standard library's ``.py`` files, in a fixed order, as one uint8 tensor."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data + b"\0")
        total += len(data) + 1
        if total >= max_bytes:
            break
    if not chunks:
        raise RuntimeError(f"no .py files under {root}")
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8)


class FullAttention(nn.Module):
    """Causal SDPA attention with the same projections, GQA and RoPE as ``SparseAttention``."""

    def __init__(self, dim: int, heads: int, kv_heads: int, dim_head: int):
        super().__init__()
        self.heads, self.kv_heads, self.dim_head = heads, kv_heads, dim_head
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_k = nn.Linear(dim, kv_heads * dim_head, bias=False)
        self.to_v = nn.Linear(dim, kv_heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.rotary = RotaryEmbedding(dim_head)

    def qkv(self, x):
        """``x (B, T, dim)`` -> ``q (B, heads, T, dim_head)``, ``k``, ``v (B, kv_heads, T, dim_head)``,
        before RoPE (examples/generate.py rotates them at cached positions)."""
        B, T, _ = x.shape
        q = self.to_q(x).view(B, T, self.heads, -1).transpose(1, 2)
        k = self.to_k(x).view(B, T, self.kv_heads, -1).transpose(1, 2)
        v = self.to_v(x).view(B, T, self.kv_heads, -1).transpose(1, 2)
        return q, k, v

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        q, k = self.rotary(q), self.rotary(k)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.heads != self.kv_heads)
        return self.to_out(o.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, attn: nn.Module, dim: int):
        super().__init__()
        self.norm1, self.attn = nn.RMSNorm(dim), attn
        self.norm2 = nn.RMSNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim, bias=False), nn.GELU(), nn.Linear(4 * dim, dim, bias=False))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ByteLM(nn.Module):
    def __init__(self, attention: str, layers: int, dim: int, heads: int, kv_heads: int, config: NSAConfig,
                 selection_grad: bool = False):
        super().__init__()
        dim_head = dim // heads

        def attn():
            if attention == "nsa":
                return SparseAttention(dim, heads, kv_heads, dim_head=dim_head, config=config, selection_grad=selection_grad)
            return FullAttention(dim, heads, kv_heads, dim_head)

        self.embed = nn.Embedding(256, dim)
        self.blocks = nn.ModuleList(Block(attn(), dim) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, 256, bias=False)
        self.head.weight = self.embed.weight  # tied
        nn.init.normal_(self.embed.weight, std=0.02)  # unit-variance rows would give logits of std sqrt(dim)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def batches(data: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, data.numel() - seq_len - 1, (batch,), generator=gen)
        window = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()]).long()
        yield window[:, :-1], window[:, 1:]


@torch.no_grad()
def evaluate(model, data, args, device, autocast) -> tuple[float, list[list[float]]]:
    """Validation loss, and each NSA layer's mean gate per branch (compressed, selected,
    window) over the validation tokens and heads (empty for full attention)."""
    gen = torch.Generator().manual_seed(1234)  # the same validation windows every time
    it = batches(data, args.batch, args.seq_len, gen)
    layers = [m for m in model.modules() if isinstance(m, SparseAttention)]
    sums = [torch.zeros(3, device=device) for _ in layers]

    def hook(i):
        def record(module, inputs, output):  # to_gates: (B, T, heads * 3), sigmoid in forward
            sums[i] += output.float().unflatten(-1, (-1, 3)).sigmoid().mean(dim=(0, 1, 2))
        return record

    handles = [layer.to_gates.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    losses = []
    try:
        for _ in range(args.eval_batches):
            x, y = (t.to(device) for t in next(it))
            with autocast():
                logits = model(x)
            losses.append(F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).item())
    finally:
        for h in handles:
            h.remove()
    gates = [[round(float(g), 4) for g in s / args.eval_batches] for s in sums]
    return sum(losses) / len(losses), gates


def record_eval(log: dict, step: int, result: tuple[float, list[list[float]]]) -> None:
    loss, gates = result
    log["val_steps"].append(step)
    log["val_loss"].append(loss)
    log["gates"].append(gates)  # per layer: mean gate of the compressed, selected, window branch


def train(attention: str, train_data, val_data, args, device) -> dict:
    torch.manual_seed(args.seed)
    config = NSAConfig(select_block=args.select_block, num_selected=args.num_selected, window=args.window)
    model = ByteLM(attention, args.layers, args.dim, args.heads, args.kv_heads, config, args.selection_grad).to(device)
    step_fn = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    def autocast():  # bf16 on the GPU; the CPU run stays in float32
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    gen = torch.Generator().manual_seed(args.seed)
    it = batches(train_data, args.batch, args.seq_len, gen)
    selection_grad = attention == "nsa" and args.selection_grad
    log = dict(attention=attention, selection_grad=selection_grad, label=label(attention, selection_grad),
               steps=[], train_loss=[], val_steps=[], val_loss=[], step_ms=[], stopped_early=False,
               gates=[])
    log["gates_at_start"] = evaluate(model, val_data, args, device, autocast)[1]
    started = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tokens_per_step = args.batch * args.seq_len
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / max(1, args.warmup)) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = (t.to(device) for t in next(it))
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast():
            logits = step_fn(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1e3
        log["steps"].append(step)
        log["train_loss"].append(loss.item())
        log["step_ms"].append(ms)
        if step % args.eval_every == 0 or step == args.steps:
            record_eval(log, step, evaluate(model, val_data, args, device, autocast))
        out_of_time = args.time_limit is not None and time.perf_counter() - started > args.time_limit
        if out_of_time and step < args.steps:
            log["stopped_early"] = True
            record_eval(log, step, evaluate(model, val_data, args, device, autocast))
            print(f"\n{log['label']}: --time-limit of {args.time_limit} s reached at step {step}", end="")
            break
        done = int(30 * step / args.steps)
        print(f"\r{log['label']:6} [{'#' * done}{'.' * (30 - done)}] step {step}/{args.steps} loss {loss.item():.3f} "
              f"{tokens_per_step / (ms / 1e3):,.0f} tok/s", end="", flush=True)
    print()
    # steady-state step time: the median after the first few (compilation) steps
    steady = sorted(log["step_ms"][min(3, len(log["step_ms"]) - 1):])
    log["median_step_ms"] = steady[len(steady) // 2]
    log["tokens_per_s"] = tokens_per_step / (log["median_step_ms"] / 1e3)
    log["final_val_loss"] = log["val_loss"][-1]
    if device.type == "cuda":
        log["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return log


def label(attention: str, selection_grad: bool) -> str:
    return "nsa+sg" if selection_grad else attention


def plot(logs: list[dict], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for color, log in zip(("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"), logs):
        name = log.get("label", log["attention"])
        ax.plot(log["steps"], log["train_loss"], color=color, alpha=0.3, label=f"{name} train")
        ax.plot(log["val_steps"], log["val_loss"], color=color, marker="o", label=f"{name} val")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per byte)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"


def report(logs: list[dict]) -> None:
    for log in logs:
        early = f", stopped early at step {log['steps'][-1]}" if log.get("stopped_early") else ""
        print(f"{log.get('label', log['attention']):6}: final val loss {log['final_val_loss']:.4f}, "
              f"median step {log['median_step_ms']:.1f} ms ({log['tokens_per_s']:,.0f} tok/s){early}")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help, except where there is none to show (a flag, or
    an option that is off unless given)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_Help)
    ap.add_argument("--attention", choices=["nsa", "sdpa", "both"], default="both",
                    help="which model to train: NSA, full attention (SDPA), or both, one after the other")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    ap.add_argument("--steps", type=int, default=600, help="optimizer steps per model")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=2048, help="bytes per sequence, T")
    ap.add_argument("--layers", type=int, default=4, help="transformer blocks")
    ap.add_argument("--dim", type=int, default=384, help="model width: a multiple of --heads, with an even head size")
    ap.add_argument("--heads", type=int, default=6, help="query heads per attention layer")
    ap.add_argument("--kv-heads", type=int, default=2, help="key/value heads for grouped-query attention; divides --heads")
    ap.add_argument("--select-block", type=int, default=64, help="NSA: tokens per selection block, l'")
    ap.add_argument("--num-selected", type=int, default=16, help="NSA: selection blocks per query, n")
    ap.add_argument("--window", type=int, default=512, help="NSA: sliding-window length in tokens, w")
    ap.add_argument("--lr", type=float, default=1e-3,
                    help="peak learning rate of AdamW: linear warm-up, then cosine decay to 0")
    ap.add_argument("--warmup", type=int, default=50, help="warm-up steps")
    ap.add_argument("--eval-every", type=int, default=100, help="validate every this many steps, and after the last")
    ap.add_argument("--eval-batches", type=int, default=8,
                    help="batches per validation, the same windows each time")
    ap.add_argument("--max-bytes", type=int, default=40_000_000,
                    help="bytes of standard-library sources to read; the last 5%% are the validation split")
    ap.add_argument("--compile", action="store_true", help="wrap each model in torch.compile")
    ap.add_argument("--selection-grad", action="store_true",
                    help="NSA with straight-through gradients through the selection (attend's selection_grad)")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="stop a run after this many seconds of training, and say so in the log; no limit by default")
    ap.add_argument("--plot", type=Path, nargs="+", metavar="LOG_JSON",
                    help="train nothing: merge the runs of these log.json files into --out (log.json, loss.png)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights and of the training batches")
    ap.add_argument("--out", type=Path, default=Path("runs/train_lm"), help="folder for log.json and loss.png")
    return ap


def main(argv=None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.dim % args.heads or (args.dim // args.heads) % 2:
        ap.error("--dim must be a multiple of --heads with an even head size")

    if args.plot:  # runs made apart (one per GPU, say), shown together
        logs = [run for path in args.plot for run in json.loads(path.read_text())["runs"]]
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "log.json").write_text(json.dumps(dict(merged=[str(p) for p in args.plot], runs=logs), indent=1))
        report(logs)
        print(plot(logs, args.out / "loss.png"))
        return 0

    device = torch.device(args.device)
    data = stdlib_bytes(args.max_bytes)
    split = int(data.numel() * 0.95)
    train_data, val_data = data[:split], data[split:]
    if val_data.numel() <= args.seq_len + 1:
        ap.error("--max-bytes is too small for a validation split of this --seq-len")
    print(f"data: {data.numel():,} bytes of stdlib sources; device {device}; "
          f"{args.layers} layers x {args.dim} wide, T={args.seq_len}, batch {args.batch}, {args.steps} steps")
    kinds = ["nsa", "sdpa"] if args.attention == "both" else [args.attention]
    logs = [train(kind, train_data, val_data, args, device) for kind in kinds]
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (args.out / "log.json").write_text(json.dumps(dict(args=meta, torch=torch.__version__, runs=logs), indent=1))
    report(logs)
    print(plot(logs, args.out / "loss.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
