"""nuslerp (docs/methods/nuslerp.md). Golden values are worked by hand from §1's equation (the
angles are π/2 and π/4, so the sines are exact constants) or come from ``ref_nuslerp`` in
tests/support/sphere.py (float64, one vector at a time)."""

from __future__ import annotations

import math

import pytest
import torch
from support.sphere import F32, merged, rand, ref_nuslerp, run_method, t32
from support.helpers import expect_merge_error, load_folder, small_family

from mergekit_like.kernels import tiling
from mergekit_like.ops.nuslerp import nuslerp, nuslerp_t, vector_layout

R2 = math.sqrt(0.5)
S8 = math.sin(math.pi / 8) / math.sin(math.pi / 4)       # t = 0.5 at θ = π/4


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return small_family(tmp_path_factory.mktemp("fam"), delta_scale=0.05)


V0 = [[1.0, 0.0], [1.0, 0.0]]
V1 = [[0.0, 1.0], [2.0, 0.0]]
GOLDEN = [
    # (w1, w2, v0, v1, params, expected)
    (1.0, 1.0, [1.0, 0.0], [0.0, 1.0], {}, [R2, R2]),
    (3.0, 1.0, [1.0, 0.0], [0.0, 1.0], {},                     # t = 0.25, θ = π/2
     [math.sin(3 * math.pi / 8), math.sin(math.pi / 8)]),
    (1.0, -1.0, [1.0, 0.0], [0.0, 1.0], {}, [R2, R2]),         # Σw = 0: t = 0.5 (mergekit)
    (1.0, 1.0, [1.0, 2.0], [2.0, 4.0], {}, [1.5, 3.0]),        # colinear: lerp
    (1.0, 1.0, V0, V1, {"nuslerp_flatten": False},             # rows: π/2 pair, colinear pair
     [[R2, R2], [1.5, 0.0]]),
    (1.0, 1.0, V0, V1, {"nuslerp_flatten": False, "nuslerp_row_wise": True},
     [[S8, R2], [3 * S8, 0.0]]),                               # columns: π/4 pair, 0 vs e1
    (1.0, 1.0, V0, V1, {"nuslerp_row_wise": True},             # flatten wins: whole tensor
     None),
]


@pytest.mark.parametrize("w1, w2, v0, v1, params, expected", GOLDEN)
def test_golden_values(w1, w2, v0, v1, params, expected):
    a, b = t32(v0), t32(v1)
    if expected is None:                                       # whole: cos = 2/√10
        theta = math.acos(2 / math.sqrt(10))
        c = math.sin(theta / 2) / math.sin(theta)
        expected = (c * (a.double() + b.double())).tolist()
    got = run_method("nuslerp", [a, b], [{"weight": w1}, {"weight": w2}], params)
    assert torch.allclose(got.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6)
    pure = nuslerp(nuslerp_t(w1, w2), a, b, row_wise=params.get("nuslerp_row_wise", False),
                   flatten=params.get("nuslerp_flatten", True))
    assert torch.equal(pure, got)


def test_golden_with_base():
    base, x0, x1 = t32([1.0, 1.0]), t32([2.0, 1.0]), t32([1.0, 2.0])   # task vectors e1, e2
    got = run_method("nuslerp", [x0, x1], [{"weight": 1.0}, {"weight": 1.0}], base=base)
    assert torch.allclose(got, t32([1 + R2, 1 + R2]), atol=1e-6)


@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 4), (9,)])
@pytest.mark.parametrize("params", [{}, {"nuslerp_flatten": False},
                                    {"nuslerp_flatten": False, "nuslerp_row_wise": True}])
@pytest.mark.parametrize("with_base", [False, True])
def test_matches_reference(shape, params, with_base):
    base = rand(shape, 1) if with_base else None
    x0 = rand(shape, 2) + (base if with_base else 0)
    x1 = rand(shape, 3) + (base if with_base else 0)
    got = run_method("nuslerp", [x0, x1], [{"weight": 0.3}, {"weight": 0.5}], params, base=base)
    want = ref_nuslerp(0.3, 0.5, x0, x1, row_wise=params.get("nuslerp_row_wise", False),
                       flatten=params.get("nuslerp_flatten", True), base=base)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("params", [{}, {"nuslerp_flatten": False},
                                    {"nuslerp_flatten": False, "nuslerp_row_wise": True}])
