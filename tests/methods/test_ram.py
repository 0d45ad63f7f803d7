"""ram and ramplus_tl (docs/methods/ram.md): golden values, identities, bad parameters. The
golden values are worked out by hand in docs/methods/ram.md §5; the reference is written out
here from the equations in float64 numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.stock_sce_ram import family, merge_one, recipe, t32
from support.helpers import expect_merge_error, load_folder, run_cli, write_recipe


def ref_ram(base, xs, eps=1e-5, r=None, alpha=None):
    """RAM (r None) or RAM+ tensor-local, per the equations."""
    b = base.astype(np.float64).reshape(-1)
    T = np.stack([x.astype(np.float64).reshape(-1) - b for x in xs])
    a = np.abs(T) > eps
    c = a.sum(axis=0)
    lam = np.ones(len(xs))
    if r is not None:
        shared, unique = (a & (c > 1)).sum(axis=1), (a & (c == 1)).sum(axis=1)
        rho = shared / np.maximum(unique, eps)
        lam = np.where(unique > 0, 1 + r * np.clip(rho, 0, alpha), 1.0)
    Z = T * a
    delta = (Z * (c == 1) * lam[:, None]).sum(axis=0) + (Z * (c > 1)).sum(axis=0) / np.maximum(c, 1)
    return (b + delta).reshape(base.shape)


B0 = [0.0] * 6
XS = [[0.5, 0.05, 0.2, 0.0, -0.3, 0.1],
      [0.5, 0.0, -0.4, 0.0, 0.3, 0.2],
      [0.0, 0.0, 0.6, 0.05, 0.0, 0.1]]
RAM_WANT = [0.5, 0.0, 0.4 / 3, 0.0, 0.0, 0.2]


def test_golden_ram():
    """ε = 0.1: counts (2, 0, 3, 0, 2, 1); 0.05 and 0.1 are not changes."""
    out = merge_one("ram", t32(B0), [t32(x) for x in XS], {"epsilon": 0.1})
    torch.testing.assert_close(out, t32(RAM_WANT), rtol=0, atol=1e-7)


@pytest.mark.parametrize("r, alpha, last", [
    (0.1, 0.2, 0.2 * 1.02),        # defaults: ρ_2 = 3/1 clamped to 0.2
    (0.5, 5.0, 0.2 * 2.5),         # ρ_2 = 3 inside the clamp
    (0.0, 0.2, 0.2),               # r = 0: RAM
])
def test_golden_ramplus(r, alpha, last):
    """Only model 2 has a unique entry (entry 5); shared counts (3, 3, 1), unique (0, 1, 0)."""
    out = merge_one("ramplus_tl", t32(B0), [t32(x) for x in XS],
                    {"epsilon": 0.1, "r": r, "alpha": alpha})
    torch.testing.assert_close(out, t32(RAM_WANT[:5] + [last]), rtol=0, atol=1e-7)


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_blocks_give_the_same_bits(method):
    g = torch.Generator().manual_seed(7)
    b = torch.randn(13, 6, generator=g)
    xs = [b + torch.where(torch.rand(13, 6, generator=g) < 0.4, 0.1, 0.0)
          * torch.randn(13, 6, generator=g) for _ in range(3)]
    whole = merge_one(method, b, xs, {"epsilon": 1e-3})
    assert torch.equal(merge_one(method, b, xs, {"epsilon": 1e-3}, block_elems=12), whole)
    params = {"epsilon": 1e-3} if method == "ram" else {"epsilon": 1e-3, "r": 0.4, "alpha": 0.7}
    want = ref_ram(b.numpy(), [x.numpy() for x in xs], 1e-3,
                   *((None, None) if method == "ram" else (0.4, 0.7)))
    np.testing.assert_allclose(merge_one(method, b, xs, params).numpy(), want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_identities(method):
    b, x = t32([1.0, 2.0, -3.0, 0.5]), t32([1.5, 2.0, -3.25, 0.5000001])
    small = t32([1.5, 2.0, -3.25, 0.5])                       # δ = 1.19e-7 ≤ ε is dropped
    assert torch.equal(merge_one(method, b, [x]), small)      # one model: its changes
    assert torch.equal(merge_one(method, b, [x, x.clone()]), small)   # equal: their mean
    assert torch.equal(merge_one(method, b, [b.clone(), b.clone()]), b)


def test_ramplus_zero_epsilon_and_an_unchanged_model_stay_finite():
    """ε = 0 and a model equal to the base: mergekit's 0/0 ratio would make every entry NaN;
    its λ multiplies nothing, so we use 1 (docs/methods/ram.md §4)."""
    b, x = t32([1.0, 2.0, -3.0]), t32([1.5, 2.0, -3.25])
    out = merge_one("ramplus_tl", b, [x, b.clone()], {"epsilon": 0.0})
    assert torch.equal(out, x)


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_merge_matches_reference(method, tmp_path, capsys):
    fam = family(tmp_path / "fam")
    out = tmp_path / "out"
    params = {"epsilon": 0.008} if method == "ram" else {"epsilon": 0.008, "r": 0.5, "alpha": 1.0}
    rec = write_recipe(tmp_path / "r.yml", recipe(method, fam, params=params))
    code, _, err = run_cli(["merge", rec, out, "-q"], capsys)
    assert code == 0, err
    got, models = load_folder(out), {k: load_folder(v) for k, v in fam.items()}
    r, alpha = (None, None) if method == "ram" else (0.5, 1.0)
    for name, b in models["base"].items():
        want = ref_ram(b.numpy(), [models[f"ft{i}"][name].numpy() for i in (1, 2, 3)],
                       0.008, r, alpha)
        np.testing.assert_allclose(got[name].numpy(), want, rtol=0, atol=2e-6, err_msg=name)


@pytest.mark.parametrize("method, params, needle", [
    ("ram", {"epsilon": "small"}, "epsilon"),
    ("ram", {"r": 0.1}, "r"),
    ("ramplus_tl", {"alpha": True}, "alpha"),
    ("ramplus_tl", {"lambda": 2.0}, "lambda"),
])
def test_bad_parameters(tmp_path, capsys, method, params, needle):
    fam = family(tmp_path / "fam")
    expect_merge_error(tmp_path, capsys, recipe(method, fam, params=params), needle)
