"""The in-place piecewise forms of ops/ (what the adapters' torch path runs) give the bits of the
whole-tensor equations they sit next to, zeros' signs included, however the tensor is cut."""

from __future__ import annotations

import os

import pytest
import torch
from support.helpers import plan_params

from mergekit_like.kernels.tiling import Scratch
from mergekit_like.methods import masks as rules
from mergekit_like.methods.base import TensorTask
from mergekit_like.ops import drop, masks, trim
from mergekit_like.ops.sign_consensus import sign_consensus, sign_consensus_
from mergekit_like.ops.slerp import slerp
from mergekit_like.ops.task_vectors import apply_delta_, combine_task_vectors, merged_delta_
from mergekit_like.registry import get_method

F32, F64 = torch.float32, torch.float64


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def weighted_terms(n: int, size: int, seed: int, dtype=F32) -> list[torch.Tensor]:
    """W_i with exact zeros of both signs, ties and cancelling entries."""
    g = torch.Generator().manual_seed(seed)
    terms = []
    for _ in range(n):
        w = (torch.randint(-4, 5, (size,), generator=g).to(dtype) * 0.25)
        w[torch.rand(size, generator=g) < 0.2] = -0.0
        terms.append(w)
    return terms


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.7, -0.4, 0.0], [-1.0, 2.0, 0.5]])
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("none_at", [None, 1])
def test_sign_consensus_in_place_equals_equation(normalize, weights, dtype, none_at):
    terms: list = weighted_terms(3, 4000, seed=len(weights) + int(normalize), dtype=dtype)
    if none_at is not None:
        terms[none_at] = None
    want = sign_consensus(terms, weights, normalize)
    for piece in (4000, 333):
        got = torch.cat([sign_consensus_([None if t is None else t[s:s + piece].clone()
                                          for t in terms], weights, normalize)
                         for s in range(0, 4000, piece)])
        assert torch.equal(bits(got), bits(want))
    assert sign_consensus([None, None], [1.0, 1.0], normalize) is None


