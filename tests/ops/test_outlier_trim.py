"""ops/breadcrumbs.py: the Model Breadcrumbs outlier trim (docs/methods/breadcrumbs.md §1–§2),
against hand-worked values and an independent numpy ranking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergekit_like.kernels.breadcrumbs import outlier_keep, top_mask
from mergekit_like.ops.breadcrumbs import outlier_counts, outlier_keep_sorted, outlier_trim
from mergekit_like.ops.trim import magnitude_trim

DELTA = [0.1, -0.9, 0.3, 0.5, -0.2, 0.8, -0.05, 0.4, 0.7, -0.6]


def ref_keep(delta: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """The breadcrumbs band from the equations: order by (−|δ|, flat index), drop the first t,
    keep the next k."""
    flat = np.abs(delta.reshape(-1).astype(np.float64))
    n = flat.size
    k, t = int(density * n), int(gamma * n)
    if n - k - t < 0:
        t = n - k
    order = sorted(range(n), key=lambda j: (-flat[j], j))
    keep = np.zeros(n, dtype=bool)
    keep[order[t:t + k]] = True
    return keep


@pytest.mark.parametrize("density, gamma, expected", [
    # k = 5, t = 1: 0.9 is the outlier; 0.8 0.7 0.6 0.5 0.4 kept
    (0.5, 0.1, [0, 0, 0, 0.5, 0, 0.8, 0, 0.4, 0.7, -0.6]),
    # k = 3, t = 2: 0.9 and 0.8 dropped; 0.7 0.6 0.5 kept
    (0.3, 0.2, [0, 0, 0, 0.5, 0, 0, 0, 0, 0.7, -0.6]),
    # k = 9, t = 5 → lower = −4: only one outlier (0.9) can go
    (0.9, 0.5, [0.1, 0, 0.3, 0.5, -0.2, 0.8, -0.05, 0.4, 0.7, -0.6]),
    # γ = 0: the top k (the magnitude trim of TIES)
    (0.2, 0.0, [0, -0.9, 0, 0, 0, 0.8, 0, 0, 0, 0]),
    # d = 1: δ unchanged, outliers included
    (1.0, 0.3, DELTA),
])
def test_outlier_trim_golden(density, gamma, expected):
    out = outlier_trim(torch.tensor(DELTA), density, gamma)
    assert torch.equal(out, torch.tensor(expected, dtype=torch.float32))


def test_counts():
    assert outlier_counts(0.5, 0.1, 10) == (1, 5)
    assert outlier_counts(0.9, 0.5, 10) == (1, 9)
    assert outlier_counts(0.5, 0.01, 64) == (0, 32)   # int(0.64) = 0 outliers
    assert outlier_counts(0.0, 0.1, 10) == (1, 0)


def test_ties_broken_by_lowest_flat_index():
    # four equal magnitudes, k = 2, t = 1: index 0 is the outlier, indices 1 and 2 are kept
    keep = outlier_keep(torch.tensor([1.0, -1.0, 1.0, -1.0]), 0.5, 0.25)
    assert keep.tolist() == [False, True, True, False]


def test_dropped_entries_keep_the_sign_of_zero():
    out = outlier_trim(torch.tensor([-0.5, 0.25, -1.0, 2.0]), 0.25, 0.25)
    assert out.tolist() == [0.0, 0.0, -1.0, 0.0]
    assert torch.signbit(out).tolist() == [True, False, True, False]     # δ·0 (as mergekit)


@pytest.mark.parametrize("shape, density, gamma", [((7, 13), 0.6, 0.05), ((200,), 0.9, 0.01),
                                                   ((5, 4, 3), 0.35, 0.3), ((9, 9), 0.1, 0.95)])
def test_matches_independent_ranking(shape, density, gamma):
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(shape, generator=g)
    delta[0].zero_()                                     # ties at zero
    delta.view(-1)[5:9] = 0.25                           # ties elsewhere
    keep = outlier_keep(delta, density, gamma)
    assert np.array_equal(keep.numpy(), ref_keep(delta.numpy(), density, gamma))
    assert int(keep.sum()) == int(density * delta.numel())


def test_gamma_zero_is_the_ties_trim():
    g = torch.Generator().manual_seed(4)
    delta = torch.randn(31, 17, generator=g)
    for d in (0.1, 0.5, 0.9):
        assert torch.equal(outlier_trim(delta, d, 0.0), magnitude_trim(delta, d))


def test_kept_count_over_a_grid():
    """mergekit's own property (tests/test_sparsify.py): int(n·d) entries survive, whatever γ."""
    delta = torch.randn(64, 48, generator=torch.Generator().manual_seed(8))
    for gamma_0 in (0.0, 0.1, 0.2, 0.5, 1.0):
        for density in (0.1, 0.3, 0.5, 0.6, 0.9):
            out = outlier_trim(delta, density, gamma_0 * (1 - density))
            assert int(torch.count_nonzero(out)) == int(delta.numel() * density)


# ---- the selection path (outlier_keep) against the sort (outlier_keep_sorted) --------------

def heavy_ties(n: int, seed: int, levels: int) -> torch.Tensor:
    """Task-vector-like data on a coarse grid: few distinct magnitudes, both signs, signed
    zeros, so both thresholds land inside long runs of equal |δ|."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randint(-levels, levels + 1, (n,), generator=g).float() * 0.125
    d[torch.rand(n, generator=g) < 0.1] = -0.0
    return d


BANDS = [(0.9, 0.01), (0.5, 0.1), (0.3, 0.0), (0.9, 0.5), (0.0, 0.1), (0.99, 0.01),
         (0.2, 0.79), (0.5, 0.5)]


@pytest.mark.parametrize("density, gamma", BANDS)
@pytest.mark.parametrize("n, levels, workers", [(1000, 3, 1), (40_000, 1, 1),
                                                 (700_001, 4, 2), (600_000, 200, 3)])
def test_selection_equals_sort_on_heavy_ties(n, levels, workers, density, gamma):
    delta = heavy_ties(n, n + levels, levels)
    fast = outlier_keep(delta, density, gamma, workers=workers)
    assert torch.equal(fast, outlier_keep_sorted(delta, density, gamma))


@pytest.mark.parametrize("fill", [0.0, -0.5])
def test_selection_equals_sort_on_a_constant_tensor(fill):
    delta = torch.full((3, 300_000), fill)
    for density, gamma in BANDS:
        assert torch.equal(outlier_keep(delta, density, gamma, workers=2),
                           outlier_keep_sorted(delta, density, gamma))


def test_selection_equals_sort_on_continuous_data():
    delta = torch.randn(513, 1025, generator=torch.Generator().manual_seed(11))
    delta[7].zero_()
    for density, gamma in BANDS:
        assert torch.equal(outlier_keep(delta, density, gamma, workers=2),
                           outlier_keep_sorted(delta, density, gamma))


def test_top_mask_is_the_first_m_of_a_stable_sort():
    a = heavy_ties(300_000, 5, 2).abs()
    order = torch.sort(a, descending=True, stable=True).indices
    for m in (0, 1, 1000, 150_000, 299_999, 300_000):
        want = torch.zeros(a.numel(), dtype=torch.bool)
        want[order[:m]] = True
        assert torch.equal(top_mask(a, m, a[::7].clone(), workers=2), want)


def test_non_finite_takes_the_sort():
    delta = torch.tensor([1.0, float("nan"), -2.0, float("inf"), 0.5, 0.25, -3.0, 0.0])
    assert torch.equal(outlier_keep(delta, 0.5, 0.2), outlier_keep_sorted(delta, 0.5, 0.2))
