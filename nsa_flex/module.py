"""``SparseAttention``: a drop-in NSA attention layer, ``(B, T, dim) -> (B, T, dim)``."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from ._validation import check_backend, check_bool, check_int, check_real, check_tensor
from .api import NSAAux, attend
from .buckets import bucket_length, check_length_buckets, pad_documents
from .inference import NSACache, decode_step, prefill
from .inference.cache import check_cache
from .compression import BlockCompressor
from .config import NSAConfig, resolve_config
from .distributed import _attend_local, _check_group, _check_layout, _facts, _gather_kv, _make_plan
from .rotary import RotaryEmbedding
from .varlen import Documents, resolve

__all__ = ["SparseAttention"]


def _first_tokens(x: Tensor, T, dim: int) -> Tensor:
    """The first ``T`` entries of ``x`` along ``dim``, as a new contiguous tensor.

    A gather rather than the slice ``x[:, :T]``: whether that view is contiguous depends on
    whether ``T`` is the whole padded length, and with a symbolic ``T`` Inductor guards on the
    answer (``T != T_bucket``), which splits each bucket into two graphs.
    """
    return x.index_select(dim, torch.arange(T, device=x.device))


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """``(B, T, heads * D) -> (B, heads, T, D)``, a view (head ``h`` is features ``h*D .. h*D + D - 1``)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """``(B, H, T, D) -> (B, T, H * D)``: the inverse of :func:`_split_heads`."""
    return x.transpose(1, 2).flatten(2)


def _specialise_shape(x: Tensor, keep_length: bool) -> None:
    """While tracing, make ``x``'s sizes static, except ``T`` when ``keep_length``.

    Under ``torch.compile(dynamic=True)`` (or automatic dynamic shapes) any size of ``x`` may
    arrive symbolic. The attention below is written for static sizes: a symbolic batch size
    reached Inductor's CPU FlexAttention lowering as a ``Min(...)`` expression and failed
    (torch 2.13), and a symbolic ``T`` is specialised inside anyway. Guarding here, once,
    gives one clean guard per size. With length buckets ``T`` stays symbolic: choosing the
    bucket guards its range, and the attention sees the static padded length.
    """
    for d in (0, 2) if keep_length else (0, 1, 2):
        torch._dynamo.mark_static(x, d)


