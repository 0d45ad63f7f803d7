"""karcher (docs/methods/karcher.md). Golden values are worked by hand from §1 (on a circle the
Karcher mean of directions is the mean of their angles) or come from ``ref_karcher`` in
tests/support/sphere.py (float64, element by element, mergekit's iteration written out)."""

from __future__ import annotations

import math

import pytest
import torch
from support.sphere import F32, merged, rand, ref_karcher, run_method, t32
from support.helpers import expect_merge_error, load_folder, small_family

from mergekit_like.kernels import tiling
from mergekit_like.ops.karcher import karcher

R2 = math.sqrt(0.5)


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return small_family(tmp_path_factory.mktemp("fam"), delta_scale=0.05)


GOLDEN = [
    # (xs, params, expected)
    ([[1.0, 0.0], [0.0, 1.0]], {}, [R2, R2]),
    ([[2.0, 0.0], [0.0, 4.0]], {}, [3 * R2, 3 * R2]),            # scale (2 + 4)/2
    ([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0]], {},                   # angles 0, 0, π/2 → π/6
     [5 / 3 * math.cos(math.pi / 6), 5 / 3 * math.sin(math.pi / 6)]),
    ([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]], {}, [4 / 3 * R2, 4 / 3 * R2]),  # zero tensor: scale only
    ([[1e-6, 0.0], [0.0, 1e-6]], {}, [0.0, 0.0]),                # every norm ≤ tol: zeros
    ([[1e-6, 0.0], [0.0, 1e-6]], {"tol": 1e-7}, [1e-6 * R2, 1e-6 * R2]),
]


@pytest.mark.parametrize("xs, params, expected", GOLDEN)
def test_golden_values(xs, params, expected):
    ins = [t32(x) for x in xs]
    got = run_method("karcher", ins, params=params)
    exp = torch.tensor(expected, dtype=torch.float64)
    assert torch.allclose(got.double(), exp, rtol=1e-5, atol=1e-12)
    assert torch.allclose(got.double(), ref_karcher(ins, **params), rtol=1e-5, atol=1e-12)


def test_all_small_gives_positive_zeros():
    got = run_method("karcher", [t32([-1e-6, 0.0]), t32([0.0, -1e-6])])
    assert torch.equal(got.view(torch.int32), torch.zeros(2, dtype=torch.int32))


@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 4), (9,)])
@pytest.mark.parametrize("params", [{}, {"max_iter": 1}, {"max_iter": 50, "tol": 1e-9}])
def test_matches_reference(shape, params):
    xs = [rand(shape, 2 + i) + 0.5 for i in range(3)]
    got = run_method("karcher", xs, params=params)
    assert torch.allclose(got.double(), ref_karcher(xs, **params), rtol=1e-5, atol=1e-6)
    assert torch.equal(karcher(xs, **params), got)


def test_iterations_matter():
    xs = [rand((4, 4), 10 + i) for i in range(3)]
    one = run_method("karcher", xs, params={"max_iter": 1})
    many = run_method("karcher", xs, params={"max_iter": 100, "tol": 1e-12})
    assert not torch.allclose(one, many, atol=1e-6)
    assert torch.allclose(many.double(), ref_karcher(xs, max_iter=100, tol=1e-12), atol=1e-6)


def test_blocked_equals_whole(monkeypatch):
    xs = [rand((23, 11), 4 + i) for i in range(3)]
    whole = run_method("karcher", xs)
    blocked = run_method("karcher", xs, block_elems=7)
    monkeypatch.setattr(tiling, "PIECE", 4)
    pieced = run_method("karcher", xs, block_elems=50)
    assert torch.equal(whole, blocked) and torch.equal(whole, pieced)


def test_identities():
    x = rand((6, 5), 6)
    assert torch.equal(run_method("karcher", [x]), x)                       # one model
    same = run_method("karcher", [x, x.clone(), x.clone()])
    assert torch.allclose(same, x, rtol=1e-6, atol=1e-7)                    # equal models


def test_cli_base_joins_as_an_input(fam, tmp_path, capsys):
    doc = {"merge_method": "karcher", "base_model": str(fam / "base"),
           "models": [{"model": str(fam / "ft1")}, {"model": str(fam / "ft2")}],
           "dtype": "float32"}
    out = merged(tmp_path, capsys, doc)
    base, ft1, ft2 = (load_folder(fam / n) for n in ("base", "ft1", "ft2"))
    for k in base:
        want = ref_karcher([ft1[k], ft2[k], base[k]])
        assert torch.allclose(out[k].double(), want, rtol=1e-5, atol=1e-6), k
        assert out[k].dtype == F32


def test_cli_one_model_is_copied(fam, tmp_path, capsys):
    out = merged(tmp_path, capsys, {"merge_method": "karcher", "dtype": "float32",
                                    "models": [{"model": str(fam / "ft1")}]})
    ft1 = load_folder(fam / "ft1")
    assert all(torch.equal(out[k], ft1[k]) for k in ft1)


@pytest.mark.parametrize("params, needles", [
    ({"max_iter": 0}, ("max_iter",)),
    ({"max_iter": 2.5}, ("max_iter",)),
    ({"tol": -1e-3}, ("tol must be ≥ 0",)),
    ({"tol": "small"}, ("tol",)),
    ({"t": 0.5}, ("t",)),
])
def test_bad_recipes(fam, tmp_path, capsys, params, needles):
    doc = {"merge_method": "karcher", "dtype": "float32", "parameters": params,
           "models": [{"model": str(fam / "ft1")}, {"model": str(fam / "ft2")}]}
    expect_merge_error(tmp_path, capsys, doc, *needles)
