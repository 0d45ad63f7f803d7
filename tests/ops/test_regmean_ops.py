"""RegMean's equation (ops/regmean.py, docs/methods/regmean.md §1) against values computed here
independently: least squares on the stacked inputs, the mean, the per-column diagonal variant,
and the ridge fallback of a singular Gram sum."""

from __future__ import annotations

import torch

from mergekit_like.ops.regmean import reduce_non_diagonal, regmean_solve


def _models(seed: int, n_models: int = 3, d_in: int = 6, d_out: int = 4, tokens: int = 20):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(tokens + 3 * i, d_in, generator=gen, dtype=torch.float64)
          for i in range(n_models)]
    ws = [torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) for _ in range(n_models)]
    grams = [x.T @ x / len(x) for x in xs]
    return xs, ws, grams


def test_alpha_one_is_least_squares_on_the_stacked_inputs():
    xs, ws, grams = _models(0)
    # min_W Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖² / T_i: rows of model i scaled by 1/√T_i, one lstsq
    a = torch.cat([x / len(x) ** 0.5 for x in xs])
    b = torch.cat([x @ w.T / len(x) ** 0.5 for x, w in zip(xs, ws)])
    want = torch.linalg.lstsq(a, b).solution.T
    got = regmean_solve(ws, grams, 1.0)
    assert got.jitter == 0.0
    torch.testing.assert_close(got.weight, want, rtol=1e-10, atol=1e-10)


def test_identical_grams_give_the_mean():
    _, ws, grams = _models(1)
    got = regmean_solve(ws, [grams[0]] * len(ws), 0.7).weight
    torch.testing.assert_close(got, torch.stack(ws).mean(0), rtol=1e-10, atol=1e-12)


def test_alpha_zero_is_the_per_column_weighted_mean():
    _, ws, grams = _models(2)
    want = torch.empty_like(ws[0])
    for k in range(ws[0].shape[1]):
        d = [g[k, k] for g in grams]
        want[:, k] = sum(dk * w[:, k] for dk, w in zip(d, ws)) / sum(d)
    torch.testing.assert_close(regmean_solve(ws, grams, 0.0).weight, want, rtol=1e-12, atol=1e-12)


def test_reduce_non_diagonal_keeps_the_diagonal():
    g = torch.tensor([[4.0, 2.0], [2.0, 3.0]])
    assert reduce_non_diagonal(g, 0.25).tolist() == [[4.0, 0.5], [0.5, 3.0]]


def test_a_direction_no_input_reached_falls_back_to_the_mean_there():
    xs, ws, _ = _models(3, d_in=5)
    for x in xs:
        x[:, 2] = 0.0                              # input feature 2 never active in any model
    grams = [x.T @ x / len(x) for x in xs]
    got = regmean_solve(ws, grams, 1.0)
    assert got.jitter > 0.0
    mean = torch.stack(ws).mean(0)
    torch.testing.assert_close(got.weight[:, 2], mean[:, 2], rtol=1e-9, atol=1e-9)
    # the rest stays (nearly) the least-squares fit of the reachable features
    keep = [0, 1, 3, 4]
    a = torch.cat([x[:, keep] / len(x) ** 0.5 for x in xs])
    b = torch.cat([x @ w.T / len(x) ** 0.5 for x, w in zip(xs, ws)])
    want = torch.linalg.lstsq(a, b).solution.T
    torch.testing.assert_close(got.weight[:, keep], want, rtol=1e-4, atol=1e-4)
