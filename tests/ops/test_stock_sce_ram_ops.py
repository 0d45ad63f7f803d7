"""The pure functions of ops/model_stock.py, ops/sce.py and ops/ram.py, on hand-made tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mergekit_like.ops.model_stock import as_rows, pair_cosine, stock_ratio
from mergekit_like.ops.ram import active, model_counts, unique_scales
from mergekit_like.ops.sce import erase_agree, sce_weights, topk_count, variance_keep

F32 = torch.float32


@pytest.mark.parametrize("shape, filter_wise, rows", [
    ((4, 3), False, (1, 12)), ((4, 3), True, (4, 3)), ((2, 3, 5), True, (6, 5)),
    ((7,), True, (1, 7)), ((), True, (1, 1)), ((), False, (1, 1)),
])
def test_as_rows(shape, filter_wise, rows):
    assert tuple(as_rows(torch.zeros(shape), filter_wise).shape) == rows


def test_pair_cosine_and_ratio():
    a = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[4.0, 3.0], [1.0, 1.0], [-2.0, 0.0]])
    cos = pair_cosine(a, b)
    torch.testing.assert_close(cos, torch.tensor([24 / 25, 0.0, -1.0]), rtol=0, atol=1e-7)
    t = stock_ratio(torch.tensor([0.5, 1.0, 0.0, -0.5]), 3)    # 3c / (1 + 2c)
    torch.testing.assert_close(t, torch.tensor([0.75, 1.0, 0.0, -math.inf]))


@pytest.mark.parametrize("n, d", [(90, 0.7), (180, 0.35), (10, 0.3), (4, 0.5), (3, 0.2)])
def test_topk_count_is_a_float32_product(n, d):
    """int(90·0.7) is 62 in Python floats but 63 as mergekit computes it (float32)."""
    assert topk_count(n, d) == int(np.float32(n) * np.float32(d))


def test_variance_keep_ties_take_the_lowest_index():
    tvs = torch.tensor([[1.0, 0.0, 1.0, 2.0, 0.0, 1.0], [-1.0, 0.0, -1.0, -2.0, 0.0, -1.0]])
    # variances (1, 0, 1, 4, 0, 1): 4 non-zero, τ = 0.75 → k = 3: entry 3, then 0 and 2
    keep = variance_keep(tvs, 0.75)
    assert keep.tolist() == [True, False, True, True, False, False]
    assert not variance_keep(tvs, 0.0).any() and variance_keep(tvs, 1.0).all()


def test_sce_weights_and_erase():
    tvs = torch.tensor([[1.0, -2.0], [0.0, 1e-4]])
    torch.testing.assert_close(sce_weights(tvs), torch.tensor([1.0, 5e-9 / 2.5]), rtol=1e-5, atol=0)
    tiny = torch.tensor([[1e-4, 0.0], [0.0, 1e-4]])
    assert sce_weights(tiny).tolist() == [0.5, 0.5]             # Σ s < 1e-6: uniform
    assert sce_weights(torch.tensor([3.0, 0.5])).tolist() == [1.0, 1.0]   # stacked 0-d
    agree = erase_agree(torch.tensor([[1.0, -2.0, 0.0], [-0.5, 1.0, 0.0]]))
    assert agree.tolist() == [[True, True, False], [False, False, False]]


def test_ram_counts_and_scales():
    tvs = torch.tensor([[0.5, 0.2, 0.0, 1.0], [0.5, 0.0, 0.0, 0.0], [-0.5, 0.0, 0.3, 0.0]])
    changed, counts = active(tvs, 0.1)
    assert counts.tolist() == [[3, 1, 1, 1]]
    shared, unique = model_counts(changed, counts)
    assert shared.tolist() == [1, 1, 1] and unique.tolist() == [2, 0, 1]
    scales = unique_scales(shared, unique, 0.5, 0.8, 0.1)
    assert scales.dtype == F32
    assert scales.tolist() == [float(torch.tensor(1 + 0.5 * 0.5, dtype=F32)), 1.0,
                               float(torch.tensor(1 + 0.5 * 0.8, dtype=F32))]
