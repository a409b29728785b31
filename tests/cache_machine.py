"""A Hypothesis state machine over :class:`~nsa_flex.NSACache`, for the CPU and GPU fuzz tests.

:func:`cache_machine` builds a ``RuleBasedStateMachine`` for one device, dtype and decode path.
Its rules call the cache's whole surface in random order and sizes: ``prefill`` (random
per-row lengths, the right padding filled with NaN, inf or large garbage), ``decode_step`` of
``m = 1..3`` tokens, in bursts or up to ``max_len`` (refused exactly when a row would pass
it), ``rewind_`` by an int or a per-row tensor (over-long ones floor at 0; negative counts
refused, the cache unchanged), ``reset``, ``sync_bound``, ``clone`` (the machine continues on
the clone) and ``copy_`` (into the other cache, continuing there).

The model side keeps each row's whole token history (``q, k, v, gates`` per position, in
float64 on the CPU). After every step each row's ``m`` outputs must equal
``attend(..., backend="reference")`` over the row's history; after every rule the lengths
must equal the model's (within ``[0, max_len]``), the cache must hold the row's keys and
values exactly and its complete compressed blocks must be their block means.

Canaries: the two caches the machine allocates keep their storage inside larger buffers filled
with NaN (``GUARD`` slots before and after every ``(row, head)``'s slots and one column past
the head dim; the lengths between two sentinels). A write outside what a step may write
changes a guard and fails the machine. The spare slots (position ``max_len`` of ``k``/``v``,
``Lc`` of ``k_cmp``/``v_cmp``) are NaN again after every rule: a step within ``max_len`` never
writes the raw spare slot and never reads any spare slot (a read would turn its output NaN).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import event, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from nsa_flex import NSACache, NSAConfig, attend, decode_step, mean_compress, prefill

from strategies import rel_err

CONFIG = NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=3, num_initial=1, num_local=1,
                   window=8)
GUARD = 3  # guard slots on each side of a (row, head)'s slots
LENGTH_SENTINEL = -(2**40) + 7
FILLS = [float("nan"), float("inf"), -float("inf"), 3e4, 0.0]


@pytest.fixture
def one_thread():
    """One intra-op thread while a machine runs: it runs thousands of operations on tensors of
    a few hundred elements, where more threads only add their synchronisation (tens of times
    slower on a busy machine). Test modules use it with ``pytest.mark.usefixtures``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _guarded(t: torch.Tensor):
    """``t (B, H, S, D)`` copied into the middle of a NaN buffer; returns ``(buffer, view,
    inside)``, ``inside`` the buffer's mask of the view."""
    B, H, S, D = t.shape
    big = torch.full((B, H, S + 2 * GUARD, D + 1), float("nan"), dtype=t.dtype, device=t.device)
    view = big[:, :, GUARD : GUARD + S, :D]
    view.copy_(t)
    inside = torch.zeros(big.shape, dtype=torch.bool, device=t.device)
    inside[:, :, GUARD : GUARD + S, :D] = True
    return big, view, inside


class _Canaries:
    """Guard buffers around one cache's storage (see the module docstring)."""

    STORES = ("_k", "_v", "_k_cmp", "_v_cmp")

    def __init__(self, cache: NSACache):
        self.buffers = {}
        for name in self.STORES:
            big, view, inside = _guarded(getattr(cache, name))
            setattr(cache, name, view)
            self.buffers[name] = (big, inside)
        lengths = torch.full((cache.batch_size + 2,), LENGTH_SENTINEL, dtype=torch.int64, device=cache.device)
        lengths[1:-1] = cache.lengths
        cache.lengths = lengths[1:-1]
        self.lengths = lengths
        self.cache = cache
        self.poison_spare_slots()

    def poison_spare_slots(self) -> None:
        for name in self.STORES:
            getattr(self.cache, name)[:, :, -1] = float("nan")

    def check(self) -> None:
        for name, (big, inside) in self.buffers.items():
            assert torch.isnan(big[~inside]).all(), f"a write landed outside the cache's {name}"
        # eager steps never pass max_len: the raw spare slot is never written
        for name in ("_k", "_v"):
            assert torch.isnan(getattr(self.cache, name)[:, :, -1]).all(), f"the spare slot of {name} was written"
        assert self.lengths[0] == LENGTH_SENTINEL and self.lengths[-1] == LENGTH_SENTINEL, "a write outside lengths"


