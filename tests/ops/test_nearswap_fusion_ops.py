"""ops/passthrough.py, ops/nearswap.py, ops/arcee_fusion.py: golden values on hand-made tensors,
the expected numbers written out or computed here with numpy float64 from the equations of
docs/methods/{passthrough,nearswap,arcee_fusion}.md §1 (not with our ops)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mergekit_like.ops.arcee_fusion import (arcee_fusion, fusion_importance, fusion_threshold,
                                            quantile_indices)
from mergekit_like.ops.nearswap import nearswap, nearswap_weight
from mergekit_like.ops.passthrough import passthrough

F32 = torch.float32


def t32(v) -> torch.Tensor:
    return torch.tensor(v, dtype=F32)


# ---- passthrough ---------------------------------------------------------------------------

def test_passthrough_copies_or_scales():
    x = t32([[1.0, -2.0], [0.5, 3.0]])
    same = passthrough(x)
    assert torch.equal(same, x) and same.data_ptr() != x.data_ptr()
    assert torch.equal(passthrough(x, 0.5), t32([[0.5, -1.0], [0.25, 1.5]]))
    assert torch.equal(passthrough(x, -2.0), t32([[-2.0, 4.0], [-1.0, -6.0]]))
    assert torch.equal(passthrough(x, 1.0), x)


# ---- nearswap ------------------------------------------------------------------------------

NS_A = [0.0, 1.0, 2.0, 3.0, 4.0]
NS_B = [0.5, 1.0, 2.25, 1.0, 8.0]


def test_nearswap_golden_by_hand():
    """t = 0.25: |a−b| = 0.5, 0 (floored to 1e-6), 0.25, 2, 4 → w = 0.5, 1, 1, 0.125, 0.0625."""
    a, b = t32(NS_A), t32(NS_B)
    assert torch.equal(nearswap_weight(a, b, 0.25), t32([0.5, 1.0, 1.0, 0.125, 0.0625]))
    assert torch.equal(nearswap(a, b, 0.25), t32([0.25, 1.0, 2.25, 2.75, 4.25]))


def ref_nearswap(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    w = np.clip(t / np.maximum(np.abs(a - b), 1e-6), 0.0, 1.0)
    return w * b + (1.0 - w) * a


def test_nearswap_matches_numpy_float64():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(7, 9, generator=gen)
    b = a + 0.01 * torch.randn(7, 9, generator=gen)
    for t in (0.0003, 0.004, 0.02):
        want = ref_nearswap(a.double().numpy(), b.double().numpy(), t)
        np.testing.assert_allclose(nearswap(a, b, t).numpy(), want, rtol=1e-6, atol=1e-7)


def test_nearswap_identities():
    a, b = t32(NS_A), t32(NS_B)
    assert torch.equal(nearswap(a, b, 0.0), a)            # t = 0: the base
    assert torch.equal(nearswap(a, b, -1.0), a)           # w clamped at 0
    assert torch.equal(nearswap(a, b, 1e9), b)            # w = 1 everywhere: the other model
    assert torch.equal(nearswap(a, a.clone(), 0.1), a)    # equal models
    w = nearswap_weight(a, a.clone(), 1e-7)               # |a−b| = 0 floored to 1e-6: w = 0.1
    assert torch.allclose(w, torch.full_like(a, 0.1))


# ---- arcee_fusion --------------------------------------------------------------------------

AF_A = [[0.0, 0.5, 1.0], [1.0, 0.0, -1.0], [0.2, 0.2, 0.2], [0.0, 0.0, 0.0], [0.5, -0.5, 0.0]]
AF_B = [[0.1, 0.5, 0.9], [1.0, 2.0, -1.0], [0.2, 0.3, 0.2], [0.0, 0.0, 3.0], [0.5, -0.4, 0.0]]


def ref_importance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    def softmax(x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    p, q = softmax(b) + 1e-8, softmax(a) + 1e-8
    return np.abs(b - a) * (p * np.log(p / q)).sum(axis=-1, keepdims=True)


def ref_threshold(imp: np.ndarray) -> float:
    s = np.sort(imp.ravel())
    m = s.size - 1
    q1, med, q3 = (s[math.floor(q * m)] for q in (0.25, 0.5, 0.75))
    return med + 1.5 * (q3 - q1)


def test_arcee_fusion_golden():
    """5×3: the KL per row is 0.00304, 0.469, 0.00113, 0.732, 0.00079 (numpy); 15 importances,
    quartiles at sorted positions 3, 7, 10 → τ ≈ 1.70e-4; kept: (0,0), (0,2), (1,1), (3,2)."""
    a, b = np.array(AF_A), np.array(AF_B)
    imp_ref = ref_importance(a, b)
    np.testing.assert_allclose(imp_ref.max(axis=-1),
                               [3.0398e-4, 0.93873, 1.1348e-4, 2.19605, 7.8988e-5], rtol=1e-4)
    imp = fusion_importance(t32(AF_A), t32(AF_B))
    np.testing.assert_allclose(imp.numpy(), imp_ref, rtol=5e-4)  # float32 KL of near-equal rows
    tau = fusion_threshold(imp)
    assert tau.shape == () and tau.dtype == F32
    assert math.isclose(float(tau), ref_threshold(imp_ref), rel_tol=1e-4)
    assert math.isclose(ref_threshold(imp_ref), 1.7022537e-4, rel_tol=1e-6)
    keep = np.zeros((5, 3), dtype=bool)
    keep[0, 0] = keep[0, 2] = keep[1, 1] = keep[3, 2] = True
    assert np.array_equal(imp_ref >= ref_threshold(imp_ref), keep)
    out = arcee_fusion(t32(AF_A), t32(AF_B))
    assert torch.equal(out, torch.where(torch.from_numpy(keep), t32(AF_B), t32(AF_A)))


def test_arcee_fusion_1d_uses_the_whole_vector():
    a = t32([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    b = t32([0.0, 0.01, 0.0, 0.0, 2.0, 0.0, 0.02, 0.0])
    imp_ref = ref_importance(a.double().numpy(), b.double().numpy())
    keep = imp_ref >= ref_threshold(imp_ref)
    # sorted importances: five 0, then 0.01·KL, 0.02·KL, 2·KL; positions 1, 3, 5 give
    # Q1 = 0, Q2 = 0, Q3 = 0.01·KL → τ = 0.015·KL: only the 0.02 and the 2 are kept
    assert keep.tolist() == [False, False, False, False, True, False, True, False]
    out = arcee_fusion(a, b)
    assert torch.equal(out, torch.where(torch.from_numpy(keep), b, a))


def test_arcee_fusion_identities():
    a = t32(AF_A)
    assert torch.equal(arcee_fusion(a, a.clone()), a)     # equal models: Δ = 0
    scalar = arcee_fusion(t32(1.0), t32(2.0))             # one element: KL = 0 = τ, kept
    assert scalar.shape == () and float(scalar) == 2.0


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 9, 15, 101, 999_999, 1_000_001, 50_331_649])
def test_quantile_indices_floor(n):
    """⌊q·(n − 1)⌋ as mergekit's (q·(n − 1)).long() (exact for these n)."""
    assert quantile_indices(n) == tuple(math.floor(q * (n - 1)) for q in (0.25, 0.5, 0.75))
