"""nsa_flex.scoring's pieces on their own (selection's end-to-end tests are test_selection.py)."""

import torch

from nsa_flex.scoring import masked_softmax


def test_masked_softmax_zeroes_only_rows_that_allow_nothing():
    s = torch.tensor([[1.0, 2.0, 3.0], [1.0, float("nan"), 0.0], [5.0, 6.0, 7.0]])
    allowed = torch.tensor([[True, True, False], [True, True, True], [False, False, False]])
    p = masked_softmax(s, allowed)
    assert torch.equal(p[0], torch.softmax(torch.tensor([1.0, 2.0, float("-inf")]), 0))
    assert p[1].isnan().all()  # a NaN the row sees stays
    assert torch.equal(p[2], torch.zeros(3))  # nothing allowed: 0, not softmax's NaN
    # in place: the same values, written over the scores (selection's chunks)
    s2 = s.clone()
    q = masked_softmax(s2, allowed, inplace=True)
    assert torch.equal(q.nan_to_num(-1.0), p.nan_to_num(-1.0))
