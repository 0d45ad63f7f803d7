"""``breadcrumbs`` and ``breadcrumbs_ties`` (docs/methods/breadcrumbs.md): golden values computed
here from the equations with numpy, identities, blocking, bad parameters through the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.helpers import expect_merge_error, plan_params

from mergekit_like.demo import LlamaShape, make_family
from mergekit_like.kernels import fused_cpu
from mergekit_like.methods import breadcrumbs as breadcrumbs_method
from mergekit_like.methods.base import TensorTask
from mergekit_like.ops.breadcrumbs import outlier_keep_sorted
from mergekit_like.registry import get_method

F32 = torch.float32
NAME = "model.layers.0.mlp.up_proj.weight"


def run(method, base, xs, model_params, params=None, *, block_elems=1 << 22, workers=1,
        out_dtype=F32, indices=None):
    m = get_method(method)
    full, per_model = plan_params(m, params, model_params)
    task = TensorTask(NAME, tuple(base.shape), out_dtype, F32, None, base, list(xs),
                      list(indices or range(1, len(xs) + 1)), per_model, full,
                      block_elems=block_elems, workers=workers, inputs_finite=True)
    return m.merge(task)[NAME]


def ref_band(delta: np.ndarray, d: float, gamma: float) -> np.ndarray:
    """δ ⊙ keep of the breadcrumbs band (float32), from the equations."""
    flat = delta.reshape(-1)
    n = flat.size
    if d >= 1:
        return delta.copy()
    k, t = int(d * n), int(gamma * n)
    t = min(t, n - k)
    order = sorted(range(n), key=lambda j: (-abs(float(flat[j])), j))
    keep = np.zeros(n, dtype=np.float32)
    keep[order[t:t + k]] = 1
    return (flat * keep).reshape(delta.shape)


def ref_merge(base, xs, weights, densities, gammas, *, consensus, normalize, lam=1.0):
    b = base.numpy()
    W = [w * ref_band(x.numpy() - b, d, g) for x, w, d, g in zip(xs, weights, densities, gammas)]
    if consensus:
        s = np.where(sum(W) >= 0, 1.0, -1.0).astype(np.float32)
        agree = [(np.sign(w_i) == s) for w_i in W]
        delta = sum(w_i * a for w_i, a in zip(W, agree))
        if normalize:
            D = sum(w * a.astype(np.float32) for w, a in zip(weights, agree))
            delta = delta / np.where(D == 0, 1.0, D)
    else:
        delta = sum(W)
        if normalize:
            delta = delta / sum(weights)
    return torch.from_numpy((b + lam * delta).astype(np.float32))


def family(seed=0, shape=(6, 10), n=3):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]


def test_golden_hand_worked():
    # δ = x: k = 5, t = 1 → 0.9 dropped as an outlier, 0.8 0.7 0.6 0.5 0.4 kept
    x = torch.tensor([0.1, -0.9, 0.3, 0.5, -0.2, 0.8, -0.05, 0.4, 0.7, -0.6])
    out = run("breadcrumbs", torch.zeros(10), [x], [{"weight": 1.0, "density": 0.5, "gamma": 0.1}])
    assert torch.equal(out, torch.tensor([0, 0, 0, 0.5, 0, 0.8, 0, 0.4, 0.7, -0.6]))
    # two models, weights 1 and 0.5: the second keeps k = 2 of 4 after t = 1 outlier
    base = torch.tensor([1.0, 1.0, 1.0, 1.0])
    xs = [torch.tensor([2.0, 0.5, 1.25, 1.0]), torch.tensor([1.0, 3.0, 0.0, 1.5])]
    mp = [{"weight": 1.0, "density": 0.5, "gamma": 0.25}, {"weight": 0.5, "density": 0.5,
                                                          "gamma": 0.25}]
    # δ1 = [1, -.5, .25, 0] → keep -.5, .25 ; δ2 = [0, 2, -1, .5] → keep -1, .5
    assert torch.equal(run("breadcrumbs", base, xs, mp), torch.tensor([1.0, 0.5, 0.75, 1.25]))
    # ties: S = [0, -.5, -.25, .25] → s = [+, -, -, +]; agreeing sums -.5 | -.5 | .25
    assert torch.equal(run("breadcrumbs_ties", base, xs, mp), torch.tensor([1, 0.5, 0.5, 1.25]))


@pytest.mark.parametrize("method, consensus", [("breadcrumbs", False), ("breadcrumbs_ties", True)])
@pytest.mark.parametrize("normalize, lam", [(False, 1.0), (True, 0.7)])
def test_matches_reference(method, consensus, normalize, lam):
    base, xs = family(1)
    weights, densities, gammas = [1.0, 0.6, 0.3], [0.7, 0.5, 0.9], [0.05, 0.2, 0.01]
    mp = [{"weight": w, "density": d, "gamma": g} for w, d, g in zip(weights, densities, gammas)]
    out = run(method, base, xs, mp, {"normalize": normalize, "lambda": lam})
    expected = ref_merge(base, xs, weights, densities, gammas, consensus=consensus,
                         normalize=normalize, lam=lam)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_defaults():
    spec = get_method("breadcrumbs").spec
    defaults = {p.name: p.default for p in spec.params}
    assert (defaults["gamma"], defaults["density"], defaults["normalize"], defaults["rescale"],
            defaults["lambda"]) == (0.01, 1.0, False, False, 1.0)
    assert {p.name: p.default for p in get_method("breadcrumbs_ties").spec.params}["normalize"] \
        is False
    assert get_method("breadcrumbs_ties").consensus and not get_method("breadcrumbs").consensus


def test_identities():
    base, xs = family(2)
    ones = [{"weight": w, "density": 1.0, "gamma": 0.3} for w in (1.0, 0.5, 0.25)]
    plain = [{"weight": w} for w in (1.0, 0.5, 0.25)]
    assert torch.equal(run("breadcrumbs", base, xs, ones), run("task_arithmetic", base, xs, plain))
    assert torch.equal(run("breadcrumbs_ties", base, xs, ones, {"normalize": True}),
                       run("ties", base, xs, ones, {"normalize": True}))
    # γ = 0: breadcrumbs_ties is TIES (the same top-k, the same tie rule)
    zero = [{"weight": w, "density": d, "gamma": 0.0} for w, d in ((1, .5), (.5, .3), (1, .8))]
    assert torch.equal(run("breadcrumbs_ties", base, xs, zero, {"normalize": True}),
                       run("ties", base, xs, zero, {"normalize": True}))
    # models equal to the base: δ = 0 everywhere, the base comes back
    same = [base.clone() for _ in xs]
    mp = [{"weight": 1.0, "density": 0.5, "gamma": 0.1}] * 3
    for method in ("breadcrumbs", "breadcrumbs_ties"):
        assert torch.equal(run(method, base, same, mp), base)


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_blocking_threads_and_both_paths(method, monkeypatch):
    """The torch path (MERGEKIT_LIKE_FUSED=0) and the fused loops give the same bits for every
    blocking and thread count; the fused loops really run when on."""
    calls = []
    real = fused_cpu.merge_span
    monkeypatch.setattr(fused_cpu, "merge_span", lambda *a, **k: calls.append(1) or real(*a, **k))
    base, xs = family(3, shape=(37, 29))
    mp = [{"weight": 1.0, "density": 0.6, "gamma": 0.02}, {"weight": 0.5, "density": 0.3},
          {"weight": 0.8, "density": 0.9, "gamma": 0.1}]
    params = {"rescale": True}
    monkeypatch.setenv("MERGEKIT_LIKE_FUSED", "0")
    big = run(method, base, xs, mp, params)
    assert not calls
    for fused in ("0", "1"):
        monkeypatch.setenv("MERGEKIT_LIKE_FUSED", fused)
        for block_elems, workers in ((29, 1), (29 * 5, 2), (1000, 3)):
            small = run(method, base, xs, mp, params, block_elems=block_elems, workers=workers)
            assert torch.equal(small.view(torch.int32), big.view(torch.int32))
    assert calls


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_selection_path_equals_the_sort_on_ties(method, monkeypatch):
    """The adapter's exact-selection keep mask gives the sort's bits on heavily tied deltas."""
    g = torch.Generator().manual_seed(9)
    base = torch.randn(300, 1000, generator=g)
    xs = [base + 0.125 * torch.randint(-2, 3, base.shape, generator=g).float() for _ in range(3)]
    mp = [{"weight": 1.0, "density": 0.6, "gamma": 0.05}, {"weight": 0.5, "density": 0.3},
          {"weight": 0.8, "density": 0.9, "gamma": 0.1}]
    fast = run(method, base, xs, mp, workers=2)
    monkeypatch.setattr(breadcrumbs_method, "outlier_keep",
                        lambda d, dens, gam, workers=1: outlier_keep_sorted(d, dens, gam))
    assert torch.equal(fast, run(method, base, xs, mp, workers=2))


# ---- through the CLI: bad parameters -------------------------------------------------------

@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("bc_fam")
    make_family(root, LlamaShape(vocab_size=64, hidden_size=32, intermediate_size=48,
                                 num_hidden_layers=2), n_finetunes=2)
    return root


def recipe(fam, method, gamma1):
    return {"merge_method": method, "base_model": str(fam / "base"),
            "models": [{"model": str(fam / "ft1"),
                        "parameters": {"weight": 1.0, "density": 0.5, "gamma": gamma1}},
                       {"model": str(fam / "ft2"), "parameters": {"weight": 1.0, "density": 0.5}}],
            "dtype": "float32"}


@pytest.mark.parametrize("gamma", [-0.1, 1.5])
@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_bad_gamma(fam, tmp_path, capsys, method, gamma):
    expect_merge_error(tmp_path, capsys, recipe(fam, method, gamma), method, "gamma",
                       "between 0 and 1")


def test_non_numeric_gamma(fam, tmp_path, capsys):
    expect_merge_error(tmp_path, capsys, recipe(fam, "breadcrumbs", "big"), "gamma")
