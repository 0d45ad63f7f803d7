"""kernels/arcee_fusion.py's threshold equals ops.arcee_fusion.fusion_threshold bit for bit
(with ±0.0 quartiles, in value: which zero the selection returns cannot change imp ≥ τ):
random importances, heavy ties, zeros, every small n (the quartile positions), NaN.
Its compiled passes (``fused_passes``) give the bits of ops.arcee_fusion and of the adapter's
torch path: bf16 and float32 inputs and outputs, ties, zeros, ±0.0, several block sizes."""

from __future__ import annotations

import numpy as np
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


# ---- the compiled passes (kernels/arcee_fusion.fused_passes) against ops/ and the torch path

def _task(base, other, out_dtype, block_elems, finite=True, workers=1):
    from mergekit_like.methods.base import TensorTask
    return TensorTask("w", tuple(base.shape), out_dtype, torch.float32, None, base, [other],
                      [0], [{}], {}, block_elems=block_elems, inputs_finite=finite,
                      workers=workers)


def _pair(shape, dtype, seed, zeros=0.3):
    from kernel_family import family
    base, (other,) = family(shape, 1, seed, dtype, zeros=zeros)
    return base, other


def _raw_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape,block", [((300, 70), 1 << 22), ((300, 70), 70 * 7),
                                         ((64, 9, 13), 9 * 13 * 5), ((1, 4096), 1 << 22),
                                         ((2000, 1), 100)])
@pytest.mark.parametrize("zeros", [0.3, 0.9])
def test_fused_passes_bit_equal(dtype, out_dtype, shape, block, zeros, monkeypatch):
    """The same bits as ops.arcee_fusion on the whole tensor (then cast) and as the adapter's
    torch path (MERGEKIT_LIKE_FUSED=0): ties, exact zeros, ±0.0 in the base, τ = 0 (90 %
    unchanged), blocks of whole rows, 3-d rows, a one-row and a one-column tensor."""
    from mergekit_like.kernels import arcee_fusion as kernel
    from mergekit_like.methods.arcee_fusion import ArceeFusion
    from mergekit_like.ops.arcee_fusion import arcee_fusion
    base, other = _pair(shape, dtype, seed=len(shape) + int(zeros * 10))
    assert kernel.supported(_task(base, other, out_dtype, block), base, other)
    fast = ArceeFusion().merge_tensor(_task(base, other, out_dtype, block))
    two = ArceeFusion().merge_tensor(_task(base, other, out_dtype, block, workers=2))
    assert torch.equal(_raw_bits(fast), _raw_bits(two))
    want = arcee_fusion(base.float(), other.float()).to(out_dtype)
    assert torch.equal(_raw_bits(fast), _raw_bits(want))
    monkeypatch.setenv("MERGEKIT_LIKE_FUSED", "0")
    assert not kernel.supported(_task(base, other, out_dtype, block), base, other)
    slow = ArceeFusion().merge_tensor(_task(base, other, out_dtype, block))
    assert torch.equal(_raw_bits(fast), _raw_bits(slow))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_importance_loop_bit_equal(dtype):
    """|b − a|·KL from the stored bytes equals ops.arcee_fusion.fusion_importance, and the row
    KL of the in-place torch steps equals the definition's."""
    from mergekit_like.kernels import arcee_fusion as kernel
    from mergekit_like.kernels.fused_cpu import raw
    base, other = _pair((50, 3, 40), dtype, seed=3)
    a32, b32 = base.float(), other.float()
    want = fusion_importance(a32, b32).reshape(-1)
    kl = kernel._row_kl(base, other, kernel._Buffers(base.numel() + 7))
    got = torch.empty(base.numel())
    over = kernel.PASSES.get().importance(raw(base), raw(other), kl, 40, got.numpy())
    assert over == 0 and torch.equal(_raw_bits(got), _raw_bits(want))


def test_fuse_loop_signed_zeros():
    """A dropped entry is (b − a)·0 + a, as torch's: −0.0 base with b = a gives +0.0."""
    from mergekit_like.kernels import arcee_fusion as kernel
    from mergekit_like.kernels.fused_cpu import raw
    from mergekit_like.ops.arcee_fusion import fuse
    a = torch.tensor([-0.0, -0.0, 0.0, -0.0, 1.0, -1.0, 2.0, 0.5])
    b = torch.tensor([-0.0, 0.0, -0.0, 1.0, 1.0, -2.0, 2.5, -0.5])
    imp = torch.tensor([0.0, 1.0, 0.0, 0.5, 2.0, 0.0, 3.0, 1.0])
    for tau in (0.0, 0.75, -0.0, 5.0):
        keep = imp >= tau
        for out_dtype in (torch.float32, torch.bfloat16):
            out = torch.empty(8, dtype=out_dtype)
            kernel.PASSES.get().fuse(raw(a), raw(b), imp.numpy(), np.float32(tau), raw(out))
            assert torch.equal(_raw_bits(out), _raw_bits(fuse(a, b, keep).to(out_dtype)))


def test_overflow_and_nonfinite_take_torch_path():
    """|b − a| = inf (float32 inputs near the top): the torch path's bits; inputs not known
    finite are not taken at all."""
    from mergekit_like.kernels import arcee_fusion as kernel
    from mergekit_like.methods.arcee_fusion import ArceeFusion
    from mergekit_like.ops.arcee_fusion import arcee_fusion
    base, other = _pair((40, 30), torch.float32, seed=5)
    base[3, 4], other[3, 4] = -3e38, 3e38
    task = _task(base, other, torch.float32, 1 << 22)
    out = torch.empty(base.shape)
    assert kernel.supported(task, base, other) and not kernel.fused_passes(task, base, other, out)
    got = ArceeFusion().merge_tensor(task)
    assert torch.equal(_raw_bits(got), _raw_bits(arcee_fusion(base, other)))
    assert not kernel.supported(_task(base, other, torch.float32, 1 << 22, finite=False),
                                base, other)



@pytest.mark.parametrize("seed", range(3))
def test_collect3_equals_bracket_collect(seed):
    """The three-bracket collect gives select_loops' values, in order (overlapping and
    empty brackets too)."""
    from mergekit_like.kernels import arcee_fusion as kernel
    g = torch.Generator().manual_seed(seed)
    a = (torch.rand(100_003, generator=g) * 4).floor_().mul_(0.25).numpy()
    a[::3] = torch.rand(a[::3].size, generator=g).numpy()
    lo = np.array([0.0, 0.3, 0.2], np.float32)
    hi = np.array([0.25, 0.3, 0.9], np.float32)
    outs = []
    for collect in (kernel.LOOPS.get().bracket_collect, kernel.PASSES.get().collect3):
        out, fill = np.zeros((3, a.size + 1), np.float32), np.zeros(3, np.int64)
        collect(a, lo, hi, out, fill)
        outs.append([out[q, :fill[q]].tolist() for q in range(3)])
    assert outs[0] == outs[1] and outs[0][0] and outs[0][2] and not outs[0][1]
