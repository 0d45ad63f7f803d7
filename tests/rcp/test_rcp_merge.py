"""`merge_method: rcp` and `rcp_approx` end to end (docs/methods/rcp.md §1, §2, §8, §7): the merged weights
against an in-test float32 computation from the votes folder, λ = ∞ / λ = 0 limits, the output
folder (report, card, config) and every bad recipe."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from support.rcp_fixture import family, importance

from support.helpers import expect_merge_error as expect_error
from support.helpers import config_of, load_folder, run_cli, write_recipe
from mergekit_like.rcp.approx import approx_mask, normalized
from mergekit_like.rcp.folder import write_importance


class _NoCapture:
    """Stands in for capsys in module-scoped fixtures (run_cli only calls readouterr)."""

    def readouterr(self):
        return SimpleNamespace(out="", err="")


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("rcp_fam")
    base, reasoning, domain = family(root)
    cfg = config_of(reasoning)
    cfg["rcp_test_marker"] = 1              # config.json must come from the reasoning model
    (reasoning / "config.json").write_text(json.dumps(cfg))
    return SimpleNamespace(root=root, base=base, reasoning=reasoning, domain=domain,
                           pre=load_folder(base), r=load_folder(reasoning), t=load_folder(domain))


@pytest.fixture(scope="module")
def votes(fam, tmp_path_factory):
    """Votes at λ = 1e3 and ∞ (zero_grad merge): root/votes_1e3, root/votes_inf, root/fisher."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("rcp_votes")
    importance(root, fam.base, fam.reasoning, fam.domain, ["1e3", "inf"], _NoCapture())
    return root


def recipe(fam, method="rcp", importance=None, params=None, domain_extra=None):
    domain = {"role": "domain", **({"importance": str(importance)} if importance else {}),
              **(domain_extra or {})}
    return {"merge_method": method, "base_model": str(fam.base),
            "models": [{"model": str(fam.reasoning), "parameters": {"role": "reasoning"}},
                       {"model": str(fam.domain), "parameters": domain}],
            "parameters": params or {}}


def merge(tmp_path, capsys, doc, name="OUT"):
    out = tmp_path / name
    code, _, err = run_cli(["merge", write_recipe(tmp_path / f"{name}.yml", doc), out, "-q"],
                           capsys)
    assert code == 0, err
    return out


def hand_votes(folder, fam, fill, lam="0.0", zero_grad="merge", drop=None, reshape=None):
    tensors = {n: torch.full(x.shape, fill, dtype=torch.int8) for n, x in fam.t.items()
               if n != drop}
    if reshape:
        tensors[reshape] = tensors[reshape].reshape(-1)[:-1].clone()
    meta = {"kind": "rcp_votes", "penalty_lambda": lam, "zero_grad": zero_grad,
            "n_examples": str(abs(fill))}
    return write_importance(folder, tensors, metadata=meta, info={}, overwrite=False)


# ---- 1. rcp end to end against the votes -----------------------------------------------------

@pytest.mark.parametrize("threshold, scale", [(0.0, 1.0), (1.0, 1.0), (0.0, 0.5)])
def test_rcp_merges_the_domain_delta_exactly_where_votes_pass(fam, votes, tmp_path, capsys,
                                                               threshold, scale):
    v = load_folder(votes / "votes_1e3")
    params = {"penalty_lambda": 1000.0, "vote_threshold": threshold, "domain_scale": scale}
    got = load_folder(merge(tmp_path, capsys, recipe(fam, importance=votes / "votes_1e3",
                                                     params=params)))
    assert set(got) == set(fam.r) == set(v)
    n_sel = n_all = 0
    for n, out in got.items():
        r, t, pre = fam.r[n], fam.t[n], fam.pre[n]
        assert out.dtype == torch.float32 and out.shape == r.shape
        m = v[n] > threshold
        assert torch.equal(out[~m], r[~m]), n                 # unselected: θ_r bit for bit
        delta = t - pre
        if scale != 1.0:
            delta = delta * scale
        want = r + delta                                       # the same float32 ops as the code
        assert torch.equal(out[m], want[m]), n
        assert not torch.equal(out[m], r[m]) or not m.any()
        n_sel += int(m.sum())
        n_all += m.numel()
    assert 0 < n_sel < n_all                                   # a real mix, not all/none
    if threshold == 1.0:
        assert n_sel < sum(int((x > 0).sum()) for x in v.values())


