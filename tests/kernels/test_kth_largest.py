"""TIES trim: the sampled-bracket k-th largest (kernels/kth_largest.py) keeps exactly the set
exact top-k keeps, ties at v_k broken by lowest flat index (docs/methods/ties.md §2–§3), and
trims to the bits of the sort-based ``ops.trim.magnitude_trim``."""

from __future__ import annotations

import pytest
import torch

from mergekit_like.kernels import kth_largest as K
from mergekit_like.methods import ties as T
from mergekit_like.methods.base import TensorTask
from mergekit_like.ops import trim

F32 = torch.float32


def reference_keep(a: torch.Tensor, k: int) -> torch.Tensor:
    """Exact top-k of flat |δ| with ties at v_k taken by lowest index (stable sort)."""
    order = torch.sort(-a, stable=True).indices[:k]
    keep = torch.zeros(a.numel(), dtype=torch.bool)
    keep[order] = True
    return keep


def fast_keep(a: torch.Tensor, k: int, sample: torch.Tensor | None = None, piece: int = 997):
    """Kept set from kth_largest + tie_cutoff on pieces of ``a`` (what MagnitudeTrim uses)."""
    n = a.numel()

    def chunks():
        for s in range(0, n, piece):
            yield s, a[s:s + piece].clone()     # a reused buffer would do too

    kth = K.kth_largest(chunks, n, k, a if sample is None else sample)
    need = k - kth.above
    assert 1 <= need <= kth.equal
    keep = a > kth.value
    ties = a == kth.value
    assert int(ties.sum()) == kth.equal
    if need < kth.equal:
        cutoff = K.tie_cutoff(chunks(), kth.value, need)
        if kth.cutoff is not None:                      # found in the collected set already
            assert kth.cutoff == cutoff
        ties &= torch.arange(n) <= cutoff
    else:
        assert kth.cutoff is None
    return keep | ties, kth


def _data(kind: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(n, generator=g).mul_(0.01).abs_()
    if kind == "few_values":                    # heavy repeats: 7 distinct magnitudes
        return torch.randint(0, 7, (n,), generator=g).to(F32).mul_(0.125)
    if kind == "zeros":                         # 60 % exact zeros, the rest continuous
        a = torch.randn(n, generator=g).abs_()
        a[torch.rand(n, generator=g) < 0.6] = 0.0
        return a
    if kind == "bf16_like":                     # deltas of bf16 weights: coarse grid
        return (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16).to(F32).abs_()
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["normal", "few_values", "zeros", "bf16_like"])
@pytest.mark.parametrize("density", [0.001, 0.1, 0.5, 0.7, 0.999])
@pytest.mark.parametrize("n", [1000, 120_000])
def test_kept_set_equals_exact_topk(kind, density, n):
    a = _data(kind, n, seed=n + int(density * 1000))
    k = trim.trim_count(density, n)
    sample = a if n <= 1000 else a[torch.randint(n, (K.SAMPLE_MIN,), generator=torch.Generator().manual_seed(1))]
    keep, kth = fast_keep(a, k, sample)
    ref = reference_keep(a, k)
    assert int(keep.sum()) == k
    assert torch.equal(keep, ref)
    top = torch.topk(a, k)
    assert kth.value == float(top.values[-1])
    assert torch.equal(torch.sort(a[keep]).values, torch.sort(top.values).values)


@pytest.mark.parametrize("sample_kind", ["too_large", "too_small", "one_atom", "empty"])
def test_bad_sample_only_costs_passes(sample_kind):
    a = _data("normal", 50_000, seed=3)
    k = trim.trim_count(0.3, a.numel())
    sample = {"too_large": a[:2000] + 1.0, "too_small": a[:2000] * 1e-3,
              "one_atom": torch.full((500,), float(a[7])), "empty": a[:0]}[sample_kind]
    keep, kth = fast_keep(a, k, sample)
    assert torch.equal(keep, reference_keep(a, k))
    if sample_kind != "empty":
        assert kth.passes > 1


def test_extreme_k():
    a = _data("few_values", 5000, seed=4)
    for k in (1, 2, 4999, 5000):
        keep, _ = fast_keep(a, k)
        assert torch.equal(keep, reference_keep(a, k)), k
    with pytest.raises(ValueError):
        K.kth_largest(lambda: [(0, a)], a.numel(), 0, a)


