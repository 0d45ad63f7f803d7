"""kernels.breadcrumbs.band_tops / band_piece_ give δ ⊙ keep with the bits of the sort's band
(ops.breadcrumbs.outlier_keep_sorted): bf16 deltas with many ties at both thresholds, exact
zeros (so a threshold can be 0), ±0.0, γ = 0, a band pushed to the bottom (lower < 0), tiny
and large densities, pieces and spans cutting the tensor, fused scan and torch scan."""

from __future__ import annotations

import pytest
import torch

from mergekit_like.kernels.breadcrumbs import band_piece_, band_tops
from mergekit_like.kernels.tiling import Scratch, pieces
from mergekit_like.methods.base import TensorTask
from mergekit_like.ops.breadcrumbs import outlier_keep_sorted

BF16, F32 = torch.bfloat16, torch.float32


def family(shape, seed, zeros=0.3, dtype=BF16):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    base.view(-1)[::97] = -0.0
    x = (base.float() + torch.randn(shape, generator=g) * 0.01).to(dtype)
    same = torch.rand(shape, generator=g) < zeros
    x[same] = base[same]
    return base, x


def check(base, x, density, gamma, workers=1, block_elems=1 << 22):
    task = TensorTask("w", tuple(base.shape), BF16, F32, None, base, [x], [0], [{}], {},
                      block_elems=block_elems, workers=workers, inputs_finite=True)
    tops = band_tops(task, x, density, gamma, Scratch(F32, task.device))
    got = torch.empty(task.numel)
    scratch = Scratch(F32, task.device)
    for off, (b, xp) in pieces(task, [base, x], piece=1000):
        d = (xp - b).clone()
        got[off:off + d.numel()] = band_piece_(d, off, tops, scratch)
    delta = (x.float() - base.float()).reshape(-1)
    want = delta * outlier_keep_sorted(delta, density, gamma)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("fused", ["1", "0"])
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("density,gamma", [(0.9, 0.01), (0.8, 0.02), (0.5, 0.0), (0.9, 0.3),
                                           (0.001, 0.001), (0.6, 0.39), (0.99, 0.0)])
@pytest.mark.parametrize("zeros", [0.0, 0.3, 0.8])
def test_band_bit_equal(density, gamma, zeros, workers, fused, monkeypatch):
    monkeypatch.setenv("MERGEKIT_LIKE_FUSED", fused)
    base, x = family((300, 233), seed=int(density * 100) + int(zeros * 10), zeros=zeros)
    check(base, x, density, gamma, workers=workers, block_elems=5000)


@pytest.mark.parametrize("shape", [(5000,), (7, 3, 11), (1, 1)])
def test_band_shapes(shape):
    base, x = family(shape, seed=3)
    check(base, x, 0.7, 0.05)


def test_all_equal_magnitudes():
    """Every |δ| equal: both thresholds are the same value, the band is an index range."""
    base = torch.zeros(50, 40, dtype=BF16)
    x = torch.full((50, 40), 0.25, dtype=BF16)
    x.view(-1)[::3] = -0.25
    check(base, x, 0.5, 0.1, workers=2)
