"""kernels/ram.py gives the bits of the ops/ram.py adapter path (stacked torch steps per block).

Inputs hit the edge cases: bf16 task vectors with many entries changed by one, several or no
model, |δ| on both sides of ε (ε not a float32 value, so the comparison's rounding counts), ±0.0
in the base, 1 to 4 models, RAM and RAM+ (λ with unique counts of 0), several spans and threads,
float32 inputs and outputs."""

from __future__ import annotations

import pytest
import torch
from kernel_family import BF16, F32, bits
from kernel_family import family as shared_family

from mergekit_like.kernels import ram as fast
from mergekit_like.methods.base import TensorTask
from mergekit_like.methods.ram import Ram, RamPlusTL
from mergekit_like.ops.ram import active, model_counts, ram_delta, unique_scales

EPS = 0.002


def family(shape, n, seed, dtype=BF16):
    """``kernel_family.family`` with small deltas, 20 % + 20 %·i of model i equal to the base,
    and every 13th entry changed by exactly ε (both sides of the comparison's rounding)."""
    base, xs = shared_family(shape, n, seed, dtype, zeros=[0.2 + 0.2 * i for i in range(n)],
                             scale=0.003)
    for x in xs:
        flat = x.view(-1)
        flat[5::13] = (base.view(-1)[5::13].float() + torch.tensor(EPS, dtype=F32)).to(dtype)
    return base, xs


def task_of(base, xs, params, *, out_dtype=BF16, workers=1):
    return TensorTask("w", tuple(base.shape), out_dtype, F32, None, base, list(xs),
                      list(range(len(xs))), [{} for _ in xs], params, workers=workers,
                      inputs_finite=True)


def reference(task, eps, plus=None):
    b = task.cast(task.base).reshape(-1)
    tvs = torch.stack([task.cast(x).reshape(-1) - b for x in task.inputs])
    scales = None
    if plus is not None:
        scales = unique_scales(*model_counts(*active(tvs, eps)), plus[0], plus[1], eps)
    out = task.empty_output()
    out.view(-1).copy_(b + ram_delta(tvs, eps, scales))
    return out


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(300, 70), (1000,), (20, 9, 13), (1 << 19,)])
@pytest.mark.parametrize("plus", [None, (0.5, 1.0), (0.3, 0.05)])
def test_ram_bit_equal(shape, n, workers, plus):
    base, xs = family(shape, n, seed=n + len(shape))
    params = {"epsilon": EPS} if plus is None else \
        {"epsilon": EPS, "r": plus[0], "alpha": plus[1]}
    task = task_of(base, xs, params, workers=workers)
    assert fast.supported(task, list(range(n)))
    method = Ram() if plus is None else RamPlusTL()
    got = method.merge_tensor(task)
    assert torch.equal(bits(got), bits(reference(task, EPS, plus)))


@pytest.mark.parametrize("out_dtype", [F32, BF16])
def test_float32_inputs(out_dtype):
    base, xs = family((257, 33), 3, seed=3, dtype=F32)
    task = task_of(base, xs, {"epsilon": EPS, "r": 0.5, "alpha": 1.0}, out_dtype=out_dtype,
                   workers=2)
    got = RamPlusTL().merge_tensor(task)
    assert torch.equal(bits(got), bits(reference(task, EPS, (0.5, 1.0))))


def test_counts_match():
    base, xs = family((129, 77), 3, seed=1)
    task = task_of(base, xs, {"epsilon": EPS}, workers=2)
    b = base.float().reshape(-1)
    tvs = torch.stack([x.float().reshape(-1) - b for x in xs])
    for got, want in zip(fast.model_counts(task, [0, 1, 2], EPS), model_counts(*active(tvs, EPS))):
        assert torch.equal(got, want)


def test_unsupported_cases():
    base, xs = family((10, 4), 5, seed=0)
    assert not fast.supported(task_of(base, xs, {"epsilon": EPS}), [0, 1, 2, 3, 4])
    task = task_of(base, xs[:2], {"epsilon": EPS})
    task.inputs_finite = False
    assert not fast.supported(task, [0, 1])


def test_epsilon_boundary():
    """|δ| at float32(ε) and its neighbours: the comparison is made as torch makes it."""
    e = torch.tensor(EPS, dtype=F32)
    up, down = torch.nextafter(e, torch.tensor(1.0)), torch.nextafter(e, torch.tensor(0.0))
    vals = torch.stack([e, up, down])
    base = torch.zeros(4, 3)
    xs = [torch.cat([vals, -vals, vals.flip(0), vals * 2]).reshape(4, 3),
          torch.cat([vals, vals * 0, -vals, vals]).reshape(4, 3)]
    task = task_of(base, xs, {"epsilon": EPS, "r": 0.5, "alpha": 1.0}, out_dtype=F32)
    assert torch.equal(bits(RamPlusTL().merge_tensor(task)), bits(reference(task, EPS, (0.5, 1.0))))
    task = task_of(base, xs, {"epsilon": EPS}, out_dtype=F32)
    assert torch.equal(bits(Ram().merge_tensor(task)), bits(reference(task, EPS)))