def cache_machine(
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float64,
    fused: bool = False,
    backends: tuple[str, ...] = ("reference",),
    tol: float = 1e-10,
    B: int = 2,
    Hkv: int = 1,
    G: int = 2,
    Dk: int = 8,
    Dv: int = 8,
    max_len: int = 40,
    max_prompt: int | None = None,
    max_step: int = 3,
    max_burst: int = 4,
    until_full: bool = True,
    config: NSAConfig = CONFIG,
) -> type[RuleBasedStateMachine]:
    """A state machine class for caches on ``device`` in ``dtype``.

    ``fused``: decode steps of one token run the Triton kernels (``fused=True``); longer ones,
    and every step when ``False``, the PyTorch step. ``backends``: those ``prefill`` draws
    from. ``tol``: the largest relative error of outputs against the float64 reference.
    ``max_prompt``: the longest prompt (default ``max_len``); ``max_step``: the largest ``m``;
    ``max_burst``: the most steps one ``decode`` rule takes; ``until_full``: whether the rule
    that decodes up to ``max_len`` is there (many steps: off where steps are slow).
    """
    Hq = Hkv * G
    L = max_len
    max_prompt = L if max_prompt is None else max_prompt
    # sizes biased to the edges: prompts that (nearly) fill the cache, rewinds of a few tokens
    prompt_len = st.integers(0, max_prompt) | st.integers(max(0, max_prompt - 4), max_prompt)
    count = st.integers(0, 3) | st.integers(0, L + 4)
    cmp_tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-2)

    def draw_tokens(seed: int, T: int, lengths=None, fill=None):
        """q, k, v, gates of ``T`` positions per row in the cache's dtype on the device; past
        ``lengths[b]`` (if given) every value is ``fill``."""
        g = torch.Generator().manual_seed(seed)
        xs = [torch.randn(B, Hq, T, Dk, generator=g, dtype=torch.float64),
              torch.randn(B, Hkv, T, Dk, generator=g, dtype=torch.float64),
              torch.randn(B, Hkv, T, Dv, generator=g, dtype=torch.float64),
              torch.rand(B, Hq, T, 3, generator=g, dtype=torch.float64)]
        if lengths is not None:
            pad = torch.arange(T) >= torch.tensor(lengths)[:, None]
            xs = [x.masked_fill(pad[:, None, :, None], fill) for x in xs]
        return [x.to(device=device, dtype=dtype) for x in xs]

    class CacheMachine(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            made = [NSACache(B, Hkv, L, Dk, Dv, config=config, device=device, dtype=dtype) for _ in range(2)]
            self.canaries = [_Canaries(c) for c in made]
            self.guarded = made
            self.cache = made[0]
            self.rows = [self._empty() for _ in range(B)]  # per row: [q, k, v, gates], (H, n, D) float64 CPU

        @staticmethod
        def _empty():
            return [torch.zeros(h, 0, d, dtype=torch.float64) for h, d in ((Hq, Dk), (Hkv, Dk), (Hkv, Dv), (Hq, 3))]

        def _held(self):
            return [r[0].shape[1] for r in self.rows]

        def _reference(self):
            """The full forward over each row's history, ``(B, Hq, max n, Dv)`` float64: one
            batch, rows right-padded with zeros (causal: row ``b``'s outputs at positions
            ``< n_b`` are those of the row alone)."""
            n = max(self._held())
            rows = [[torch.nn.functional.pad(x, (0, 0, 0, n - x.shape[1])) for x in r] for r in self.rows]
            return attend(*(torch.stack(xs) for xs in zip(*rows)), config=config, backend="reference")

        def _snapshot(self):
            c = self.cache
            return [t.clone() for t in (c.lengths, c.k, c.v, c.k_cmp, c.v_cmp)], c._bound

        def _unchanged(self, snap):
            tensors, bound = snap
            c = self.cache
            for a, b in zip(tensors, (c.lengths, c.k, c.v, c.k_cmp, c.v_cmp)):
                assert torch.equal(a, b)
            assert c._bound == bound

        # ------------------------------------------------------------------ rules

        @rule(data=st.data(), T=prompt_len, seed=st.integers(0, 2**32 - 1),
              fill=st.sampled_from(FILLS), backend=st.sampled_from(backends))
        def prefill_prompt(self, data, T, seed, fill, backend):
            row_len = st.integers(0, T) | st.integers(max(0, T - 3), T)
            lengths = data.draw(st.none() | st.lists(row_len, min_size=B, max_size=B), label="lengths")
            if T == 0:
                lengths = None
            xs = draw_tokens(seed, T, lengths, fill)
            out = prefill(self.cache, *xs, lengths=None if lengths is None else torch.tensor(lengths, device=device),
                          backend=backend)
            event(f"prefill: {'padded' if lengths is not None and min(lengths) < T else 'not padded'}, {backend}")
            lengths = [T] * B if lengths is None else lengths
            assert out.shape == (B, Hq, T, Dv)
            for b, n in enumerate(lengths):
                self.rows[b] = [x[b, :, :n].double().cpu() for x in xs]
                assert torch.all(out[b, :, n:] == 0), "padded outputs are 0"
            if max(lengths):
                want = self._reference()
                for b, n in enumerate(lengths):
                    assert rel_err(out[b, :, :n], want[b, :, :n]) < tol, ("prefill", b)

        @rule(ms=st.lists(st.integers(1, max_step), min_size=1, max_size=max_burst), seed=st.integers(0, 2**32 - 1))
        def decode(self, ms, seed):
            """A burst of steps of ``m`` tokens each, every one checked."""
            for i, m in enumerate(ms):
                self._step(m, seed + i)

        def _step(self, m, seed):
            xs = draw_tokens(seed % 2**32, m)
            if max(self._held()) + m > L:
                event("decode: refused past max_len")
                snap = self._snapshot()
                try:
                    decode_step(self.cache, *xs, fused=fused and m == 1)
                except ValueError as e:
                    assert "max_len" in str(e)
                else:
                    raise AssertionError("a step past max_len was accepted")
                self._unchanged(snap)
                return
            event(f"decode: m={m}{' fused' if fused and m == 1 else ''}")
            if max(self._held()) + m == L:
                event("decode: up to max_len")
            out = decode_step(self.cache, *xs, fused=fused and m == 1)
            assert out.shape == (B, Hq, m, Dv)
            for b in range(B):
                self.rows[b] = [torch.cat([r, x[b].double().cpu()], dim=1) for r, x in zip(self.rows[b], xs)]
            want = self._reference()
            for b, n in enumerate(self._held()):
                assert rel_err(out[b], want[b, :, n - m : n]) < tol, ("decode", m, b, self._held())

        @precondition(lambda self: until_full)
        @rule(m=st.integers(1, max_step), seed=st.integers(0, 2**32 - 1))
        def decode_until_full(self, m, seed):
            """Steps of ``m`` tokens up to ``max_len``, then one that is refused."""
            for i in range(L + 1):
                full = max(self._held()) + m > L
                self._step(m, seed + i)
                if full:
                    break

        @rule(n=count)
        def rewind_int(self, n):
            self.cache.rewind_(n)
            self._drop([n] * B)

        @rule(ns=st.lists(count, min_size=B, max_size=B), scalar=st.booleans(), int32=st.booleans())
        def rewind_tensor(self, ns, scalar, int32):
            counts = torch.tensor(ns[0] if scalar else ns, device=device, dtype=torch.int32 if int32 else torch.int64)
            self.cache.rewind_(counts)
            self._drop([ns[0]] * B if scalar else ns)

        @rule(ns=st.lists(st.integers(-L - 4, L), min_size=B, max_size=B), neg=st.integers(-L - 4, -1),
              at=st.integers(0, B - 1), scalar=st.booleans())
        def rewind_negative(self, ns, neg, at, scalar):
            ns[at] = neg
            snap = self._snapshot()
            counts = torch.tensor(min(ns) if scalar else ns, device=device)
            for bad in (counts, min(ns)):
                try:
                    self.cache.rewind_(bad)
                except ValueError as e:
                    assert "num_tokens" in str(e)
                else:
                    raise AssertionError(f"rewind_({bad!r}) was accepted")
                self._unchanged(snap)

        def _drop(self, ns):
            for b, n in enumerate(ns):
                keep = max(self._held()[b] - n, 0)
                self.rows[b] = [x[:, :keep] for x in self.rows[b]]

        @rule()
        def reset(self):
            self.cache.reset()
            self.rows = [self._empty() for _ in range(B)]

        @rule()
        def sync_bound(self):
            bound = self.cache._bound
            self.cache.sync_bound()
            assert self.cache._bound == max(self._held()) <= bound

        @rule()
        def clone(self):
            new = self.cache.clone()
            snap = self._snapshot()
            old, self.cache = self.cache, new
            self._unchanged(snap)
            for name in ("_k", "_v", "_k_cmp", "_v_cmp", "lengths"):
                assert getattr(new, name).data_ptr() != getattr(old, name).data_ptr()

        @rule()
        def copy_into_the_other(self):
            target = self.guarded[1] if self.cache is self.guarded[0] else self.guarded[0]
            snap = self._snapshot()
            target.copy_(self.cache)
            self.cache = target
            self._unchanged(snap)

        # ------------------------------------------------------------- invariants

        @invariant()
        def lengths_are_the_tokens_held(self):
            held = self._held()
            assert self.cache.lengths.tolist() == held
            assert all(0 <= n <= L for n in held)
            assert self.cache._bound >= max(held)  # the host-side bound stays an upper bound

        @invariant()
        def the_cache_holds_the_rows(self):
            c = self.cache
            for b, n in enumerate(self._held()):
                _, k, v, _ = self.rows[b]
                assert torch.equal(c.k[b, :, :n].double().cpu(), k) and torch.equal(c.v[b, :, :n].double().cpu(), v)
                tc = config.num_compressed(n)
                if tc:
                    for got, x in ((c.k_cmp, k), (c.v_cmp, v)):
                        want = mean_compress(x[None], config)[0]
                        torch.testing.assert_close(got[b, :, :tc].double().cpu(), want, rtol=cmp_tol, atol=cmp_tol)

        @invariant()
        def canaries_hold(self):
            for canary in self.canaries:
                canary.check()
                canary.poison_spare_slots()

    return CacheMachine
