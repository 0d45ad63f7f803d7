"""model_stock filter_wise runs on dim-0 row blocks: bit-equal to ops.model_stock.model_stock on
the whole converted tensors, whatever the block size (a last single-row block included), the
number of models, the torch threads, and with rows wide enough that torch parallelises."""

from __future__ import annotations

import pytest
import torch

from mergekit_like.methods.base import TensorTask
from mergekit_like.methods.model_stock import ModelStock, row_blocks
from mergekit_like.ops.model_stock import model_stock

BF16, F32 = torch.bfloat16, torch.float32


def family(shape, n, seed):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 0.05).to(BF16)
    xs = [(base.float() + torch.randn(shape, generator=g) * 0.01).to(BF16) for _ in range(n)]
    xs[0].view(-1)[:7] = base.view(-1)[:7]
    return base, xs


def task_of(base, xs, block_elems):
    return TensorTask("w", tuple(base.shape), BF16, F32, None, base, list(xs),
                      list(range(len(xs))), [{} for _ in xs], {"filter_wise": True},
                      block_elems=block_elems)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("shape,block_elems", [((301, 70), 700), ((97, 6, 5), 60),
                                               ((7, 40_000), 40_000), ((3, 50_000), 1),
                                               ((64, 1536), 1 << 22)])
def test_blocks_bit_equal(shape, block_elems, n, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        base, xs = family(shape, n, seed=n + len(shape))
        task = task_of(base, xs, block_elems)
        got = ModelStock().merge_tensor(task)
        want = model_stock(base.float(), [x.float() for x in xs], filter_wise=True).to(BF16)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    finally:
        torch.set_num_threads(old)


def test_row_blocks_never_end_with_one_row():
    base, xs = family((301, 70), 2, seed=0)
    blocks = row_blocks(task_of(base, xs, 700))    # 10 rows a block, 1 left over
    assert blocks[-1] == slice(290, 301) and all(b.stop - b.start >= 2 for b in blocks)
    assert row_blocks(task_of(base, xs, 1))[:2] == [slice(0, 2), slice(2, 4)]
    base, xs = family((1, 70), 2, seed=0)
    assert row_blocks(task_of(base, xs, 7)) == [slice(0, 1)]