def test_blocked_equals_whole(params, monkeypatch):
    x0, x1 = rand((23, 11), 4), rand((23, 11), 5)
    mps = [{"weight": 0.7}, {"weight": 0.2}]
    whole = run_method("nuslerp", [x0, x1], mps, params)
    blocked = run_method("nuslerp", [x0, x1], mps, params, block_elems=7)
    monkeypatch.setattr(tiling, "PIECE", 4)
    pieced = run_method("nuslerp", [x0, x1], mps, params, block_elems=50)
    assert torch.equal(whole, blocked) and torch.equal(whole, pieced)


def test_layouts():
    assert vector_layout((4, 3), False, True) == "whole"
    assert vector_layout((4, 3), True, True) == "whole"
    assert vector_layout((4, 3), False, False) == "last"
    assert vector_layout((4, 3), True, False) == "first"
    assert vector_layout((4,), True, False) == "whole"


@pytest.mark.parametrize("params", [{}, {"nuslerp_flatten": False},
                                    {"nuslerp_flatten": False, "nuslerp_row_wise": True}])
def test_identities(params):
    x0, x1 = rand((6, 5), 6), rand((6, 5), 7)
    assert torch.equal(run_method("nuslerp", [x0, x1], [{"weight": 1.0}, {"weight": 0.0}],
                                  params), x0)                          # t = 0
    assert torch.equal(run_method("nuslerp", [x0, x1], [{"weight": 0.0}, {"weight": 2.0}],
                                  params), x1)                          # t = 1
    same = run_method("nuslerp", [x0, x0.clone()], [{"weight": 1.0}, {"weight": 3.0}], params)
    assert torch.allclose(same, x0, rtol=1e-6, atol=1e-7)               # equal models


def test_cli_with_base_matches_reference(fam, tmp_path, capsys):
    doc = {"merge_method": "nuslerp", "base_model": str(fam / "base"),
           "models": [{"model": str(fam / "ft1"), "parameters": {"weight": 0.4}},
                      {"model": str(fam / "ft2"), "parameters": {"weight": 0.6}}],
           "parameters": {"nuslerp_flatten": False}, "dtype": "float32"}
    out = merged(tmp_path, capsys, doc)
    base, ft1, ft2 = (load_folder(fam / n) for n in ("base", "ft1", "ft2"))
    for k in base:
        want = ref_nuslerp(0.4, 0.6, ft1[k], ft2[k], flatten=False, base=base[k])
        assert torch.allclose(out[k].double(), want, rtol=1e-5, atol=1e-6), k


def test_cli_one_model_is_copied(fam, tmp_path, capsys):
    out = merged(tmp_path, capsys, {"merge_method": "nuslerp", "dtype": "float32",
                                    "models": [{"model": str(fam / "ft1"),
                                                "parameters": {"weight": 1.0}}]})
    ft1 = load_folder(fam / "ft1")
    assert all(torch.equal(out[k], ft1[k]) and out[k].dtype == F32 for k in ft1)


def _doc(fam, models, base=None, **params):
    doc = {"merge_method": "nuslerp", "dtype": "float32",
           "models": [{"model": str(fam / m), "parameters": {"weight": 1.0}} for m in models]}
    if base:
        doc["base_model"] = str(fam / base)
    if params:
        doc["parameters"] = params
    return doc


@pytest.mark.parametrize("models, base, params, needles", [
    (["base", "ft1", "ft2"], None, {}, ("nuslerp merges exactly two models", "got 3")),
    (["ft1"], "base", {}, ("exactly two other models", "got 1")),
    (["base", "ft1"], "base", {}, ("can not be one of the two models",)),
    (["ft1", "ft2"], None, {"nuslerp_flatten": "yes"}, ("nuslerp_flatten",)),
    (["ft1", "ft2"], None, {"nuslerp_row_wise": 1.5}, ("nuslerp_row_wise",)),
])
def test_bad_recipes(fam, tmp_path, capsys, models, base, params, needles):
    expect_merge_error(tmp_path, capsys, _doc(fam, models, base, **params), *needles)


def test_weight_is_required(fam, tmp_path, capsys):
    doc = _doc(fam, ["ft1", "ft2"])
    del doc["models"][1]["parameters"]
    expect_merge_error(tmp_path, capsys, doc, "weight")