@pytest.mark.parametrize("consensus", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("lam", [1.0, 0.6])
def test_pieces_of_merged_delta_equal_combine_task_vectors(consensus, normalize, lam):
    base = weighted_terms(1, 3000, seed=9)[0]
    terms: list = weighted_terms(3, 3000, seed=10)
    terms[2] = None                                         # d = 0: counts in the plain D only
    weights = [0.5, 1.0, 1e-9]
    want = combine_task_vectors(base, terms, weights, consensus=consensus, normalize=normalize,
                                lam=lam)
    out = torch.empty(3000, dtype=torch.bfloat16)
    for s in range(0, 3000, 256):
        parts = [None if t is None else t[s:s + 256].clone() for t in terms]
        delta = merged_delta_(parts, weights, consensus=consensus, normalize=normalize)
        out[s:s + 256].copy_(apply_delta_(base[s:s + 256], delta, lam))
    assert torch.equal(bits(out), bits(want.to(torch.bfloat16)))


def exact_threshold(delta: torch.Tensor, k: int) -> tuple[float, int | None]:
    """v_k and the tie cutoff read off a stable sort (what kernels/kth_largest.py finds)."""
    a = delta.abs().reshape(-1)
    order = torch.sort(-a, stable=True).indices
    value = float(a[order[k - 1]])
    ties = (a == value).nonzero().view(-1)
    needed = k - int((a > value).sum())
    return value, (int(ties[needed - 1]) if needed < ties.numel() else None)


@pytest.mark.parametrize("density", [0.01, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("zeros", [0.0, 0.8])
def test_trim_piece_equals_magnitude_trim(density, zeros):
    g = torch.Generator().manual_seed(int(density * 100))
    d = torch.randint(-6, 7, (5000,), generator=g).to(F32) * 0.125      # heavy ties
    d[torch.rand(5000, generator=g) < zeros] = -0.0
    want = trim.magnitude_trim(d, density)
    keep = trim.magnitude_keep(d, density)
    assert int(keep.sum()) == trim.trim_count(density, d.numel())
    value, cutoff = exact_threshold(d, trim.trim_count(density, d.numel()))
    for piece in (5000, 97):
        got = d.clone()
        for s in range(0, 5000, piece):
            trim.trim_piece_(got[s:s + piece], s, value, cutoff)
        assert torch.equal(bits(got), bits(want))


@pytest.mark.parametrize("density", [0.0, 0.3, 0.77, 1.0])
def test_random_drop_pieces_equal_the_equation(density):
    key = drop.mask_key(3, 1, "model.layers.0.mlp.up_proj.weight")
    assert torch.equal(drop.keep_mask(key, 0, 5000, density), drop.dare_keep(key, 0, 5000, density))
    d = weighted_terms(1, 5000, seed=4)[0]
    want = drop.random_drop(d, key, density)
    got = d.clone()
    for s in range(0, 5000, 611):
        drop.random_drop_(got[s:s + 611], s, key, density)
    assert torch.equal(bits(got), bits(want))


def test_l1_factors_of_the_adapter_are_the_equations():
    """The adapter's "l1" factors r = ‖δ‖₁/‖δ̂‖₁ equal ``l1_factor(l1_norm(δ), l1_norm(δ̂))``."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(67, 45, generator=g)
    xs = [base + 0.01 * torch.randn(67, 45, generator=g) for _ in range(2)]
    m = get_method("dare_linear")
    params, mps = plan_params(m, {"rescale": "l1"}, [{"weight": 1.0, "density": 0.4},
                                                     {"weight": 1.0, "density": 0.7}])
    task = TensorTask("model.layers.0.mlp.up_proj.weight", (67, 45), F32, F32, None, base, xs,
                      [0, 1], mps, params, seed=2, block_elems=500, workers=2)
    steps = m.resolve_steps(task, [0, 1])
    for j, x in enumerate(xs):
        delta = x - base
        kept = drop.random_drop(delta, drop.mask_key(2, j, task.name), mps[j]["density"])
        r = drop.l1_factor(drop.l1_norm(delta), drop.l1_norm(kept))
        assert steps.scales[j] == drop.rescale_step("l1", mps[j]["density"], r)


@pytest.mark.parametrize("shape", [(37, 29), (1001,), (4, 5, 6)])
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_adapter_equals_slerp(shape, t):
    g = torch.Generator().manual_seed(len(shape))
    v0 = torch.randn(shape, generator=g)
    v1 = v0 + 0.5 * torch.randn(shape, generator=g)
    task = TensorTask("w", shape, F32, F32, None, v0, [v1], [1], [{}], {"t": t}, block_elems=60)
    got = get_method("slerp").merge_tensor(task)
    assert torch.equal(bits(got), bits(slerp(v0, v1, t)))


def test_tensor_masks_apply_keep_mask_piece_by_piece(tmp_path):
    """methods/masks.TensorMasks on pieces = δ ⊙ (keep of ops.masks for each rule, and-ed)."""
    g = torch.Generator().manual_seed(6)
    shape = (40, 50)
    votes = torch.randint(0, 5, shape, generator=g).to(torch.int8)
    imp = torch.randn(shape, generator=g).to(torch.bfloat16)
    lv, li = os.path.realpath(str(tmp_path / "v")), os.path.realpath(str(tmp_path / "i"))
    mp = {"mask": {"importance": str(tmp_path / "i"), "threshold": 0.25},
          "protect": {"importance": str(tmp_path / "v"), "top": 0.3}}
    task = TensorTask("w", shape, F32, F32, None, torch.zeros(shape), [torch.zeros(shape)], [0],
                      [mp], {}, side={lv: votes, li: imp})
    tm = rules.TensorMasks.build(task, [0])
    delta = torch.randn(shape, generator=g).reshape(-1)
    keep = masks.keep_mask(imp, threshold=0.25) & masks.keep_mask(votes, top=0.3, protect=True)
    want = torch.where(keep.reshape(-1), delta, torch.zeros_like(delta))
    got = delta.clone()
    for s in range(0, delta.numel(), 333):
        tm.apply(0, got[s:s + 333], s, Scratch(F32, torch.device("cpu")))
    assert torch.equal(bits(got), bits(want))
