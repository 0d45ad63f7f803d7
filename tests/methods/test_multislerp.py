"""multislerp (docs/methods/multislerp.md). Golden values are worked by hand from §1 (unit
vectors e1, e2: the mean direction and the weighted mean norm are plain fractions) or come
from ``ref_multislerp`` in tests/support/sphere.py (float64, element by element, the tangent vectors
formed explicitly)."""

from __future__ import annotations

import math

import pytest
import torch
from support.sphere import F32, SHAPE, merged, rand, ref_multislerp, run_method, t32
from support.helpers import expect_merge_error, load_folder

from mergekit_like.demo import make_family
from mergekit_like.errors import MergeError
from mergekit_like.kernels import tiling
from mergekit_like.ops.gram import gram
from mergekit_like.ops.multislerp import AntipodalError, multislerp, multislerp_coefficients

R2 = math.sqrt(0.5)
M = math.hypot(0.25, 0.75)


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    make_family(root, SHAPE, n_finetunes=3, dtype=torch.float32, delta_scale=0.05,
                shard_bytes=[None, 4_000, None, None])
    return root


GOLDEN = [
    # (xs, weights, params, expected)
    ([[1.0, 0.0], [0.0, 1.0]], [1.0, 1.0], {}, [R2, R2]),
    ([[2.0, 0.0], [0.0, 4.0]], [1.0, 3.0], {},                 # μ ∝ (¼, ¾), norm ¼·2 + ¾·4
     [3.5 * 0.25 / M, 3.5 * 0.75 / M]),
    ([[1.0, 0.0], [0.0, 1.0]], [1.0, 1.0], {"normalize_weights": False}, [2 * R2, 2 * R2]),
    ([[1.0, 0.0], [-3.0, 0.0]], [1.0, 1.0], {}, [-1.0, 0.0]),  # antipodal pair: lerp
    ([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [1.0, 1.0, 2.0], {},
     [(0.5 + 2 * R2 / 4 * 2) * R2] * 2),                       # symmetric: along (1, 1)
]


@pytest.mark.parametrize("xs, weights, params, expected", GOLDEN)
def test_golden_values(xs, weights, params, expected):
    ins = [t32(x) for x in xs]
    got = run_method("multislerp", ins, [{"weight": w} for w in weights], params)
    assert torch.allclose(got.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6)
    want = ref_multislerp(ins, weights, **params)
    assert torch.allclose(got.double(), want, atol=1e-6)


def test_golden_with_base():
    base = t32([1.0, 1.0])
    got = run_method("multislerp", [t32([2.0, 1.0]), t32([1.0, 2.0])],
                     [{"weight": 1.0}, {"weight": 1.0}], base=base)
    assert torch.allclose(got, t32([1 + R2, 1 + R2]), atol=1e-6)


@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 4), (9,)])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_base", [False, True])
def test_matches_reference(shape, normalize, with_base):
    base = rand(shape, 1) if with_base else None
    xs = [rand(shape, 2 + i) + (base if with_base else 0) for i in range(3)]
    weights = [0.5, 0.3, 0.9]
    got = run_method("multislerp", xs, [{"weight": w} for w in weights],
                     {"normalize_weights": normalize}, base=base)
    want = ref_multislerp(xs, weights, base=base, normalize_weights=normalize)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)
    pure = multislerp(xs, weights, base=base, normalize_weights=normalize)
    assert torch.equal(pure, got)


def test_blocked_equals_whole(monkeypatch):
    xs = [rand((23, 11), 4 + i) for i in range(3)]
    mps = [{"weight": 0.7}, {"weight": 0.2}, {"weight": 0.4}]
    whole = run_method("multislerp", xs, mps)
    blocked = run_method("multislerp", xs, mps, block_elems=7)
    monkeypatch.setattr(tiling, "PIECE", 4)
    pieced = run_method("multislerp", xs, mps, block_elems=50)
    assert torch.equal(whole, blocked) and torch.equal(whole, pieced)