def test_trim_count():
    assert trim.trim_count(0.5, 6) == 3 and trim.trim_count(0.7, 6) == 4
    assert trim.trim_count(0.01, 50) == 1                      # int(0.5) = 0 → at least one
    assert trim.trim_count(0.29, 100) == 28                    # Python float product, truncated


def test_magnitude_trim_matches_mask_and_cutoff():
    g = torch.Generator().manual_seed(5)
    d = torch.randint(-3, 4, (200,), generator=g).to(F32) * 0.5
    a = d.abs()
    k = 77
    keep = reference_keep(a, k)
    kth = K.kth_largest(lambda: [(0, a)], 200, k, a)
    cutoff = K.tie_cutoff([(0, a)], kth.value, k - kth.above)
    for piece in (200, 13, 1):                              # piecewise application, global offsets
        out = d.clone()
        for s in range(0, 200, piece):
            trim.trim_piece_(out[s:s + piece], s, kth.value, cutoff)
        assert torch.equal(out, torch.where(keep, d, torch.zeros_like(d)))


def _task(base, x, density, block_elems):
    return TensorTask(name="w", shape=tuple(base.shape), out_dtype=F32, compute_dtype=F32,
                      load_dtype=None, base=base, inputs=[x], input_indices=[1],
                      model_params=[{"weight": 1.0, "density": density}],
                      params={"normalize": False, "lambda": 1.0, "rescale": False,
                              "trim_scope": "tensor"},
                      block_elems=block_elems)


@pytest.mark.parametrize("block_elems", [1 << 22, 700, 7])
def test_ties_adapter_trims_exact_topk_across_blocks(block_elems):
    """One model, base 0: the ties output is δ̂ itself; its support is the exact top-k."""
    g = torch.Generator().manual_seed(6)
    d = (torch.randint(-5, 6, (60, 35), generator=g).to(F32) * 0.25)   # many ties
    base = torch.zeros_like(d)
    k = trim.trim_count(0.37, d.numel())
    out = T.Ties().merge_tensor(_task(base, d, 0.37, block_elems))
    keep = reference_keep(d.abs().reshape(-1), k).view_as(d)
    assert torch.equal(out, torch.where(keep, d, torch.zeros_like(d)))


def test_ties_adapter_large_sampled_tensor():
    g = torch.Generator().manual_seed(7)
    base = torch.randn(400, 500, generator=g)
    x = base + (torch.randn(400, 500, generator=g) * 0.01).to(torch.bfloat16).to(F32)
    d = x - base
    k = trim.trim_count(0.2, d.numel())
    out = T.Ties().merge_tensor(_task(torch.zeros_like(d), d, 0.2, 1 << 15))
    keep = reference_keep(d.abs().reshape(-1), k).view_as(d)
    assert torch.equal(out, torch.where(keep, d, torch.zeros_like(d)))


@pytest.mark.parametrize("kind", ["normal", "few_values", "zeros", "bf16_like"])
@pytest.mark.parametrize("density", [0.01, 0.3, 0.5, 0.93])
def test_parts_scanned_in_parallel_give_the_serial_answer(kind, density):
    """kth_largest over consecutive parts run on threads equals the one-source scan."""
    from mergekit_like.kernels.tiling import Scratch, run_parallel

    a = _data(kind, 20_011, 7)
    n, k = a.numel(), trim.trim_count(density, a.numel())
    cuts = [0, 6_000, 6_001, 14_000, n]

    def part(s, e):
        def chunks():
            for o in range(s, e, 997):
                yield o, a[o:min(o + 997, e)].clone()
        return chunks

    sources = [part(s, e) for s, e in zip(cuts, cuts[1:])]
    scratches = [Scratch(F32, torch.device("cpu")) for _ in sources]
    sample = a[::7].clone()
    par = K.kth_largest(sources, n, k, sample, scratch=scratches,
                        run=lambda calls: run_parallel(calls, 3))
    ser = K.kth_largest(part(0, n), n, k, sample)

    def last_kept_tie(kth):            # the tie locator resolved to a flat index
        if kth.tie_piece is None:
            return kth.cutoff
        off, m, r = kth.tie_piece
        return off + int(torch.nonzero(a[off:off + m] == kth.value)[r - 1])

    assert par._replace(tie_piece=None, cutoff=None) == ser._replace(tie_piece=None, cutoff=None)
    assert last_kept_tie(par) == last_kept_tie(ser)
    keep, _ = fast_keep(a, k, sample)
    assert torch.equal(keep, reference_keep(a, k))
