"""model_stock (docs/methods/model_stock.md): golden values, identities, bad parameters.
References are written out here from the equations, in float64 numpy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from support.stock_sce_ram import family, merge_one, recipe, rewrite, t32
from support.helpers import expect_merge_error, load_folder, run_cli, write_recipe


def ref_model_stock(base: np.ndarray, xs: list[np.ndarray], filter_wise=False) -> np.ndarray:
    b = base.astype(np.float64)
    ws = [x.astype(np.float64) for x in xs]
    rows = (lambda a: a.reshape(1, -1)) if not filter_wise or b.ndim < 2 else \
        (lambda a: a.reshape(-1, a.shape[-1]))
    deltas = [rows(w - b) for w in ws]
    cos = []
    for a, c in itertools.combinations(deltas, 2):
        norm = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(c, axis=1), 1e-6)
        cos.append(np.clip((a * c).sum(axis=1) / norm, -1, 1))
    c = np.mean(cos, axis=0)[:, None]
    n = len(ws)
    t = n * c / (1 + (n - 1) * c)
    avg = rows(sum(ws) / n)
    return (t * avg + (1 - t) * rows(b)).reshape(b.shape)


B = [[1.0, 2.0], [3.0, 4.0]]
X1 = [[2.0, 2.0], [4.0, 4.0]]      # δ1 = [[1, 0], [1, 0]]
X2 = [[1.0, 3.0], [4.0, 4.0]]      # δ2 = [[0, 1], [1, 0]]


def test_golden_two_models_per_tensor():
    """cos = 1/2 over the whole tensor: t = 2·½ / (1 + ½) = 2/3, out = b + t·mean(δ)."""
    out = merge_one("model_stock", t32(B), [t32(X1), t32(X2)])
    want = [[1 + 1 / 3, 2 + 1 / 3], [3 + 2 / 3, 4.0]]
    torch.testing.assert_close(out, t32(want), rtol=0, atol=1e-6)


def test_golden_two_models_filter_wise():
    """Row 0: orthogonal δ rows, cos 0, t = 0 (the base row); row 1: equal rows, t = 1."""
    out = merge_one("model_stock", t32(B), [t32(X1), t32(X2)], {"filter_wise": True})
    torch.testing.assert_close(out, t32([[1.0, 2.0], [4.0, 4.0]]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(5, 7), (7,), (2, 3, 4)])
def test_three_models_match_reference(filter_wise, shape):
    g = torch.Generator().manual_seed(3)
    b = torch.randn(shape, generator=g)
    xs = [b + 0.1 * torch.randn(shape, generator=g) + 0.05 for _ in range(3)]
    out = merge_one("model_stock", b, xs, {"filter_wise": filter_wise})
    want = ref_model_stock(b.numpy(), [x.numpy() for x in xs], filter_wise)
    np.testing.assert_allclose(out.numpy(), want, rtol=0, atol=2e-6)


def test_equal_models_give_the_model_and_unchanged_models_the_base():
    x = t32([[0.3, -1.25], [2.5, 7.0]])
    assert torch.equal(merge_one("model_stock", t32(B), [x, x.clone()]), x)    # cos 1, t 1
    b = t32(B)
    assert torch.equal(merge_one("model_stock", b, [b.clone(), b.clone()]), b)  # cos 0, t 0


def test_one_zero_task_vector_counts_as_orthogonal():
    """‖δ‖ = 0: the clamped norm product gives cos 0, so N = 2 gives t = 0 (the base)."""
    b = t32(B)
    out = merge_one("model_stock", b, [b.clone(), t32(X1)])
    assert torch.equal(out, b)


def test_merge_matches_reference(tmp_path, capsys):
    fam = family(tmp_path / "fam")
    out = tmp_path / "out"
    rec = write_recipe(tmp_path / "r.yml", recipe("model_stock", fam, params={"filter_wise": True}))
    code, _, err = run_cli(["merge", rec, out, "-q"], capsys)
    assert code == 0, err
    got, models = load_folder(out), {k: load_folder(v) for k, v in fam.items()}
    for name, b in models["base"].items():
        want = ref_model_stock(b.numpy(), [models[f"ft{i}"][name].numpy() for i in (1, 2, 3)],
                               filter_wise=True)
        np.testing.assert_allclose(got[name].numpy(), want, rtol=0, atol=2e-6, err_msg=name)


def test_one_model_is_refused(tmp_path, capsys):
    fam = family(tmp_path / "fam", n_finetunes=1)
    expect_merge_error(tmp_path, capsys, recipe("model_stock", fam, names=("ft1",)),
                       "model_stock", "at least 2")


@pytest.mark.parametrize("params, needle", [
    ({"filter_wise": "yes"}, "filter_wise"),
    ({"t": 0.5}, "t"),
])
def test_bad_parameters(tmp_path, capsys, params, needle):
    fam = family(tmp_path / "fam")
    expect_merge_error(tmp_path, capsys, recipe("model_stock", fam, params=params), needle)


def test_cancelling_task_vectors_are_refused(tmp_path, capsys):
    """δ2 = −δ1 with N = 2: 1 + (N−1)·cos = 0, t undefined (mergekit writes NaN)."""
    fam = family(tmp_path / "fam", n_finetunes=2)
    ft1 = load_folder(fam["ft1"])
    rewrite(fam["base"], lambda k, t: torch.zeros_like(t))
    rewrite(fam["ft2"], lambda k, t: -ft1[k])
    expect_merge_error(tmp_path, capsys, recipe("model_stock", fam, names=("ft1", "ft2")),
                       "model_stock", "cancel")