def test_identities():
    x = rand((6, 5), 6)
    assert torch.equal(run_method("multislerp", [x], [{"weight": 0.3}]), x)   # one model
    same = run_method("multislerp", [x, x.clone(), x.clone()],
                      [{"weight": 1.0}, {"weight": 2.0}, {"weight": 0.5}])
    assert torch.allclose(same, x, rtol=1e-6, atol=1e-7)                      # equal models


def test_antipodal_three_models_is_an_error():
    xs = [t32([1.0, 0.0]), t32([-1.0, 0.0]), t32([0.0, 0.0])]
    with pytest.raises(AntipodalError):
        multislerp_coefficients(gram(xs), [1.0, 1.0, 1.0])
    with pytest.raises(MergeError, match="weighted sum of the unit input tensors is zero"):
        run_method("multislerp", xs, [{"weight": 1.0}] * 3)


def test_cli_with_base_matches_reference(fam, tmp_path, capsys):
    weights = [1.0, 0.5, 0.25]
    doc = {"merge_method": "multislerp", "base_model": str(fam / "base"),
           "models": [{"model": str(fam / f"ft{i + 1}"), "parameters": {"weight": w}}
                      for i, w in enumerate(weights)], "dtype": "float32"}
    out = merged(tmp_path, capsys, doc)
    base, *fts = (load_folder(fam / n) for n in ("base", "ft1", "ft2", "ft3"))
    for k in base:
        want = ref_multislerp([f[k] for f in fts], weights, base=base[k])
        assert torch.allclose(out[k].double(), want, rtol=1e-5, atol=1e-6), k
        assert out[k].dtype == F32


def _doc(fam, weights, **params):
    doc = {"merge_method": "multislerp", "dtype": "float32",
           "models": [{"model": str(fam / f"ft{i + 1}"), "parameters": {"weight": w}}
                      for i, w in enumerate(weights)]}
    if params:
        doc["parameters"] = params
    return doc


@pytest.mark.parametrize("weights, params, needles", [
    ([1.0, -1.0], {}, ("multislerp", "sum to 0", "normalize_weights")),
    ([1.0, 0.5], {"eps": -1e-3}, ("eps must be ≥ 0",)),
    ([1.0, 0.5], {"normalize_weights": "no"}, ("normalize_weights",)),
    ([1.0, 0.5], {"eps": "tiny"}, ("eps",)),
])
def test_bad_recipes(fam, tmp_path, capsys, weights, params, needles):
    expect_merge_error(tmp_path, capsys, _doc(fam, weights, **params), *needles)


def test_zero_weight_sum_allowed_without_normalisation(fam, tmp_path, capsys):
    out = merged(tmp_path, capsys, _doc(fam, [1.0, -1.0], normalize_weights=False))
    assert out


def test_weight_is_required(fam, tmp_path, capsys):
    doc = _doc(fam, [1.0, 1.0])
    del doc["models"][0]["parameters"]
    expect_merge_error(tmp_path, capsys, doc, "weight")


def test_cli_antipodal_three_models_leaves_nothing(tmp_path, capsys):
    """Task vectors d, −d and 0 with equal weights: the mean direction vanishes on every
    tensor, a merge-time error (exit 2, one line, nothing at OUT)."""
    from mergekit_like.demo import write_checkpoint

    base = {n: torch.zeros(s) for n, s in SHAPE.tensor_shapes().items()}  # ±d exact
    delta = {n: rand(t.shape, 40 + i, 0.1) for i, (n, t) in enumerate(base.items())}
    models = {"base": base, "up": {n: base[n] + delta[n] for n in base},
              "down": {n: base[n] - delta[n] for n in base}, "same": base}
    for name, tensors in models.items():
        write_checkpoint(tmp_path / "m" / name, tensors, SHAPE.config(torch.float32), None)
    doc = {"merge_method": "multislerp", "base_model": str(tmp_path / "m" / "base"),
           "models": [{"model": str(tmp_path / "m" / n), "parameters": {"weight": 1.0}}
                      for n in ("up", "down", "same")], "dtype": "float32"}
    expect_merge_error(tmp_path, capsys, doc, "multislerp", "weighted sum of the unit input")