# ---- 2. and 3. the λ limits ------------------------------------------------------------------

def test_infinite_lambda_with_keep_is_the_reasoning_model(fam, tmp_path, capsys):
    pytest.importorskip("transformers")
    importance(tmp_path, fam.base, fam.reasoning, fam.domain, ["inf"], capsys, zero_grad="keep")
    v = load_folder(tmp_path / "votes_inf")
    assert all(int((x > 0).sum()) == 0 for x in v.values())
    got = load_folder(merge(tmp_path, capsys, recipe(
        fam, importance=tmp_path / "votes_inf",
        params={"penalty_lambda": math.inf, "zero_grad": "keep"})))
    assert set(got) == set(fam.r)
    for n, out in got.items():
        assert torch.equal(out, fam.r[n]), n


def test_zero_lambda_with_negative_sensitivity_is_task_arithmetic(fam, tmp_path, capsys):
    folder = hand_votes(tmp_path / "votes_0", fam, 3)
    got = load_folder(merge(tmp_path, capsys, recipe(fam, importance=folder,
                                                     params={"penalty_lambda": 0.0})))
    ta = {"merge_method": "task_arithmetic", "base_model": str(fam.base),
          "models": [{"model": str(fam.reasoning), "parameters": {"weight": 1.0}},
                     {"model": str(fam.domain), "parameters": {"weight": 1.0}}],
          "parameters": {"lambda": 1.0}}
    want_ta = load_folder(merge(tmp_path, capsys, ta, name="TA"))
    assert set(got) == set(fam.r) == set(want_ta)
    for n, out in got.items():
        assert torch.equal(out, fam.r[n] + (fam.t[n] - fam.pre[n])), n
        torch.testing.assert_close(out, want_ta[n], rtol=0, atol=1e-6)


# ---- 4. the output folder --------------------------------------------------------------------

def test_report_card_and_config(fam, votes, tmp_path, capsys):
    out = tmp_path / "OUT"
    code, _, err = run_cli(["merge", write_recipe(tmp_path / "OUT.yml", recipe(
        fam, importance=votes / "votes_1e3")), out, "-q"], capsys)
    assert code == 0, err
    v = load_folder(votes / "votes_1e3")
    report = json.loads((out / "rcp_report.json").read_text())
    assert set(report["tensors"]) == set(v)
    sel = {n: int((x > 0).sum()) for n, x in v.items()}
    frac = sum(sel.values()) / sum(x.numel() for x in v.values())
    assert report["selected_fraction"] == pytest.approx(frac, abs=1e-12)
    for n, x in v.items():
        assert report["tensors"][n]["selected_fraction"] == pytest.approx(sel[n] / x.numel(),
                                                                          abs=1e-12), n
    kinds = {"q", "k", "v", "o", "gate", "up", "down", "norm", "embeddings", "lm_head"}
    assert set(report["selected_by_module"]) == kinds
    q = [n for n in v if "q_proj" in n]
    assert report["selected_by_module"]["q"] == pytest.approx(
        sum(sel[n] for n in q) / sum(v[n].numel() for n in q), abs=1e-12)
    assert float(report["penalty_lambda"]) == 1000.0
    card = (out / "README.md").read_text()
    assert "RCP-Merging" in _title(card) and "not RCP-Merging" not in card
    assert f"{frac:.2%}" in card
    assert f"rcp: domain delta added to {frac:.2%} of the weights" in err  # logged at the end
    cfg = config_of(out)
    assert cfg.get("rcp_test_marker") == 1 and "rcp_test_marker" not in config_of(fam.base)


# ---- 5. bad input ----------------------------------------------------------------------------



