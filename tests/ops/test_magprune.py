"""ops/della.py: DELLA's MAGPRUNE (docs/methods/della.md §1–§3), against hand-worked values and
an independent numpy SplitMix64 + ranking written from the equations."""

from __future__ import annotations

import math

import numpy as np
from support.helpers import ref_splitmix_u
import pytest
import torch

from mergekit_like.ops.della import (epsilon_problem, magprune, magprune_piece_, magprune_probs,
                                     magprune_ranks, rank_rows)
from mergekit_like.ops.drop import mask_key, random_drop

NAME = "model.layers.0.mlp.up_proj.weight"


ref_u = ref_splitmix_u


def ref_ranks(delta: np.ndarray) -> np.ndarray:
    """Ascending rank along dim 1 (whole tensor for 1-D); equal magnitudes: lower index ranks
    higher."""
    a = np.abs(delta.reshape(1, -1) if delta.ndim < 2 else delta).astype(np.float64)
    moved = np.moveaxis(a, 1, -1)
    ranks = np.zeros(moved.shape, dtype=np.int64)
    m = moved.shape[-1]
    for idx in np.ndindex(*moved.shape[:-1]):
        row = moved[idx]
        order = sorted(range(m), key=lambda j: (-row[j], j))
        for q, j in enumerate(order):
            ranks[idx + (j,)] = m - 1 - q
    return np.moveaxis(ranks, -1, 1).reshape(delta.shape)


def ref_magprune(delta: np.ndarray, seed: int, model_index: int, name: str, d: float, eps: float,
                 divide: bool) -> np.ndarray:
    m = delta.shape[1] if delta.ndim >= 2 else delta.size
    r = ref_ranks(delta).reshape(-1).astype(np.float64)
    p = np.full(r.shape, d) if m == 1 else (d - eps) + (r / (m - 1)) * 2 * eps
    keep = ref_u(seed, model_index, name, delta.size) < np.floor(p * 2.0**24).astype(np.uint64)
    flat = delta.reshape(-1).astype(np.float32)
    out = flat * keep.astype(np.float32)
    if divide:
        out = out / p.astype(np.float32)
    return out.reshape(delta.shape)


def test_golden_mask_and_values():
    # u_0..u_7 / 2^24 of this key (dare.md §2): .326 .227 .306 .360 | .864 .378 .995 .350
    delta = torch.tensor([[-0.1, 0.3, 0.2, 0.5], [4.0, 1.0, -3.0, 2.0]])
    # ranks [0 2 1 3 | 3 0 2 1]; p = 0.3 + r/3·0.4 = [.3 .567 .433 .7 | .7 .3 .567 .433]
    assert magprune_ranks(delta).tolist() == [[0, 2, 1, 3], [3, 0, 2, 1]]
    p = magprune_probs(magprune_ranks(delta), 4, 0.5, 0.2)
    assert p.dtype == torch.float64
    assert p[0].tolist() == pytest.approx([0.3, 0.3 + 0.4 * 2 / 3, 0.3 + 0.4 / 3, 0.7])
    key = mask_key(0, 1, NAME)
    out = magprune(delta, key, 0.5, 0.2, divide=False)
    keep = [0, 1, 1, 1, 0, 0, 0, 1]
    assert (out.reshape(-1) != 0).int().tolist() == keep
    scaled = magprune(delta, key, 0.5, 0.2, divide=True)
    expected = delta.reshape(-1) * torch.tensor(keep, dtype=torch.float32) / p.reshape(-1).float()
    assert torch.equal(scaled.reshape(-1), expected)
    assert scaled[1, 3].item() == pytest.approx(2.0 / (0.3 + 0.4 / 3))


@pytest.mark.parametrize("shape", [(13, 37), (300,), (4, 9, 5), (6, 1)])
@pytest.mark.parametrize("divide", [True, False])
def test_matches_independent_reference(shape, divide):
    g = torch.Generator().manual_seed(11)
    delta = torch.randn(shape, generator=g) * 0.01
    delta.view(-1)[3:10] = 0.005                        # ties
    delta.view(-1)[-4:] = 0.0
    key = mask_key(7, 2, NAME)
    out = magprune(delta, key, 0.4, 0.15, divide=divide)
    expected = ref_magprune(delta.numpy(), 7, 2, NAME, 0.4, 0.15, divide)
    assert np.array_equal(out.numpy().view(np.int32), expected.view(np.int32))
    assert np.array_equal(magprune_ranks(delta).numpy(), ref_ranks(delta.numpy()))


def test_pieces_give_the_same_bits():
    g = torch.Generator().manual_seed(5)
    delta = torch.randn(20, 33, generator=g)
    key = mask_key(0, 3, NAME)
    whole = magprune(delta, key, 0.6, 0.3)
    ranks = magprune_ranks(delta).reshape(-1).to(torch.int32)
    flat = delta.reshape(-1).clone()
    for s in range(0, flat.numel(), 97):
        magprune_piece_(flat[s:s + 97], s, key, ranks[s:s + 97], 33, 0.6, 0.3, True)
    assert torch.equal(flat.view(20, 33), whole)


def test_epsilon_zero_is_dare():
    g = torch.Generator().manual_seed(6)
    delta = torch.randn(17, 40, generator=g)
    key = mask_key(0, 1, NAME)
    for d in (0.3, 0.5, 0.9):
        dare = random_drop(delta, key, d).div_(d)
        assert torch.equal(magprune(delta, key, d, 0.0), dare)


def test_identities():
    delta = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    key = mask_key(0, 1, NAME)
    assert torch.equal(magprune(delta, key, 1.0, 0.5), delta)
    assert torch.equal(magprune(delta, key, 0.0, 0.5), torch.zeros_like(delta))
    assert rank_rows((6, 1)) == 1 and rank_rows((300,)) == 300 and rank_rows(()) == 1
    ones = magprune_probs(torch.zeros(6, dtype=torch.int64), 1, 0.35, 0.2)
    assert ones.tolist() == [0.35] * 6                  # one entry per row: p = d


def test_keep_rate_follows_the_rank():
    g = torch.Generator().manual_seed(2)
    delta = torch.randn(400, 256, generator=g)
    out = magprune(delta, mask_key(0, 1, NAME), 0.5, 0.2, divide=False)
    kept = (out != 0).double()
    ranks = magprune_ranks(delta)
    top, bottom = kept[ranks >= 230].mean().item(), kept[ranks < 26].mean().item()
    assert abs(kept.mean().item() - 0.5) < 0.01
    assert abs(top - 0.69) < 0.02 and abs(bottom - 0.31) < 0.02
    n = kept.numel()
    assert abs(kept.mean().item() - 0.5) < 5 * math.sqrt(0.25 / n) + 1e-3


@pytest.mark.parametrize("d, eps, bad", [(0.5, 0.5, True), (0.5, 0.49, False), (0.9, 0.1, True),
                                         (0.1, 0.1, True), (0.2, 0.15, False), (1.0, 0.5, False),
                                         (0.0, 0.3, False), (0.5, 0.0, False)])
def test_epsilon_rule(d, eps, bad):
    assert (epsilon_problem(d, eps) is not None) is bad
