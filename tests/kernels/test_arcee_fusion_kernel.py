"""kernels/arcee_fusion.py's threshold equals ops.arcee_fusion.fusion_threshold bit for bit
(with ±0.0 quartiles, in value: which zero the selection returns cannot change imp ≥ τ):
random importances, heavy ties, zeros, every small n (the quartile positions), NaN."""

from __future__ import annotations

import pytest
import torch

from mergekit_like.kernels.arcee_fusion import fusion_threshold, order_statistics
from mergekit_like.ops.arcee_fusion import fusion_importance, fusion_threshold as reference


def bits(t: torch.Tensor) -> int:
    return int(t.reshape(1).view(torch.int32)[0])


@pytest.mark.parametrize("n", list(range(1, 12)) + [1000, 100_003])
def test_random_and_small_sizes(n):
    g = torch.Generator().manual_seed(n)
    imp = torch.rand(n, generator=g) * 3
    assert bits(fusion_threshold(imp)) == bits(reference(imp))


@pytest.mark.parametrize("seed", range(5))
def test_ties_and_zeros(seed):
    g = torch.Generator().manual_seed(seed)
    imp = torch.randint(0, 4, (97, 31), generator=g).float() * 0.25
    imp.view(-1)[::5] = -0.0
    assert fusion_threshold(imp) == reference(imp)      # a zero τ's sign cannot change imp ≥ τ
    zeros = torch.zeros(50)
    zeros[::2] = -0.0
    assert torch.equal(fusion_threshold(zeros), reference(zeros))


def test_real_importance_and_nan():
    g = torch.Generator().manual_seed(9)
    a = torch.randn(64, 48, generator=g)
    b = a + 0.01 * torch.randn(64, 48, generator=g)
    imp = fusion_importance(a, b)
    assert bits(fusion_threshold(imp)) == bits(reference(imp))
    imp[3, 4] = float("nan")
    assert torch.equal(fusion_threshold(imp).isnan(), reference(imp).isnan())


@pytest.mark.parametrize("seed", range(4))
def test_order_statistics_exact(seed):
    """Large enough for the sampled brackets (and a heavy atom of zeros, ties, negatives)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(300_000, generator=g).abs_() * torch.rand(300_000, generator=g)
    a[: 100_000 * seed] = 0.0
    a[::7] = torch.randint(0, 3, (a[::7].numel(),), generator=g).float()
    a[::11] *= -1e-9
    positions = [5, 74_999, 150_000, 224_999, 299_990]
    got = order_statistics(a.numpy(), positions)
    want = [float(torch.kthvalue(a, i + 1).values) for i in positions]
    assert got == want
    assert bits(fusion_threshold(a)) == bits(reference(a)) or \
        fusion_threshold(a) == reference(a) == 0


def test_order_statistics_missed_bracket():
    """A sample that misses the bracket (a sorted tensor: the sample runs are local)."""
    a = torch.arange(1_000_000, dtype=torch.float32)
    a[:500_000] = 1.0
    assert order_statistics(a.numpy(), [0, 499_999, 500_000, 999_999]) == \
        [1.0, 1.0, 500_000.0, 999_999.0]
