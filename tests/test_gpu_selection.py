"""On a CUDA device: the selection kernels' pieces that Triton's CPU interpreter cannot show.

The interpreter multiplies float32 exactly whatever ``input_precision`` says, so only a GPU
tells ``_split_dot`` (three TF32 products) from a single TF32 product; and only on CUDA does
``attend`` hand the compressed branch's log-sum-exp (FlexAttention's compiled kernel) to the
scoring kernel.
"""

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from nsa_flex import NSAConfig, attend, mean_compress, reference as R
from nsa_flex.kernels.primitives import _split_dot

from strategies import Shape

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("gpu_numerics")]


@triton.jit
def _dot_kernel(P, W, O, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, SPLIT: tl.constexpr):
    m, kk, n = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    p = tl.load(P + m[:, None] * K + kk[None, :])
    w = tl.load(W + kk[:, None] * N + n[None, :])
    if SPLIT:
        o = _split_dot(p, w)
    else:
        o = tl.dot(p, w, input_precision="tf32")
    tl.store(O + m[:, None] * N + n[None, :], o)


def test_split_dot_keeps_float32_precision():
    # probabilities against whole-number overlap weights, as the scoring kernel multiplies them
    gen = torch.Generator(device="cuda").manual_seed(0)
    p = torch.rand(64, 64, device="cuda", generator=gen) ** 4  # spread over several binades
    w = torch.randint(0, 3, (64, 16), device="cuda", generator=gen).float()
    ref = p.double() @ w.double()
    errs = {}
    for split in (True, False):
        out = torch.empty(64, 16, device="cuda")
        _dot_kernel[(1,)](p, w, out, 64, 64, 16, split)
        errs[split] = float(((out.double() - ref).abs() / ref.abs().clamp_min(1e-30)).max())
    assert errs[True] < 1e-5, errs  # float32 rounding of a 64-term sum (at most ~4e-6)
    assert errs[False] > 2e-5, errs  # one TF32 product rounds p to 11 bits: the test can tell


@pytest.mark.parametrize("G", [1, 16])
def test_attend_selects_from_the_compressed_branch_lse(G):
    # bf16 on CUDA: attend runs the compressed branch first and the scoring kernel reads its
    # log-sum-exp; the blocks it picks score as well, under float64 scores of the same inputs,
    # as the reference's picks
    config = NSAConfig()
    shape = Shape(2, 2, G, 4096, 128, 128)
    gen = torch.Generator(device="cuda").manual_seed(4)
    q, k, v = (torch.randn(shape.B, h, shape.T, 128, generator=gen, device="cuda").to(torch.bfloat16)
               for h in (shape.Hq, shape.Hkv, shape.Hkv))
    with torch.no_grad():
        _, aux = attend(q, k, v, config=config, return_aux=True)
    k_cmp = mean_compress(k, config)
    ref_idx, scores = R.select_blocks(q.double(), k_cmp.double(), config, 128**-0.5)
    idx = aux.block_indices
    assert torch.equal((idx >= 0).sum(-1), (ref_idx >= 0).sum(-1))

    def chosen(i):
        return torch.where(i >= 0, scores.gather(-1, i.clamp_min(0).long()), -1.0).sort(-1).values

    torch.testing.assert_close(chosen(idx), chosen(ref_idx), rtol=1e-4, atol=1e-7)