class SparseAttention(nn.Module):
    """Native Sparse Attention layer (Yuan et al., arXiv 2502.11089) on ``nsa_flex.attend``.

    Queries, keys and values are linear projections of ``x``; queries and keys are rotated by
    RoPE; the rotated keys and the values are compressed into blocks by two learned
    ``BlockCompressor`` MLPs; the three branches (compressed, selected, sliding window) are
    mixed by per-head gates ``sigmoid(Linear(x))``; an output projection maps back to ``dim``.

    Args:
        dim: model width, the last dimension of ``x``.
        heads: ``Hq``, query heads.
        kv_heads: ``Hkv``, key/value heads (default ``heads``); must divide ``heads``.
        dim_head: ``Dk``, query/key feature size per head; even when ``rotary``.
        dim_head_v: ``Dv``, value feature size per head (default ``dim_head``).
        config: NSA hyperparameters (default ``NSAConfig()``, the paper's).
        rotary: apply RoPE to queries and keys.
        rotary_base: RoPE's wavelength base.
        compress_hidden: hidden width of the compression MLPs (default: the head size).
        backend: one of ``nsa_flex.BACKENDS``: ``"flex"`` (FlexAttention), ``"triton"`` (the
            hand-written selected-branch kernel) or ``"reference"`` (the dense oracle).
            A plain attribute: it may be changed after construction.
        bias: whether the linear projections have a bias.
        selection_grad: straight-through gradients through the selection, so that the key
            compression also learns from what the selected branch needed (``attend``'s
            ``selection_grad``). A plain attribute, like ``backend``.
        length_buckets: pad each sequence, at its end, to a few fixed lengths before attending,
            so that a compiled model compiles once per bucket rather than once per length
            (docs/compile.md). ``None`` (default): no padding. ``"pow2"``: the smallest power of
            two ``>= T``. A strictly increasing tuple of ints: the smallest entry ``>= T``; a
            longer sequence raises ``ValueError``. Outputs and gradients are those of the
            unpadded layer (attention is causal: appended tokens change nothing before them);
            the cost is the attention over up to the bucket's length. ``forward`` only
            (``prefill``/``decode`` never pad). Checked when set; may be changed after
            construction.
        group: a ``torch.distributed`` process group over which the sequence is sharded
            (context parallelism, [distributed.md](distributed.md)), or ``None`` (default).
            With a group, ``forward`` takes this rank's shard ``(B, T_local, dim)`` of the
            sequence (``nsa_flex.distributed.shard_sequence(x, group, dim=1, layout=layout)``)
            and returns this rank's shard of the whole sequence's output; RoPE uses the tokens'
            global positions, keys and values are all-gathered, and the learned compression runs
            on the gathered ones. Parameter gradients are this rank's part: their sum over the
            ranks is the single-process gradient, and reducing them is left to the wrapper (DDP,
            FSDP, or an all-reduce), as for data parallelism. A plain attribute.
        layout: how the sequence is sharded over ``group``: ``"zigzag"`` (default) or
            ``"contiguous"`` (``nsa_flex.distributed``). A plain attribute.

    Raises:
        TypeError: a non-int size, a non-`NSAConfig` config, a non-bool `rotary`, `bias` or
            `selection_grad`, a non-number `rotary_base`, or a `length_buckets` that is neither
            `None`, a string nor a sequence of ints.
        ValueError: a size below 1, `heads` not divisible by `kv_heads`, an odd `dim_head`
            with `rotary=True`, a `rotary_base` that is not finite and `> 1`, an unknown
            `backend`, or a `length_buckets` that is another string than `"pow2"`, empty, holds
            a length below 1 or is not strictly increasing (setting `layer.length_buckets`
            checks the same); a `group` not a `ProcessGroup` (`TypeError`), or an unknown `layout`.

    Shapes:
        `forward(x)`: `x (B, T, dim) -> (B, T, dim)`.

    What it learns (submodules):

    - `to_q`, `to_k`, `to_v`: `Linear(dim, heads*dim_head)`, `Linear(dim, kv_heads*dim_head)`,
      `Linear(dim, kv_heads*dim_head_v)`;
    - `compress_k`, `compress_v`: a `BlockCompressor` each (`phi` of eq. 7), shared by all
      heads; `compress_k` has no output bias (`out_bias=False`);
    - `to_gates`: `Linear(dim, heads*3)`; the gates are `sigmoid` of it, one triple per head and
      token;
    - `to_out`: `Linear(heads*dim_head_v, dim)`;
    - `rotary`: a parameter-free `nsa_flex.rotary.RotaryEmbedding`, or `None`.

    **Length buckets** ([compile.md](compile.md#changing-lengths-length-buckets)): with
    `length_buckets`, `forward` pads `x` with zeros at the end to `(B, T_bucket, dim)`,
    `T_bucket` the smallest bucket `>= T` (`nsa_flex.buckets.bucket_length`), runs the layer on
    that, and returns the first `T` tokens (and `aux` cut back to `T` tokens). Attention is
    causal, so outputs, `aux` and gradients equal the unpadded layer's; the point is that a
    compiled model then compiles one graph per bucket instead of one per length.

    - `T` above a tuple's largest bucket: `ValueError` naming `length_buckets` (no silent
      fallback, which would compile a graph per length again).
    - `cu_seqlens`: the padding becomes one more document after the last, so the real
      documents are attended exactly as without it.
    - `score_mod`/`mask_mod` are called at the padded positions `T .. T_bucket - 1` too (what
      they return there reaches no returned output): a per-token tensor they index, e.g.
      document ids for a document mask, must be at least `T_bucket` long. Under
      `torch.compile`, give it one size for all lengths (the largest bucket's): on the CPU,
      Inductor's FlexAttention template failed to compile a mod capturing a tensor whose size
      changed with `T` (a C++ compile error, torch 2.13).
    - `prefill` and `decode` never pad: a cache holds real tokens only, and its `max_len`
      need not reach the bucket.
    - An empty `x` (`T = 0`) is not padded; it raises as without buckets.

    Inference ([inference.md](inference.md)): `cache = layer.new_cache(B, max_len)`, then
    `layer.prefill(prompt, cache)` and `layer.decode(x_new, cache)` per step; their outputs
    equal `forward` over the whole sequence.

    ```python
    import torch
    from nsa_flex import NSAConfig, SparseAttention

    layer = SparseAttention(256, heads=8, kv_heads=2, dim_head=32, config=NSAConfig(num_selected=8, window=128))
    x = torch.randn(2, 300, 256)
    y, aux = layer(x, return_aux=True)
    print(y.shape)                   # torch.Size([2, 300, 256])
    print(aux.block_indices.shape)   # torch.Size([2, 2, 300, 8])
    print(aux.o_slc.shape)           # torch.Size([2, 8, 300, 32])
    y.sum().backward()
    print(layer.compress_k.pos.grad.shape, layer.to_gates.weight.grad.shape)
    # torch.Size([32, 32]) torch.Size([24, 256])
    ```
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        kv_heads: int | None = None,
        dim_head: int = 64,
        dim_head_v: int | None = None,
        config: NSAConfig | None = None,
        *,
        rotary: bool = True,
        rotary_base: float = 10000.0,
        compress_hidden: int | None = None,
        backend: str = "flex",
        bias: bool = False,
        selection_grad: bool = False,
        length_buckets: str | tuple[int, ...] | None = None,
        group=None,
        layout: str = "zigzag",
    ) -> None:
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        dim_head_v = dim_head if dim_head_v is None else dim_head_v
        for name, value in [
            ("dim", dim),
            ("heads", heads),
            ("kv_heads", kv_heads),
            ("dim_head", dim_head),
            ("dim_head_v", dim_head_v),
        ]:
            check_int(name, value, 1)
        if compress_hidden is not None:
            check_int("compress_hidden", compress_hidden, 1)
        if heads % kv_heads:
            raise ValueError(f"heads ({heads}) must be divisible by kv_heads ({kv_heads})")
        config = resolve_config(config)
        check_bool("rotary", rotary)
        if rotary and dim_head % 2:
            raise ValueError(f"dim_head must be even when rotary=True, got {dim_head}")
        check_real("rotary_base", rotary_base, 1.0)
        check_bool("bias", bias)
        check_backend(backend)
        if group is not None:
            _check_group(group)
        _check_layout(layout)

        self.dim = dim
        self.heads = heads
        self.kv_heads = kv_heads
        self.dim_head = dim_head
        self.dim_head_v = dim_head_v
        self.config = config
        self.backend = backend
        check_bool("selection_grad", selection_grad)
        self.selection_grad = selection_grad
        self.length_buckets = length_buckets
        self.group = group
        self.layout = layout

        self.to_q = nn.Linear(dim, heads * dim_head, bias=bias)
        self.to_k = nn.Linear(dim, kv_heads * dim_head, bias=bias)
        self.to_v = nn.Linear(dim, kv_heads * dim_head_v, bias=bias)
        self.to_gates = nn.Linear(dim, heads * 3, bias=bias)
        self.to_out = nn.Linear(heads * dim_head_v, dim, bias=bias)
        self.rotary = RotaryEmbedding(dim_head, base=rotary_base) if rotary else None
        # no output bias for keys: softmax over the compressed scores would ignore it
        self.compress_k = BlockCompressor(dim_head, config, hidden=compress_hidden, out_bias=False)
        self.compress_v = BlockCompressor(dim_head_v, config, hidden=compress_hidden)

    @property
    def length_buckets(self) -> str | tuple[int, ...] | None:
        """``None``, ``"pow2"`` or an increasing tuple of lengths (see the class docstring)."""
        return self._length_buckets

    @length_buckets.setter
    def length_buckets(self, value) -> None:
        self._length_buckets = check_length_buckets(value)

    def extra_repr(self) -> str:
        buckets = "" if self.length_buckets is None else f", length_buckets={self.length_buckets!r}"
        if self.group is not None:
            buckets += f", layout={self.layout!r} over a group of {torch.distributed.get_world_size(self.group)}"
        return (
            f"dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, "
            f"dim_head={self.dim_head}, dim_head_v={self.dim_head_v}, backend={self.backend!r}{buckets}, "
            f"config={self.config}"
        )

    def forward(
        self,
        x: Tensor,
        *,
        score_mod: Callable | None = None,
        mask_mod: Callable | None = None,
        return_aux: bool = False,
        cu_seqlens=None,
    ):
        """Attend over ``x`` causally with NSA.

        Args:
            x: ``(B, T, dim)``, floating point, on the module's device.
            score_mod, mask_mod: FlexAttention modifiers, passed to ``attend`` for every branch
                (see ``nsa_flex.attend`` for the positions they see).
            return_aux: also return ``attend``'s aux (``block_indices (B, Hkv, T, n)`` and the
                per-branch outputs ``o_cmp``, ``o_slc``, ``o_swa``, each ``(B, Hq, T, Dv)``).
            cu_seqlens: documents packed in one row (``B = 1``): ``(N+1,)`` offsets, as for
                ``attend``, or a ``nsa_flex.varlen.Documents`` (read once per batch and shared by
                the layers). Each document is attended alone, and RoPE positions restart at 0 at
                each document's first token. With ``length_buckets``, the padding is one more
                document after the last.

        Returns:
            ``(B, T, dim)``, or ``(out, aux)`` when ``return_aux``; ``aux``'s tensors are cut
            back to ``T`` tokens too when ``length_buckets`` pads.

        Raises:
            TypeError: `x` is not a floating tensor, or (outside autocast) not of the
                parameters' dtype; a mod is not callable.
            ValueError: `x` is not `(B, T, dim)`, is on another device than the parameters, or
                is longer than the largest length bucket; with a `group`: `length_buckets`,
                `score_mod`, `mask_mod` or `return_aux` given (not supported there), or what
                `context_parallel_attend` refuses; `attend` checks the rest.

        With ``group`` set, ``x`` is this rank's shard ``(B, T_local, dim)`` and so is the
        output; ``cu_seqlens`` then describes the whole row (``T`` tokens), the same on every
        rank, and every rank must call ``forward`` and the backward.

        The forward pass: project `q, k, v`; rotate `q` and `k` with RoPE; compress the
        **rotated** keys (`compress_k(k)`) and the values (`compress_v(v)`); compute the gates;
        call `attend(q, k, v, gates, config=..., k_cmp=..., v_cmp=..., backend=self.backend,
        ...)`; merge the heads and apply `to_out`. With `length_buckets`, `x` is padded with
        zeros to `(B, T_bucket, dim)`, attended, and the output cut back to `(B, T, dim)`
        (`score_mod`/`mask_mod` are then called at the padded positions too: a mod that indexes
        a per-token tensor needs it `bucket_length(T, layer.length_buckets)` long).
        """
        # Shape/dtype/device checks only: they are static under torch.compile, so forward
        # stays one graph.
        check_tensor("x", x, None, floating=False)
        if x.dim() != 3:
            raise ValueError(f"x must be (B, T, dim), got shape {tuple(x.shape)}")
        if x.shape[-1] != self.dim:
            raise ValueError(f"x's last dimension must be dim={self.dim}, got {x.shape[-1]}")
        if not x.is_floating_point():
            raise TypeError(f"x must be floating point, got {x.dtype}")
        if x.dtype != self.to_q.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x has dtype {x.dtype} but the module's parameters are {self.to_q.weight.dtype}")
        if x.device != self.to_q.weight.device:
            raise ValueError(
                f"x is on {x.device} but the module's parameters are on {self.to_q.weight.device}"
            )

        if self.group is not None:
            return self._forward_sharded(x, score_mod, mask_mod, return_aux, cu_seqlens)
        bucketed = self.length_buckets is not None
        if torch.compiler.is_compiling():
            _specialise_shape(x, keep_length=bucketed)
        T = x.shape[1]
        docs = None if cu_seqlens is None else resolve(cu_seqlens, T, x.device, x.shape[0])
        bucketed = bucketed and T >= 1  # an empty x goes on to attend's error
        if bucketed:
            x, docs = self._pad_to_bucket(x, docs)
        q, k, v, gates = self._project(x)
        if self.rotary is not None:
            positions = None if docs is None else docs.pos  # restart at each document
            q, k = self.rotary(q, positions=positions), self.rotary(k, positions=positions)

        result = attend(
            q,
            k,
            v,
            gates,
            config=self.config,
            k_cmp=self.compress_k(k, cu_seqlens=docs),
            v_cmp=self.compress_v(v, cu_seqlens=docs),
            backend=self.backend,
            score_mod=score_mod,
            mask_mod=mask_mod,
            return_aux=return_aux,
            cu_seqlens=docs,
            selection_grad=self.selection_grad,
        )
        out, aux = result if return_aux else (result, None)
        out = self.to_out(_merge_heads(out))
        if bucketed:
            # Back to T tokens: the padded queries' outputs are dropped, so nothing flows back
            # into the padding.
            out = _first_tokens(out, T, dim=1)
            if return_aux:
                aux = NSAAux(*(_first_tokens(a, T, dim=2) for a in aux))
        return (out, aux) if return_aux else out

    def _forward_sharded(self, x: Tensor, score_mod, mask_mod, return_aux, cu_seqlens) -> Tensor:
        """``forward`` over this rank's shard ``x (B, T_local, dim)`` of a sequence sharded over
        ``self.group``: one small all-gather of shapes, one of the keys and values."""
        for name, value in (("length_buckets", self.length_buckets), ("score_mod", score_mod),
                            ("mask_mod", mask_mod), ("return_aux", return_aux or None)):
            if value is not None:
                raise ValueError(f"{name} is not supported with a sharded sequence (group set)")
        q, k, v, gates = self._project(x)
        facts = _facts(q, k, v, gates, self.config, self.backend, cu_seqlens)
        plan = _make_plan(x.shape[1], self.group, self.layout, x.device, facts)
        docs = None if cu_seqlens is None else resolve(cu_seqlens, plan.total_len, x.device, x.shape[0])
        if self.rotary is not None:
            positions = plan.positions(x.device)  # global positions, doc-local in a packed row
            positions = positions if docs is None else docs.pos[positions]
            q, k = self.rotary(q, positions=positions), self.rotary(k, positions=positions)
        k_full, v_full = _gather_kv(k, v, plan, self.group)
        out = _attend_local(plan, q, k_full, v_full, gates, config=self.config, backend=self.backend, scale=None,
                            docs=docs, compress_k=self.compress_k, compress_v=self.compress_v,
                            selection_grad=self.selection_grad)
        return self.to_out(_merge_heads(out))

    def _pad_to_bucket(self, x: Tensor, docs: Documents | None) -> tuple[Tensor, Documents | None]:
        """``x (B, T, dim) -> (B, T_bucket, dim)``, zeros appended; a packed row's padding
        becomes one more document.

        Under ``torch.compile`` with a symbolic ``T``, choosing the bucket guards the graph on
        ``T``'s range, and the padded length is static. The pad is applied even when it is
        empty, so that no ``T == T_bucket`` guard splits a bucket in two.
        """
        T = x.shape[1]
        padded = bucket_length(T, self.length_buckets)
        if docs is not None:
            docs = pad_documents(docs, padded)
        return torch.nn.functional.pad(x, (0, 0, 0, padded - T)), docs

    # ------------------------------------------------------------------------- inference

    def new_cache(
        self,
        batch_size: int,
        max_len: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> NSACache:
        """An empty :class:`~nsa_flex.NSACache` for this layer: ``batch_size`` rows of up to
        ``max_len`` tokens, on the parameters' device and dtype unless given (give ``dtype``
        when running under autocast)."""
        weight = self.to_q.weight
        return NSACache(
            batch_size, self.kv_heads, max_len, self.dim_head, self.dim_head_v, config=self.config,
            device=weight.device if device is None else device, dtype=weight.dtype if dtype is None else dtype,
        )

    def _check_cached_input(self, x, cache) -> None:
        check_cache(cache)
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (B, T, dim={self.dim}), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be floating point, got {x.dtype}")
        if x.device != self.to_q.weight.device:
            raise ValueError(f"x is on {x.device} but the module's parameters are on {self.to_q.weight.device}")
        if x.dtype != cache.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x has dtype {x.dtype} but the cache holds {cache.dtype}")
        if (cache.kv_heads, cache.dim_head, cache.dim_head_v, cache.config) != (
            self.kv_heads, self.dim_head, self.dim_head_v, self.config
        ):
            raise ValueError("cache was not made for this layer (heads, head dims or config differ); use layer.new_cache")

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``x (B, T, dim)`` -> ``q (B, heads, T, dim_head)``, ``k (B, kv_heads, T, dim_head)``,
        ``v (B, kv_heads, T, dim_head_v)``, ``gates (B, heads, T, 3)`` in (0, 1), before RoPE."""
        q = _split_heads(self.to_q(x), self.heads)
        k = _split_heads(self.to_k(x), self.kv_heads)
        v = _split_heads(self.to_v(x), self.kv_heads)
        gates = _split_heads(self.to_gates(x), self.heads).sigmoid()
        return q, k, v, gates

    def prefill(self, x: Tensor, cache: NSACache, *, lengths: Tensor | None = None,
                chunk_size: int | None = None) -> Tensor:
        """Run the layer over a prompt and fill ``cache`` with it (from position 0).

        Args:
            x: ``(B, T, dim)``, right-padded when rows differ in length; ``T`` may be 0.
            cache: from :meth:`new_cache`; its ``max_len >= T``.
            lengths: ``(B,)`` integer tensor, tokens per row (default ``T``). Row ``b``'s
                outputs at positions ``< lengths[b]`` are ``forward`` of the row alone; the
                padded ones are ``to_out`` of 0. The padding of ``x`` may hold anything (NaN
                included): it never reaches a real output.
            chunk_size: attend the prompt in chunks of this many tokens (``prefill``'s
                ``chunk_size``: the attention's memory follows the chunk); ``None``, at once.

        Returns:
            ``(B, T, dim)``.
        """
        self._check_cached_input(x, cache)
        q, k, v, gates = self._project(x)
        if self.rotary is not None and x.shape[1]:
            q, k = self.rotary(q), self.rotary(k)
        out = prefill(
            cache, q, k, v, gates, lengths=lengths, compress_k=self.compress_k, compress_v=self.compress_v,
            backend=self.backend, chunk_size=chunk_size,
        )
        return self.to_out(_merge_heads(out))

    def decode(self, x: Tensor, cache: NSACache, *, fused: bool | None = None) -> Tensor:
        """Append ``m`` tokens per row to ``cache`` and return their outputs.

        Args:
            x: ``(B, m, dim)``: the next token of each row (``m = 1``), or a few (speculative
                decoding). RoPE rotates them at each row's absolute positions
                ``cache.lengths[b] ..``.
            cache: filled by :meth:`prefill` (or empty), updated in place.
            fused: as for ``decode_step``: ``True`` the Triton kernels (``m = 1``), ``False``
                PyTorch operations, ``None`` (default) the kernels for ``m = 1`` on CUDA.

        Returns:
            ``(B, m, dim)``, equal to ``forward`` over the row's whole sequence at those
            positions. No host-device sync: the call can be captured in a CUDA graph.
        """
        self._check_cached_input(x, cache)
        q, k, v, gates = self._project(x)
        if self.rotary is not None:
            positions = cache.lengths[:, None] + torch.arange(x.shape[1], device=x.device)
            q, k = self.rotary.rotate_at(q, positions), self.rotary.rotate_at(k, positions)
        out = decode_step(cache, q, k, v, gates, compress_k=self.compress_k, compress_v=self.compress_v, fused=fused)
        return self.to_out(_merge_heads(out))
