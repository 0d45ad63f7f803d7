"""kernels/della.py gives the bits of ops/della.py's MAGPRUNE keep (torch's stable row sort for
the ranks, float64 probabilities, SplitMix64 draws).

Inputs hit the edge cases: bf16 deltas on a coarse grid (many equal magnitudes in a row, whose
ranks the lowest-index rule orders), exact zeros and ±0.0 deltas, rows of 1 entry, 1-D tensors,
pieces and engine blocks cutting the tensor, two span threads, a recipe dtype that rounds on
load."""

from __future__ import annotations

import pytest
import torch

from mergekit_like.kernels import della as fast
from mergekit_like.methods.base import TensorTask
from mergekit_like.ops.della import (draws, keep_thresholds, magprune_probs, magprune_ranks,
                                     rank_rows)
from mergekit_like.ops.drop import mask_key

BF16, F32 = torch.bfloat16, torch.float32


def family(shape, seed, dtype=BF16):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    x = (base.float() + torch.randn(shape, generator=g) * 0.01).to(dtype)
    same = torch.rand(shape, generator=g) < 0.3
    x[same] = base[same]
    flat = x.view(-1)
    flat[::7] = (base.view(-1)[::7].float() * -1).to(dtype)        # ±0.0 and equal |δ|
    flat[3::11] = (base.view(-1)[3::11].float() + 0.0078125).to(dtype)
    return base, x


def reference_keep(task, x, key, density, epsilon):
    delta = task.cast(x) - task.cast(task.base)
    m = rank_rows(task.shape)
    ranks = magprune_ranks(delta).reshape(-1)
    probs = magprune_probs(ranks, m, density, epsilon)
    return draws(key, 0, ranks.numel()) < keep_thresholds(probs)


def task_of(base, x, *, workers=1, block_elems=1 << 22, load_dtype=None):
    return TensorTask("model.layers.1.mlp.up_proj.weight", tuple(base.shape), BF16, F32,
                      load_dtype, base, [x], [0], [{}], {}, block_elems=block_elems,
                      workers=workers, inputs_finite=True)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("density,epsilon", [(0.5, 0.15), (0.3, 0.2), (0.9, 0.05), (0.5, 0.0)])
@pytest.mark.parametrize("shape", [(300, 70), (97, 1), (2000,), (5, 4096), (1,)])
def test_keep_bit_equal(shape, density, epsilon, workers):
    base, x = family(shape, seed=sum(shape))
    task = task_of(base, x, workers=workers, block_elems=3000)
    assert fast.supported(task)
    key = mask_key(3, 1, task.name)
    got = fast.magprune_keep(task, x, key, density, epsilon)
    assert torch.equal(got, reference_keep(task, x, key, density, epsilon))


@pytest.mark.parametrize("dtype,load_dtype", [(F32, None), (F32, torch.float16), (BF16, F32)])
def test_keep_dtypes(dtype, load_dtype):
    base, x = family((129, 257), seed=4, dtype=dtype)
    task = task_of(base, x, load_dtype=load_dtype, workers=2)
    key = mask_key(0, 2, task.name)
    got = fast.magprune_keep(task, x, key, 0.4, 0.1)
    assert torch.equal(got, reference_keep(task, x, key, 0.4, 0.1))


def test_all_equal_rows_rank_by_index():
    """Every |δ| of a row equal: ranks are m−1 … 0 by column, the keep bits follow."""
    base = torch.zeros(8, 64)
    x = torch.full((8, 64), 0.5)
    x[::2] *= -1
    task = task_of(base, x)
    key = mask_key(0, 0, task.name)
    got = fast.magprune_keep(task, x, key, 0.5, 0.45)
    assert torch.equal(got, reference_keep(task, x, key, 0.5, 0.45))


def test_unsupported_cases():
    base, x = family((4, 5, 6), seed=0)
    assert not fast.supported(task_of(base, x))                 # 3-D: ranks along dim 1
    b0 = torch.tensor(1.0)
    assert not fast.supported(task_of(b0, b0))
    base, x = family((4, 5), seed=0)
    task = task_of(base, x)
    task.inputs_finite = False
    assert not fast.supported(task)
