"""The fused loops' precomputed keep masks (della, della_linear) and breadcrumbs bands give the
bits of the torch path, which is the ops/ definition (``MERGEKIT_LIKE_FUSED=0``: della's ranks
by ``ops.della.magprune_ranks``' stable sort and ``magprune_piece_``, breadcrumbs' band by the
torch scan), and breadcrumbs also equals the sort form ``ops.breadcrumbs.outlier_keep_sorted``
written out here. Inputs: bf16 and float32 models on bf16's coarse grid (many ties in |δ|),
exact zeros, ±0.0 in the base, negative weights, a model left whole (density 1), every
rescale, several spans (threads) and engine block sizes, bf16 and float32 outputs."""

from __future__ import annotations

import pytest
import torch
from kernel_family import BF16, F32, bits, family
from support.helpers import plan_params

from mergekit_like.kernels import fused_cpu
from mergekit_like.methods.base import TensorTask
from mergekit_like.ops.breadcrumbs import outlier_keep_sorted
from mergekit_like.registry import get_method

NAME = "model.layers.2.mlp.down_proj.weight"
DELLA = [{"weight": 1.0, "density": 0.5, "epsilon": 0.15},
         {"weight": -0.6, "density": 0.3, "epsilon": 0.2},
         {"weight": 0.8, "density": 1.0, "epsilon": 0.1}]
CRUMBS = [{"weight": 1.0, "density": 0.9, "gamma": 0.01},
          {"weight": 0.7, "density": 0.5, "gamma": 0.2},
          {"weight": -0.4, "density": 1.0, "gamma": 0.05}]


def merge(method, base, xs, mps, params, *, fused, out_dtype, workers, block_elems, monkeypatch):
    monkeypatch.setenv("MERGEKIT_LIKE_FUSED", fused)
    m = get_method(method)
    full, per_model = plan_params(m, params, mps)
    task = TensorTask(NAME, tuple(base.shape), out_dtype, F32, None, base, list(xs),
                      list(range(1, len(xs) + 1)), per_model, full, seed=5,
                      block_elems=block_elems, workers=workers, inputs_finite=True)
    return m.merge_tensor(task)


def spied(monkeypatch) -> list:
    calls: list = []
    real = fused_cpu.merge_span
    monkeypatch.setattr(fused_cpu, "merge_span",
                        lambda *a, **k: calls.append(k) or real(*a, **k))
    return calls


@pytest.mark.parametrize("method,mps", [("della", DELLA), ("della_linear", DELLA),
                                        ("breadcrumbs", CRUMBS), ("breadcrumbs_ties", CRUMBS)])
@pytest.mark.parametrize("dtype,out_dtype", [(BF16, BF16), (BF16, F32), (F32, BF16)])
@pytest.mark.parametrize("workers,block_elems", [(1, 1 << 22), (3, 1 << 22), (2, 6 * 1399)])
@pytest.mark.parametrize("params", [{}, {"normalize": True, "lambda": 0.7}, {"rescale": "l1"},
                                    {"rescale": False}])
def test_fused_equals_torch_path(method, mps, dtype, out_dtype, workers, block_elems, params,
                                 monkeypatch):
    base, xs = family((211, 1399), 3, seed=len(method) + workers, dtype=dtype,
                      zeros=[0.3, 0.0, 0.6])
    kw = dict(out_dtype=out_dtype, workers=workers, block_elems=block_elems,
              monkeypatch=monkeypatch)
    calls = spied(monkeypatch)
    ref = merge(method, base, xs, mps, params, fused="0", **kw)
    assert not calls
    got = merge(method, base, xs, mps, params, fused="1", **kw)
    assert len(calls) == min(workers, 2)           # one call per span (295 169 entries)
    assert got.dtype == ref.dtype == out_dtype
    assert torch.equal(bits(got), bits(ref))
    assert not torch.equal(got.float(), base.float())


@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize("lam", [1.0, 0.55])
def test_breadcrumbs_equals_the_sort_form(dtype, lam, monkeypatch):
    """out = (Σ w_i·δ_i ⊙ keep_i)·λ + b in float32, keep_i the stable sort's band, cast once."""
    base, xs = family((300, 257), 3, seed=9, dtype=dtype, zeros=[0.0, 0.3, 0.8])
    calls = spied(monkeypatch)
    got = merge("breadcrumbs", base, xs, CRUMBS, {"lambda": lam}, fused="1", out_dtype=BF16,
                workers=2, block_elems=1 << 22, monkeypatch=monkeypatch)
    assert calls
    b = base.float().reshape(-1)
    total = None
    for x, mp in zip(xs, CRUMBS):
        delta = x.float().reshape(-1) - b
        if mp["density"] < 1.0:
            delta = delta * outlier_keep_sorted(delta, mp["density"], mp["gamma"])
        w = delta * mp["weight"]
        total = w if total is None else total + w
    want = (total * lam + b).to(BF16).view(base.shape)
    assert torch.equal(bits(got), bits(want))


def test_band_and_keep_edges(monkeypatch):
    """A band of everything (γ = 0, density 1 − 1/n of a tiny tensor), bands at a zero
    threshold (most δ exactly 0), and all-equal |δ| rows for MAGPRUNE's index rule."""
    base = torch.zeros(40, 64, dtype=BF16)
    x = torch.full((40, 64), 0.25, dtype=BF16)
    x.view(-1)[::3] = -0.25
    y = base.clone()
    y.view(-1)[::17] = 0.5
    for method, mps in (("breadcrumbs_ties", [{"weight": 1.0, "density": 0.999, "gamma": 0.0},
                                              {"weight": 0.5, "density": 0.5, "gamma": 0.3}]),
                        ("della", [{"weight": 1.0, "density": 0.5, "epsilon": 0.45},
                                   {"weight": 0.5, "density": 0.3, "epsilon": 0.1}])):
        kw = dict(out_dtype=F32, workers=2, block_elems=640, monkeypatch=monkeypatch)
        ref = merge(method, base, [x, y], mps, {}, fused="0", **kw)
        calls = spied(monkeypatch)
        got = merge(method, base, [x, y], mps, {}, fused="1", **kw)
        assert calls
        assert torch.equal(bits(got), bits(ref))
        monkeypatch.undo()
