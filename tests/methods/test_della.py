"""``della`` and ``della_linear`` (docs/methods/della.md): golden values from an independent numpy
SplitMix64 + ranking written from the equations, identities, blocking, bad parameters."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from support.helpers import expect_merge_error, plan_params

from mergekit_like.demo import LlamaShape, make_family
from mergekit_like.kernels import fused_cpu
from mergekit_like.methods.base import TensorTask
from mergekit_like.registry import get_method

F32 = torch.float32
NAME = "model.layers.0.mlp.up_proj.weight"


def run(method, base, xs, model_params, params=None, *, block_elems=1 << 22, workers=1,
        indices=None, seed=0):
    m = get_method(method)
    full, per_model = plan_params(m, params, model_params)
    task = TensorTask(NAME, tuple(base.shape), F32, F32, None, base, list(xs),
                      list(indices or range(1, len(xs) + 1)), per_model, full, seed=seed,
                      block_elems=block_elems, workers=workers, inputs_finite=True)
    return m.merge(task)[NAME]


def ref_keep_scale(delta: np.ndarray, seed: int, index: int, d: float, eps: float):
    """(keep, p) of MAGPRUNE for a 2-D δ, from the equations: numpy SplitMix64 u_j, ranks by
    (|δ|, then lower index ranks higher) along each row, p = (d − ε) + r/(m − 1)·2ε."""
    key = int.from_bytes(hashlib.sha256(f"{seed}:{index}:{NAME}".encode()).digest()[:8], "little")
    j = np.arange(delta.size, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(key) + (j + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(40)).reshape(delta.shape)
    rows, m = delta.shape
    r = np.zeros(delta.shape)
    for i in range(rows):
        order = sorted(range(m), key=lambda c: (-abs(float(delta[i, c])), c))
        for q, c in enumerate(order):
            r[i, c] = m - 1 - q
    p = (d - eps) + (r / (m - 1)) * 2 * eps
    return u < np.floor(p * 2.0**24).astype(np.uint64), p


def ref_della(base, xs, weights, densities, epsilons, *, consensus, normalize, rescale=True,
              lam=1.0, seed=0):
    b = base.numpy()
    W = []
    for i, (x, w, d, e) in enumerate(zip(xs, weights, densities, epsilons)):
        delta = x.numpy() - b
        if d < 1:
            keep, p = ref_keep_scale(delta, seed, i + 1, d, e)
            kept = delta * keep.astype(np.float32)
            if rescale:  # mergekit's rescale: back to the task vector's L1 norm (eps 1e-7)
                full, after = np.abs(delta).astype(np.float64).sum(), \
                    np.abs(kept).astype(np.float64).sum()
                if full >= 1e-7 and after >= 1e-7:
                    kept = kept * np.float32(full / after)
            delta = kept
        W.append(delta * np.float32(w) if w != 1 else delta)
    if consensus:
        s = np.where(sum(W) >= 0, 1.0, -1.0).astype(np.float32)
        agree = [np.maximum(w_i * s, 0) for w_i in W]
        delta = sum(agree)
        if normalize:
            D = sum(np.float32(w) * (a > 0) for w, a in zip(weights, agree))
            delta = delta / np.where(D == 0, 1.0, D).astype(np.float32)
        delta = delta * s
    else:
        delta = sum(W)
        if normalize:
            delta = delta / np.float32(sum(weights))
    return torch.from_numpy((b + np.float32(lam) * delta).astype(np.float32))


def family(seed=0, shape=(6, 10), n=3):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]


def test_golden_one_model_bit_exact():
    # u_0..u_7 / 2^24 of (seed 0, model 1, NAME): .326 .227 .306 .360 | .864 .378 .995 .350
    base = torch.zeros(2, 4)
    x = torch.tensor([[-0.1, 0.3, 0.2, 0.5], [4.0, 1.0, -3.0, 2.0]])
    out = run("della_linear", base, [x], [{"weight": 1.0, "density": 0.5, "epsilon": 0.2}])
    # p = [.3 .567 .433 .7 | .7 .3 .567 .433] → keep [0 1 1 1 | 0 0 0 1]; rescale: the kept
    # entries (0.3, 0.2, 0.5, 2.0: L1 3.0) scaled back to ‖δ‖₁ = 11.1, as mergekit rescales
    keep = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1]], dtype=F32)
    torch.testing.assert_close(out, x * keep * (11.1 / 3.0), rtol=1e-6, atol=0)
    no_scale = run("della_linear", base, [x], [{"weight": 1.0, "density": 0.5, "epsilon": 0.2}],
                   {"rescale": False})
    assert torch.equal(no_scale, x * keep)


@pytest.mark.parametrize("method, consensus, normalize", [("della", True, True),
                                                          ("della", True, False),
                                                          ("della_linear", False, False),
                                                          ("della_linear", False, True)])
def test_matches_reference(method, consensus, normalize):
    base, xs = family(1, shape=(8, 12))
    weights, densities, epsilons = [1.0, 0.6, 0.3], [0.5, 0.4, 1.0], [0.2, 0.1, 0.15]
    mp = [{"weight": w, "density": d, "epsilon": e}
          for w, d, e in zip(weights, densities, epsilons)]
    out = run(method, base, xs, mp, {"normalize": normalize, "lambda": 0.8})
    expected = ref_della(base, xs, weights, densities, epsilons, consensus=consensus,
                         normalize=normalize, lam=0.8)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_defaults():
    for name, normalize in (("della", True), ("della_linear", False)):
        d = {p.name: p.default for p in get_method(name).spec.params}
        assert (d["epsilon"], d["density"], d["normalize"], d["rescale"], d["lambda"]) == \
            (0.15, 1.0, normalize, True, 1.0)
    assert get_method("della").consensus and not get_method("della_linear").consensus


def test_identities():
    base, xs = family(2)
    ones = [{"weight": w, "density": 1.0, "epsilon": 0.5} for w in (1.0, 0.5, 0.25)]
    plain = [{"weight": w} for w in (1.0, 0.5, 0.25)]
    assert torch.equal(run("della_linear", base, xs, ones), run("task_arithmetic", base, xs, plain))
    # ε = 0: every p = d, the mask is DARE's (same key, same stream), rescaled by the L1 rule
    zero = [{"weight": w, "density": d, "epsilon": 0.0} for w, d in ((1, .5), (.5, .3), (1, .8))]
    l1 = {"rescale": "l1"}
    assert torch.equal(run("della_linear", base, xs, zero),
                       run("dare_linear", base, xs, zero, l1))
    assert torch.equal(run("della", base, xs, zero, {"normalize": True}),
                       run("dare_ties", base, xs, zero, {"normalize": True, **l1}))
    # models equal to the base: the base comes back
    same = [base.clone() for _ in xs]
    mp = [{"weight": 1.0, "density": 0.5, "epsilon": 0.1}] * 3
    for method in ("della", "della_linear"):
        assert torch.equal(run(method, base, same, mp), base)


@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("rescale", [True, "l1", False])
def test_blocking_threads_and_both_paths(method, rescale, monkeypatch):
    """The torch path (MERGEKIT_LIKE_FUSED=0) and the fused loops give the same bits for every
    blocking and thread count; the fused loops really run when on."""
    calls = []
    real = fused_cpu.merge_span
    monkeypatch.setattr(fused_cpu, "merge_span", lambda *a, **k: calls.append(1) or real(*a, **k))
    base, xs = family(3, shape=(37, 29))
    mp = [{"weight": 1.0, "density": 0.6, "epsilon": 0.3}, {"weight": 0.5, "density": 0.3},
          {"weight": 0.8, "density": 0.9, "epsilon": 0.05}]
    monkeypatch.setenv("MERGEKIT_LIKE_FUSED", "0")
    big = run(method, base, xs, mp, {"rescale": rescale}, seed=4)
    assert not calls
    for fused in ("0", "1"):
        monkeypatch.setenv("MERGEKIT_LIKE_FUSED", fused)
        for block_elems, workers in ((29, 1), (29 * 5, 2), (1000, 3)):
            small = run(method, base, xs, mp, {"rescale": rescale}, seed=4,
                        block_elems=block_elems, workers=workers)
            assert torch.equal(small.view(torch.int32), big.view(torch.int32))
    assert calls
    assert not torch.equal(run(method, base, xs, mp, {"rescale": rescale}, seed=5), big)


def test_mask_buffers_reused_across_tensors(monkeypatch):
    """The keep masks' buffers outlive a tensor (``_Della._masks``): a larger tensor's stale
    masks (one of them all True), reused for smaller tensors, change no bit (every entry is
    written), each model gets a buffer of its own, and the pool keeps one per model."""
    from mergekit_like.methods.della import _Della

    mp = [{"weight": 1.0, "density": 0.6, "epsilon": 0.3}, {"weight": 0.5, "density": 0.3},
          {"weight": 0.8, "density": 0.7, "epsilon": 0.05}]
    fams = [family(3, shape=shape) for shape in ((61, 40), (40, 40), (55, 40))]
    for method in ("della", "della_linear"):
        monkeypatch.setenv("MERGEKIT_LIKE_FUSED", "0")           # torch ranks, no buffers
        want = [run(method, base, xs, mp, seed=2) for base, xs in fams]
        monkeypatch.setenv("MERGEKIT_LIKE_FUSED", "1")
        pool = _Della._masks()
        pool.take(61 * 40, torch.bool).fill_(True)              # stale contents to overwrite
        pool.release()
        buffers = []
        for (base, xs), expected in zip(fams, want):
            got = run(method, base, xs, mp, seed=2, workers=2)
            assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
            assert len(pool._free) == 3 and not pool._lent
            buffers.append({b.data_ptr() for b in pool._free})
            assert len(buffers[-1]) == 3
        assert buffers[0] == buffers[1] == buffers[2]            # the first tensor's, reused


# ---- through the CLI: bad parameters -------------------------------------------------------

@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("della_fam")
    make_family(root, LlamaShape(vocab_size=64, hidden_size=32, intermediate_size=48,
                                 num_hidden_layers=2), n_finetunes=2)
    return root


def recipe(fam, method, density, epsilon):
    return {"merge_method": method, "base_model": str(fam / "base"),
            "models": [{"model": str(fam / "ft1"),
                        "parameters": {"weight": 1.0, "density": density, "epsilon": epsilon}},
                       {"model": str(fam / "ft2"), "parameters": {"weight": 1.0, "density": 0.5}}],
            "dtype": "float32"}


@pytest.mark.parametrize("density, epsilon", [(0.5, 0.5), (0.9, 0.1), (0.1, 0.2), (0.3, 0.7)])
@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_bad_epsilon(fam, tmp_path, capsys, method, density, epsilon):
    expect_merge_error(tmp_path, capsys, recipe(fam, method, density, epsilon), method,
                       "epsilon", "density ± epsilon")


def test_default_epsilon_refused_for_a_small_density(fam, tmp_path, capsys):
    doc = recipe(fam, "della", 0.1, 0.1)
    del doc["models"][0]["parameters"]["epsilon"]          # 0.15 > 0.1
    expect_merge_error(tmp_path, capsys, doc, "epsilon 0.15 with density 0.1")


def test_non_numeric_epsilon(fam, tmp_path, capsys):
    expect_merge_error(tmp_path, capsys, recipe(fam, "della", 0.5, "wide"), "epsilon")


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_rescale_true_is_mergekits_l1_rule(method):
    """mergekit rescales DELLA's kept task vector back to its L1 norm (not by 1/p per entry):
    `rescale: true` and `rescale: l1` give the same bits, and the kept task vector's L1 norm."""
    base, xs = family(3, shape=(8, 12))
    mp = [{"weight": 1.0, "density": 0.4, "epsilon": 0.2}]
    true_out = run(method, base, xs[:1], mp, {"normalize": False})
    assert torch.equal(true_out, run(method, base, xs[:1], mp, {"normalize": False,
                                                               "rescale": "l1"}))
    full = (xs[0] - base).abs().double().sum()
    torch.testing.assert_close((true_out - base).abs().double().sum(), full, rtol=1e-5, atol=0)
