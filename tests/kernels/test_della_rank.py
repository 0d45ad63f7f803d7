"""kernels/della_rank.py's bucketed rank gives torch's stable-sort ranks index for index, and its
"l1" row sums the bits of the adapter's torch sums.

The rank is read back through the keep bits: with the step table thresholds[r] = 2²⁴ for r ≥ R
and 0 below (non-decreasing, as MAGPRUNE's are), keep_j = [r_j ≥ R] whatever the draw, and
r_j = Σ_{R=1}^{m−1} [r_j ≥ R]. A step inside a bucket that may hold several values leaves its
entries "open" (the keep bit unknown from the bucket's rank range), so both the bucket rank
and the exact ranks of ``_settle`` (counted, or sorted past ``OPEN_CAP``) are checked. Rows:
float32 with distinct magnitudes, bf16 grids with many ties, ±0.0 and exact zeros, all-equal
and all-zero rows (one key), two repeated values, subnormals, rows on scales from 1e-30 to 1e30,
rows spanning more binades than the buckets cover (the smaller keys lumped in bucket 1), lengths
1, 2, 3, 7, 64, 66, 257, 1000, 4096.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mergekit_like.kernels import della as fast
from mergekit_like.kernels import della_rank
from mergekit_like.kernels.tiling import pieces, row_sums
from mergekit_like.methods.base import TensorTask
from mergekit_like.ops.della import draws, magprune_ranks
from mergekit_like.ops.drop import KEEP_ALL, mask_key

BF16, F32 = torch.bfloat16, torch.float32


def rows_of(kind: str, rows: int, m: int, seed: int) -> torch.Tensor:
    """[rows, m] float32 δ of one of the edge-case kinds."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, m, generator=g)
    if kind == "bf16":                          # differences of bf16 values: a grid, many ties
        b = torch.randn(rows, m, generator=g) * 0.05
        x = (b + x * 0.002).bfloat16().float() - b.bfloat16().float()
    elif kind == "ties":
        x = torch.randint(-3, 4, (rows, m), generator=g).float() * 0.25
        x[x == 0] = -0.0 * torch.ones_like(x[x == 0])
    elif kind == "zeros":
        x = torch.where(torch.rand(rows, m, generator=g) < 0.5, torch.zeros_like(x), x)
        x[:, ::3] = -0.0
    elif kind == "equal":
        x = torch.full((rows, m), 0.5)
        x[:, ::2] = -0.5
    elif kind == "unchanged":                   # δ = ±0 everywhere: one key
        x = torch.zeros(rows, m)
        x[:, ::3] = -0.0
    elif kind == "two":                         # two values, each on half the row
        x = torch.where(torch.arange(m) % 2 == 0, 0.5, -0.75).repeat(rows, 1)
    elif kind == "subnormal":
        x = x * 1e-39
        x[:, ::4] = 0.0
    elif kind == "scales":                      # each row on its own scale, tiny to huge
        x = x * torch.logspace(-30, 30, rows).view(-1, 1)
    elif kind == "wide":                        # one row spans many binades (with ±inf: δ may)
        x = x * torch.logspace(-35, 35, m).view(1, -1)
        x[0, 0] = float("inf")
        x[-1, -1] = float("-inf")
    return x.contiguous()


def counted_ranks(delta: torch.Tensor) -> torch.Tensor:
    """r [delta's shape, int64] read back from keep_rows' keep bits (δ given as float32)."""
    rows, m = delta.shape
    work = della_rank.Work(m)
    flat = delta.reshape(-1).numpy()
    keep = np.empty(flat.size, np.bool_)
    sums = np.empty(rows)
    ranks = np.zeros(flat.size, np.int64)
    r = np.arange(m)
    for step in range(1, m):
        table = np.where(r >= step, KEEP_ALL, 0).astype(np.int32)
        della_rank.keep_rows(flat, None, m, 7, np.uint64(3), table, keep, sums, sums, False,
                             *work.arrays())
        ranks += keep
    return torch.from_numpy(ranks).view(rows, m)


@pytest.mark.parametrize("kind", ["f32", "bf16", "ties", "zeros", "equal", "unchanged",
                                  "subnormal", "scales", "wide"])
@pytest.mark.parametrize("m", [1, 2, 3, 7, 257, 1000])
def test_ranks_index_for_index(kind, m):
    delta = rows_of(kind, 9, m, seed=m)
    assert torch.equal(counted_ranks(delta), magprune_ranks(delta))


@pytest.mark.parametrize("m", [2 * della_rank.OPEN_CAP, 2 * della_rank.OPEN_CAP + 2])
def test_both_ways_of_settling_open_entries(m):
    """A step among m/2 equal keys leaves all of them open: up to OPEN_CAP are counted one by
    one, more are looked up among the row's sorted pairs."""
    delta = rows_of("two", 3, m, seed=m)
    assert torch.equal(counted_ranks(delta), magprune_ranks(delta))


