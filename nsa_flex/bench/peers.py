"""flash_nsa as a contender: its import, its window branch's stand-in, and its timed call.

flash_nsa is the Python package of mdy666/Scalable-Flash-Native-Sparse-Attention. The bench
times it only when ``import flash_nsa`` works (a folder holding ``flash_nsa/`` on
``PYTHONPATH``); nothing of it is part of nsa_flex. Its layer, ``HFNSACore``, takes packed
rows only: ``q (T, Hq, D)``, ``k, v (T, Hkv, D)``, gate logits ``(T, Hq, 3)`` (it applies the
sigmoid itself) and int32 ``cu_seqlens``. Its window branch calls flash-attn; while the bench
runs it, that call (``flash_nsa.modules.hf_level_nsa.swa_varlen_func``) is a compiled
FlexAttention sliding window of ours over the same documents, and its rows say so.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import itertools
import sys
import types
from typing import Callable

import torch

from .. import masks, varlen
from .timing import Problem, Row, _full_flex, _measure, failure

NAME = "flash_nsa"
# what its rows run in place of its own code (shown next to their numbers)
STAND_INS = "window: compiled FlexAttention stand-in for flash-attn"
_WINDOW_AT = "flash_nsa.modules.hf_level_nsa"  # the module whose swa_varlen_func HFNSACore calls


def _pkg_resources_shim() -> types.ModuleType:
    """The one function of ``pkg_resources`` flash_nsa uses (newer setuptools has none)."""
    from packaging.version import parse

    shim = types.ModuleType("pkg_resources")
    shim.parse_version = parse
    return shim


def import_flash_nsa() -> tuple[types.ModuleType | None, str]:
    """``(flash_nsa, "")`` when it imports, else ``(None, why not)``.

    If it fails only for want of ``pkg_resources``, the import is retried once with a shim of
    it in ``sys.modules``, which is taken out again afterwards (flash_nsa keeps its reference).
    """
    try:
        return importlib.import_module(NAME), ""
    except ModuleNotFoundError as e:
        if e.name != "pkg_resources":
            return None, f"import {NAME}: {e}"
    except Exception as e:  # installed, but broken here
        return None, f"import {NAME}: {failure(e, 100)}"
    for name in [m for m in sys.modules if m == NAME or m.startswith(NAME + ".")]:
        del sys.modules[name]  # what the failed import left half-made
    try:
        sys.modules["pkg_resources"] = _pkg_resources_shim()
        return importlib.import_module(NAME), ""
    except Exception as e:
        return None, f"import {NAME} (with a pkg_resources shim): {failure(e, 100)}"
    finally:
        sys.modules.pop("pkg_resources", None)


def window_stand_in(lengths: list[int], window: int, device: torch.device) -> Callable:
    """A sliding window over packed documents in flash_nsa's layout, for its ``swa_varlen_func``.

    The returned ``swa(q, k, v, sm_scale=None)`` takes ``q (T, Hq, D)``, ``k, v (T, Hkv, D)``
    with ``T = sum(lengths)`` and returns ``(T, Hq, D)``: each query attends the ``window`` keys
    ending at itself (itself included, nsa_flex's window) within its own document, through
    FlexAttention (compiled on CUDA) with a BlockMask built here, once.
    """
    T = sum(lengths)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    docs = varlen.documents(cu, device=device)
    from torch.nn.attention.flex_attention import and_masks, create_block_mask

    mask_mod = and_masks(masks.sliding_window_mask(window), masks.document_mask(docs.doc_id))
    block_mask = create_block_mask(mask_mod, None, None, T, T, device=device)
    flex = _full_flex(device)

    def swa(q, k, v, sm_scale=None):
        if q.shape[0] != T:
            raise ValueError(f"the window stand-in was built for {T} tokens, got q of {q.shape[0]}")
        heads = lambda x: x.transpose(0, 1).unsqueeze(0)  # (T, H, D) -> (1, H, T, D), a view
        o = flex(heads(q), heads(k), heads(v), block_mask=block_mask, scale=sm_scale, enable_gqa=True)
        return o.squeeze(0).transpose(0, 1)

    return swa


@contextlib.contextmanager
def window_patched(module: types.ModuleType, swa: Callable):
    """``module.swa_varlen_func`` (flash_nsa's window branch, which its layer looks up there on
    each call) is ``swa`` inside the block, its own again after."""
    own = module.swa_varlen_func
    module.swa_varlen_func = swa
    try:
        yield
    finally:
        module.swa_varlen_func = own


def flash_nsa_row(part: str, p: Problem, T: int, q, k, v, gates, lengths: list[int], reps: int,
                  ref=None, note: str = "") -> Row:
    """flash_nsa's layer on nsa_flex's inputs, timed like the other contenders; a skipped row
    when it does not import or there is no CUDA.

    ``q (B, Hq, L, D)``, ``k, v (B, Hkv, L, D)``, ``gates (B, Hq, L, 3)`` (weights in [0, 1]):
    the rows are laid end to end as ``B * L`` packed tokens, documents of ``lengths`` (summing to
    ``B * L``; ``[L] * B`` for unpacked rows). ``ref``: the flex backend's output on the same
    inputs, ``(B, Hq, L, D)``.
    """
    module, why = import_flash_nsa()
    if module is None:
        return Row(part, NAME, T, note=f"skipped: {why}", stand_ins=STAND_INS)
    if p.device.type != "cuda":
        return Row(part, NAME, T, note="skipped: needs CUDA", stand_ins=STAND_INS)
    return measure_flash_nsa(module, part, p, T, q, k, v, gates, lengths, reps, ref, note)


def measure_flash_nsa(module, part: str, p: Problem, T: int, q, k, v, gates, lengths: list[int], reps: int,
                      ref=None, note: str = "") -> Row:
    """:func:`flash_nsa_row`'s measurement, given the imported ``module``."""
    B, Hq, L, D = q.shape
    if sum(lengths) != B * L:
        raise ValueError(f"lengths must sum to B * L = {B * L}, got {sum(lengths)}")
    grad = p.device.type == "cuda"  # backward is timed on CUDA only

    def packed(x):  # (B, H, L, E) -> (B * L, H, E), its own leaf
        return x.detach().transpose(1, 2).reshape(B * L, x.shape[1], x.shape[-1]).contiguous()

    qt, kt, vt = (packed(x).requires_grad_(grad) for x in (q, k, v))
    # the same gates: flash_nsa takes logits and applies the sigmoid itself
    logits = torch.logit(packed(gates).float(), eps=1e-6).to(p.dtype).requires_grad_(grad)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=p.device)
    c = p.config

    def failed(e: Exception) -> Row:
        return Row(part, NAME, T, note=f"failed: {failure(e)}", stand_ins=STAND_INS)

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its advice for G < 16, printed in its config
            config = module.NSAConfig(
                head_dim=D, num_heads=Hq, num_kv_heads=k.shape[1],
                kernel_size=c.compress_block, stride=c.compress_stride, block_size=c.select_block,
                top_n=c.num_selected, num_init_blocks=c.num_initial, num_local_blocks=c.num_local,
                window_size=c.window,
            )
            core = module.HFNSACore(config).to(p.device, p.dtype)
        swa = window_stand_in(lengths, c.window, p.device)
        window_at = importlib.import_module(_WINDOW_AT)
    except Exception as e:  # a shape or config it refuses, or another version of it
        return failed(e)
    check = None if ref is None else (ref, lambda o: o.reshape(B, L, Hq, -1).transpose(1, 2))
    try:
        with window_patched(window_at, swa):
            return _measure(part, NAME, T, lambda: core(qt, kt, vt, logits, cu), (qt, kt, vt, logits), p.device,
                            reps, note=note, check=check, stand_ins=STAND_INS)
    except Exception as e:  # what _measure lets through (a Triton compile error, say)
        return failed(e)
