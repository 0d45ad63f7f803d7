"""kernels/sce.py gives the bits of ops.sce.sce (the stacked, sorted definition).

Inputs hit the edge cases: bf16 task vectors with many tied variances, exact zeros (entries
equal to the base in every model, so zero variance), ±0.0 in the base, 1-D to 3-D shapes,
1 to 4 models, select_topk 0 / partial / 1, one and two torch threads and span workers, bf16
and float32 inputs and outputs. The fast merge is compared bit for bit (−0.0 ≠ +0.0)."""

from __future__ import annotations

import pytest
import torch
from kernel_family import BF16, F32, bits
from kernel_family import family as shared_family

from mergekit_like.kernels import sce as fast
from mergekit_like.kernels.tiling import PIECE
from mergekit_like.methods.base import TensorTask
from mergekit_like.ops.sce import sce, sce_weights, variance_keep

def family(shape, n, seed, dtype=BF16):
    """``kernel_family.family`` with the first 50 entries equal to the base in every model
    (zero variance: never counted)."""
    base, xs = shared_family(shape, n, seed, dtype)
    for x in xs:
        x.view(-1)[:50] = base.view(-1)[:50]
    return base, xs


def task_of(base, xs, topk, *, load_dtype=None, out_dtype=BF16, workers=1):
    return TensorTask("w", tuple(base.shape), out_dtype, F32, load_dtype, base, list(xs),
                      list(range(len(xs))), [{} for _ in xs], {"select_topk": topk},
                      workers=workers, inputs_finite=True)


def reference(task):
    base = task.cast(task.base)
    out = task.empty_output()
    xs = [task.cast(x) for x in task.inputs]
    out.copy_(sce(base, xs, select_topk=task.params["select_topk"]))
    return out


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("topk", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(300, 70), (1000,), (20, 9, 13), (3 * PIECE // 64 + 5, 64)])
def test_sce_task_bit_equal(shape, topk, n, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        base, xs = family(shape, n, seed=len(shape) * 10 + n)
        task = task_of(base, xs, topk, workers=threads)
        assert fast.supported(task, list(range(n)))
        got = fast.sce_task(task, list(range(n)), topk)
        assert torch.equal(bits(got), bits(reference(task)))
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("out_dtype", [F32, BF16])
@pytest.mark.parametrize("load_dtype,dtype", [(None, F32), (F32, F32), (F32, BF16)])
def test_sce_task_f32_inputs_and_outputs(load_dtype, dtype, out_dtype):
    base, xs = family((257, 33), 3, seed=3, dtype=dtype)
    task = task_of(base, xs, 0.4, load_dtype=load_dtype, out_dtype=out_dtype, workers=2)
    assert fast.supported(task, [0, 1, 2])
    got = fast.sce_task(task, [0, 1, 2], 0.4)
    assert torch.equal(bits(got), bits(reference(task)))


@pytest.mark.parametrize("topk", [0.1, 0.5, 0.9, 0.999])
def test_variance_keep_ties(topk):
    """Variances with heavy ties (a coarse value grid) and zeros: the selection keeps exactly
    the stable sort's first k."""
    g = torch.Generator().manual_seed(7)
    tvs = torch.randint(-3, 4, (3, 50_000), generator=g).float() * 0.125
    tvs[:, :2000] = 0.0
    var = torch.var(tvs, dim=0, unbiased=False)
    got = fast.keep_top(var, topk, int(torch.count_nonzero(var)), workers=2)
    assert torch.equal(got, variance_keep(tvs, topk).reshape(-1))


def test_variance_keep_nonfinite_takes_sort():
    tvs = torch.tensor([[0.0, 3e38, 1.0, -3e38], [0.0, -3e38, 2.0, 3e38]])
    var = torch.var(tvs, dim=0, unbiased=False)
    assert torch.equal(fast.keep_top(var, 0.5, 3), variance_keep(tvs, 0.5))


def test_huge_deltas_bit_equal():
    """Task vectors near float32's limit: variances overflow to inf (the sort's order)."""
    base = torch.zeros(40, 8)
    xs = [torch.randn(40, 8, generator=torch.Generator().manual_seed(i)) * 1e38 for i in range(3)]
    task = task_of(base, xs, 0.5, out_dtype=F32)
    assert torch.equal(bits(fast.sce_task(task, [0, 1, 2], 0.5)), bits(reference(task)))


@pytest.mark.parametrize("threads", [1, 2])
def test_weights_match_stacked_reduction(threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(1)
        tvs = torch.randn(3, 1_000_003, generator=g) * torch.rand(1_000_003, generator=g)
        for t in (tvs, tvs * 0):
            means = torch.stack([fast.row_mean(row ** 2) for row in t])
            assert torch.equal(fast.weights(means), sce_weights(t))
    finally:
        torch.set_num_threads(old)


def test_unsupported_cases():
    base, xs = family((10, 4), 5, seed=0)
    assert not fast.supported(task_of(base, xs, 0.5), [0, 1, 2, 3, 4])   # N > 4
    assert not fast.supported(task_of(base, xs[:2], 0.5, load_dtype=torch.float16), [0, 1])
    b0 = torch.tensor(1.0)
    assert not fast.supported(task_of(b0, [b0], 0.5), [0])