def test_long_rows_and_one_row():
    delta = rows_of("bf16", 2, 4096, seed=1)
    assert torch.equal(counted_ranks(delta), magprune_ranks(delta))
    one = rows_of("ties", 1, 3001, seed=2)
    assert torch.equal(counted_ranks(one), magprune_ranks(one.view(-1)).view(1, -1))


@pytest.mark.parametrize("dtype", [BF16, F32])
def test_stored_bits_give_the_same_ranks(dtype):
    """δ = x − b from the stored bf16 bits (uint16) or float32: the ranks of torch's δ."""
    g = torch.Generator().manual_seed(5)
    b = (torch.randn(6, 333, generator=g) * 0.05).to(dtype)
    x = (b.float() + torch.randn(6, 333, generator=g) * 0.003).to(dtype)
    x[:, ::5] = b[:, ::5]
    delta = x.float() - b.float()
    task = task_of(b, x)
    key = mask_key(1, 0, task.name)
    got = fast.magprune_keep(task, x, key, 0.5, 0.3)
    ranks = magprune_ranks(delta).reshape(-1)
    thresholds = torch.from_numpy(fast.rank_thresholds(333, 0.5, 0.3)).long()
    assert torch.equal(got, draws(key, 0, delta.numel()) < thresholds[ranks])


def task_of(base, x, *, workers=1, block_elems=1 << 22, load_dtype=None):
    return TensorTask("model.layers.2.mlp.down_proj.weight", tuple(base.shape), BF16, F32,
                      load_dtype, base, [x], [0], [{}], {}, block_elems=block_elems,
                      workers=workers, inputs_finite=True)


def adapter_l1(task, x, keep):
    """‖δ‖₁, ‖keep·δ‖₁ as ``TaskVectorMethod._l1_factors`` sums them (torch row sums of the
    pieces, summed exactly)."""
    row = 1 if len(task.shape) == 1 else task.shape[1]
    full, kept = [], []
    for off, (b, xp) in pieces(task, [task.base, x]):
        delta = xp - b
        full.append(row_sums(delta.abs(), row))
        kept.append(row_sums(delta.mul_(keep[off:off + delta.numel()]).abs_(), row))
    return (math.fsum(torch.cat(full).tolist()), math.fsum(torch.cat(kept).tolist()))


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("kind", ["bf16", "wide_rows", "one_d", "one_d_wide"])
def test_l1_sums_are_the_adapters(kind, workers, monkeypatch):
    """Exact row sums where they are exact; elsewhere (rows spanning more than 2⁵³ ulps) the
    piece's torch sums: either way the adapter's bits."""
    torch_sums = []
    real = fast._l1_sums
    monkeypatch.setattr(fast, "_l1_sums", lambda *a: torch_sums.append(1) or real(*a))
    g = torch.Generator().manual_seed(11)
    shape = (2000,) if kind.startswith("one_d") else (300, 70)
    base = torch.randn(shape, generator=g) * 0.05
    x = base + torch.randn(shape, generator=g) * 0.01
    if kind in ("wide_rows", "one_d_wide"):              # rows spanning 40 decades
        x = x * torch.logspace(-20, 20, shape[-1])
        x.view(-1)[::97] = base.view(-1)[::97]
    if kind == "bf16":
        base, x = base.to(BF16), x.to(BF16)
    task = task_of(base, x, workers=workers, block_elems=3000)
    key = mask_key(4, 2, task.name)
    made = fast.magprune(task, x, key, 0.4, 0.2, l1=True)
    assert made.l1 == adapter_l1(task, x, made.keep)
    assert bool(torch_sums) == kind.endswith("wide") or kind == "wide_rows"


def test_exactness_bound_flags_wide_rows():
    """keep_rows says False exactly when a row may exceed 2⁵³ units of its smallest ulp."""
    m = 64
    work = della_rank.Work(m)
    table = fast.rank_thresholds(m, 0.5, 0.1)
    keep, full, kept = np.empty(2 * m, np.bool_), np.empty(2), np.empty(2)
    narrow = np.linspace(1.0, 2.0, 2 * m, dtype=np.float32)
    assert della_rank.keep_rows(narrow, None, m, 0, np.uint64(1), table, keep, full, kept, True,
                                *work.arrays())
    assert full[0] == math.fsum(float(v) for v in narrow[:m])
    wide = narrow.copy()
    wide[5] = 1e-30
    assert not della_rank.keep_rows(wide, None, m, 0, np.uint64(1), table, keep, full, kept,
                                    True, *work.arrays())