def _bad(fam, votes, tmp_path, case):
    good = votes / "votes_1e3"
    doc = recipe(fam, importance=good, params={"penalty_lambda": 1000.0})
    name = "model.layers.1.mlp.up_proj.weight"
    if case == "no_base":
        del doc["base_model"]
        return doc, ["base_model"]
    if case == "two_reasoning":
        doc["models"][1]["parameters"]["role"] = "reasoning"
        return doc, ["role", "reasoning"]
    if case == "no_role":
        del doc["models"][0]["parameters"]["role"]
        return doc, ["models[0]", "role"]
    if case == "no_importance":
        del doc["models"][1]["parameters"]["importance"]
        return doc, ["models[1]", "importance"]
    if case == "missing_folder":
        doc["models"][1]["parameters"]["importance"] = str(tmp_path / "nope")
        return doc, [str(tmp_path / "nope")]
    if case == "fisher_folder":
        doc["models"][1]["parameters"]["importance"] = str(votes / "fisher")
        return doc, [str(votes / "fisher"), "rcp_fisher"]
    if case == "lambda_mismatch":
        doc["parameters"]["penalty_lambda"] = 1e6
        return doc, ["penalty_lambda", str(good)]
    if case == "zero_grad_mismatch":
        doc["parameters"]["zero_grad"] = "keep"
        return doc, ["zero_grad", "keep", str(good)]
    if case == "missing_tensor":
        folder = hand_votes(tmp_path / "v_missing", fam, 3, lam="1000.0", drop=name)
        doc["models"][1]["parameters"]["importance"] = str(folder)
        return doc, [str(folder), name]
    if case == "wrong_shape":
        folder = hand_votes(tmp_path / "v_shape", fam, 3, lam="1000.0", reshape=name)
        doc["models"][1]["parameters"]["importance"] = str(folder)
        return doc, [str(folder), name, "shape"]
    if case == "importance_on_reasoning":
        doc["models"][0]["parameters"]["importance"] = str(good)
        return doc, ["models[0]", "importance", "reasoning"]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["no_base", "two_reasoning", "no_role", "no_importance",
                                  "missing_folder", "fisher_folder", "lambda_mismatch",
                                  "zero_grad_mismatch", "missing_tensor", "wrong_shape",
                                  "importance_on_reasoning"])
def test_bad_recipe(fam, votes, tmp_path, capsys, case):
    doc, needles = _bad(fam, votes, tmp_path, case)
    expect_error(tmp_path, capsys, doc, *needles)


# ---- 6. rcp_approx (§6) ----------------------------------------------------------------------

def test_approx_mask_by_hand():
    pre = torch.tensor([0.5, -1.0, 0.25, 2.0])
    t = pre + torch.tensor([2.0, -4.0, 0.0, 2.0])            # |δ_t| = [2, 4, 0, 2], mean 2
    r = pre + torch.tensor([0.0, 3.0, -3.0, 6.0])            # |θ_r − θ_pre| mean 3
    # L = (θ_r − θ_t)² = [4, 49, 9, 16], mean 19.5; I_t = [1, 2, 0, 1]
    # λ'·I_r·D̃ = λ'·[0, 49, 9, 32]/19.5 = λ'·[0, 2.513, 0.462, 1.641]
    means = (2.0, 3.0, 19.5)
    m, i_t = approx_mask(r, t, pre, means, 1.0)
    assert i_t.tolist() == [1.0, 2.0, 0.0, 1.0]
    assert m.tolist() == [True, False, False, False]
    m, _ = approx_mask(r, t, pre, means, 0.5)
    assert m.tolist() == [True, True, False, True]
    m, _ = approx_mask(r, t, pre, means, 0.0)
    assert m.tolist() == [True, True, True, True]
    # 0/0 := 0
    assert normalized(torch.zeros(3), 0.0).tolist() == [0.0, 0.0, 0.0]
    assert normalized(torch.tensor([1.0, 3.0]), 2.0).tolist() == [0.5, 1.5]
    m, i_t = approx_mask(r, pre.clone(), pre, (0.0, 3.0, float((r - pre).square().mean())), 1.0)
    assert i_t.tolist() == [0.0] * 4 and not i_t.isnan().any()
    assert m.tolist() == [True, False, False, False]          # only where θ_r = θ_pre too
    same = torch.ones(4)
    m, i_t = approx_mask(same, same.clone(), same, (0.0, 0.0, 0.0), 1.0)
    assert m.all() and not i_t.isnan().any()


