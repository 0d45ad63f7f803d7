"""Fisher merging's equation (ops/fisher.py, docs/methods/fisher.md §1) by hand."""

from __future__ import annotations

import torch

from mergekit_like.ops.fisher import fisher_average, norm_coefficients


def test_equal_fisher_is_the_mean():
    thetas = [torch.tensor([1.0, -2.0, 4.0]), torch.tensor([3.0, 2.0, 0.0])]
    f = torch.tensor([0.5, 2.0, 7.0])
    got = fisher_average(thetas, [f, f], [0.5, 0.5], 1e-6)
    torch.testing.assert_close(got, torch.tensor([2.0, 0.0, 2.0]))


def test_weighted_by_fisher_by_hand():
    thetas = [torch.tensor([1.0, 1.0]), torch.tensor([4.0, -2.0])]
    fishers = [torch.tensor([3.0, 0.0]), torch.tensor([1.0, 0.0])]
    got = fisher_average(thetas, fishers, [1.0, 1.0], 0.0 + 1e-6)
    # entry 0: (3·1 + 1·4) / 4 = 1.75; entry 1: no information → the plain mean −0.5
    torch.testing.assert_close(got, torch.tensor([1.75, -0.5]))


def test_normalized_coefficients_are_inverse_norms():
    c = norm_coefficients([1.0, 1.0], [2.0, 6.0], 0.0)
    assert c == [0.75, 0.25]
    thetas = [torch.tensor([0.0]), torch.tensor([8.0])]
    fishers = [torch.tensor([2.0]), torch.tensor([6.0])]     # ‖F‖ = F here
    got = fisher_average(thetas, fishers, c, 0.0)
    assert got.item() == 4.0      # normalising by ‖F_i‖ gives equal pull: 0.75·2 = 0.25·6
