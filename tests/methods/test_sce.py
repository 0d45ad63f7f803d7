"""sce (docs/methods/sce.md): golden values, identities, bad parameters. The golden values are
worked out by hand in docs/methods/sce.md §5; the reference is written out here from the
equations in float64 numpy."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from support.stock_sce_ram import family, merge_one, recipe, t32
from support.helpers import expect_merge_error, load_folder, run_cli, write_recipe


def ref_sce(base: np.ndarray, xs: list[np.ndarray], topk: float = 1.0) -> np.ndarray:
    b = base.astype(np.float64)
    T = np.stack([x.astype(np.float64) - b for x in xs]).reshape(len(xs), -1)
    if topk < 1:
        var = T.var(axis=0)
        k = int(np.float32(np.count_nonzero(var)) * np.float32(topk)) if topk > 0 else 0
        keep = np.zeros(var.size, bool)
        keep[np.argsort(-var, kind="stable")[:k]] = True
        T = T * keep
    s = (T ** 2).mean(axis=1)
    w = np.full(len(xs), 1 / len(xs)) if abs(s.sum()) < 1e-6 else s / s.sum()
    elected = np.where(T.sum(axis=0) >= 0, 1.0, -1.0)
    e = w[:, None] * (np.sign(T) == elected)
    return (b.reshape(-1) + (T * e).sum(axis=0) / np.maximum(e.sum(axis=0), 1e-6)).reshape(b.shape)


B0 = [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
X1 = [[1.0, -2.0, 0.0], [3.0, 0.5, 0.0]]
X2 = [[1.0, 2.0, -1.0], [1.0, 0.0, 0.0]]


def test_golden_no_select():
    """w = (57/85, 28/85); entry 3 = (3·57 + 1·28)/85; entry 5: nobody agrees → 0."""
    out = merge_one("sce", t32(B0), [t32(X1), t32(X2)])
    want = [[1.0, 2.0, -1.0], [float(Fraction(199, 85)), 0.5, 0.0]]
    torch.testing.assert_close(out, t32(want), rtol=0, atol=1e-6)


def test_golden_select_half():
    """Variances (0, 4, 0.25, 1, 0.0625, 0): 4 non-zero, k = 2 keeps entries 1 and 3;
    w = (13/18, 5/18); entry 1: only model 2 agrees; entry 3 = (3·13 + 5)/18 = 22/9."""
    out = merge_one("sce", t32(B0), [t32(X1), t32(X2)], {"select_topk": 0.5})
    want = [[0.0, 2.0, 0.0], [float(Fraction(22, 9)), 0.0, 0.0]]
    torch.testing.assert_close(out, t32(want), rtol=0, atol=1e-6)


@pytest.mark.parametrize("topk", [1.0, 0.3, 0.0])
@pytest.mark.parametrize("shape", [(6, 5), (9,)])
def test_three_models_match_reference(topk, shape):
    g = torch.Generator().manual_seed(5)
    b = torch.randn(shape, generator=g)
    xs = [b + 0.1 * torch.randn(shape, generator=g) for _ in range(3)]
    out = merge_one("sce", b, xs, {"select_topk": topk})
    want = ref_sce(b.numpy(), [x.numpy() for x in xs], topk)
    np.testing.assert_allclose(out.numpy(), want, rtol=0, atol=2e-6)


def test_one_model_gives_the_model():
    b, x = t32([1.0, 2.0, -3.0, 0.5]), t32([1.5, 2.0, -3.25, 0.0])
    assert torch.equal(merge_one("sce", b, [x]), x)


def test_equal_models():
    """select_topk 1: the model itself; select_topk < 1: zero variance everywhere, k = 0,
    so every task vector is erased and the base comes back (as in mergekit)."""
    b, x = t32([1.0, 2.0, -3.0, 0.5]), t32([1.5, 2.0, -3.25, 0.0])
    assert torch.equal(merge_one("sce", b, [x, x.clone()]), x)
    assert torch.equal(merge_one("sce", b, [x, x.clone()], {"select_topk": 0.9}), b)


def test_merge_matches_reference(tmp_path, capsys):
    fam = family(tmp_path / "fam")
    out = tmp_path / "out"
    rec = write_recipe(tmp_path / "r.yml", recipe("sce", fam, params={"select_topk": 0.4}))
    code, _, err = run_cli(["merge", rec, out, "-q"], capsys)
    assert code == 0, err
    got, models = load_folder(out), {k: load_folder(v) for k, v in fam.items()}
    for name, b in models["base"].items():
        want = ref_sce(b.numpy(), [models[f"ft{i}"][name].numpy() for i in (1, 2, 3)], 0.4)
        np.testing.assert_allclose(got[name].numpy(), want, rtol=0, atol=2e-6, err_msg=name)


@pytest.mark.parametrize("params, needle", [
    ({"select_topk": 1.5}, "select_topk"),
    ({"select_topk": "half"}, "select_topk"),
    ({"density": 0.5}, "density"),
])
def test_bad_parameters(tmp_path, capsys, params, needle):
    fam = family(tmp_path / "fam")
    expect_merge_error(tmp_path, capsys, recipe("sce", fam, params=params), needle)


def test_needs_a_base(tmp_path, capsys):
    fam = family(tmp_path / "fam")
    doc = recipe("sce", fam)
    del doc["base_model"]
    expect_merge_error(tmp_path, capsys, doc, "base_model")