def _expected_approx_mask(r, t, pre, lam, density):
    """docs/methods/rcp.md §8 written out independently: float32 tensors, float64 means."""
    d_t, d_r, L = (t - pre).abs(), (r - pre).abs(), (r - t).square()
    mean = [float(x.double().mean()) for x in (d_t, d_r, L)]
    i_t, i_r, dd = (x / mu if mu > 0 else torch.zeros_like(x)
                    for x, mu in zip((d_t, d_r, L), mean))
    m = i_t >= i_r * dd * lam
    k = math.floor(density * r.numel())
    pool, kth = i_t[m], None
    if k < pool.numel():
        kth = torch.topk(pool, k).values[-1] if k else math.inf
        m = m & (i_t >= kth)
    return m, i_t, kth, k


def test_rcp_approx_end_to_end(fam, tmp_path, capsys):
    lam, density = 1.0, 0.3
    out = merge(tmp_path, capsys, recipe(fam, method="rcp_approx",
                                         params={"approx_lambda": lam, "density": density}))
    got = load_folder(out)
    report = json.loads((out / "rcp_report.json").read_text())
    assert set(got) == set(fam.r) == set(report["tensors"])
    checked_2d = 0
    for n, o in got.items():
        r, t, pre = fam.r[n], fam.t[n], fam.pre[n]
        delta = t - pre
        m = o != r                                             # δ_t ≠ 0 everywhere here
        assert torch.equal(o[m], (r + delta)[m]) and torch.equal(o[~m], r[~m]), n
        assert int(m.sum()) == report["tensors"][n]["selected"]
        want, i_t, kth, k = _expected_approx_mask(r, t, pre, lam, density)
        base_mask = _expected_approx_mask(r, t, pre, lam, 1.0)[0]
        assert not (m & ~base_mask).any(), n                   # ⊆ {I_t ≥ λ'·I_r·D̃}
        ties = int((i_t[base_mask] == kth).sum()) - 1 if kth is not None else 0
        assert int(m.sum()) <= k + max(ties, 0), n
        if r.dim() == 2:
            assert torch.equal(m, want), n                     # exact, computed independently
            checked_2d += 1
    assert checked_2d >= 10
    card = (out / "README.md").read_text()
    assert "not RCP-Merging" in _title(card)


def _title(card: str) -> str:
    return next(ln for ln in card.splitlines() if ln.startswith("# "))


def test_base_mismatch_warning_fires_on_a_wrong_base_only(tmp_path, capsys):
    """Fine-tunes that move the weights by a tenth of their size: ‖θ_domain − base‖/‖base‖ ≈
    0.1 against the true base, no warning; an unrelated base (another seed) is ≈ √2 away and
    the merge says so."""
    from mergekit_like.demo import make_family
    from support.rcp_fixture import SHAPE

    base, reasoning, domain = make_family(tmp_path / "fam", SHAPE, 2, delta_scale=0.002)
    other_base = make_family(tmp_path / "other", SHAPE, 0, seed=5)[0]
    fam = SimpleNamespace(base=base, reasoning=reasoning, domain=domain)
    doc = recipe(fam, method="rcp_approx", params={"approx_lambda": 1.0, "density": 0.3})
    reports = {}
    for name, b in (("right", base), ("wrong", other_base)):
        code, _, err = run_cli(["merge", write_recipe(tmp_path / f"{name}.yml",
                                                      {**doc, "base_model": str(b)}),
                                tmp_path / name], capsys)
        assert code == 0, err
        reports[name] = (err, json.loads((tmp_path / name / "rcp_report.json").read_text()))
    pre, t = load_folder(base), load_folder(domain)
    mats = [n for n in t if t[n].dim() >= 2]
    want = math.sqrt(sum(float((t[n] - pre[n]).double().square().sum()) for n in mats)
                     / sum(float(pre[n].double().square().sum()) for n in mats))
    err, rep = reports["right"]
    assert rep["relative_delta_domain"] == pytest.approx(want, rel=1e-9)
    assert 0.05 < want < 0.2 and "own base" not in err
    err, rep = reports["wrong"]
    assert 1.2 < rep["relative_delta_domain"] < 1.6
    assert "is base_model the domain model's own base?" in err
