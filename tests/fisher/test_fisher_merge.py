"""Fisher merging end to end (docs/methods/fisher.md): `stats fisher` against squared per-text
gradients computed here by plain autograd, the merge against the equation on the folders'
tensors, and the statistics commands' refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
from support.helpers import assert_one_line_error, load_folder, run_cli
from support.rcp_fixture import family, reference_grads, texts

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def fishers(tmp_path_factory):
    from mergekit_like.cli import main

    root = tmp_path_factory.mktemp("fisher")
    _, ft1, ft2 = family(root / "fam")
    data = {ft1: texts(root / "a.jsonl", 3, seed=1), ft2: texts(root / "b.jsonl", 4, seed=2)}
    out = {}
    for k, (model, d) in enumerate(data.items()):
        out[model] = root / f"f{k}"
        assert main(["stats", "fisher", "--model", str(model), "--data", str(d), "--out",
                     str(out[model]), "--device", "cpu", "-q"]) == 0
    return root, data, out


def test_fisher_is_the_mean_squared_gradient_and_its_norm_is_recorded(fishers):
    _, data, out = fishers
    model = next(iter(data))
    grads = reference_grads(model, data[model])
    f = load_folder(out[model])
    for name, got in f.items():
        want = sum(g[name].square() for g in grads) / len(grads)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-10)
    info = json.loads((out[model] / "importance.json").read_text())
    norm = math.sqrt(sum(float(t.double().square().sum()) for t in f.values()))
    assert info["kind"] == "fisher" and float(info["fisher_norm"]) == pytest.approx(norm, rel=1e-12)


@pytest.mark.parametrize("normalize", [True, False])
def test_merge_is_the_fisher_weighted_mean(fishers, tmp_path, capsys, normalize):
    _, data, out = fishers
    recipe = tmp_path / "r.yml"
    recipe.write_text(json.dumps({
        "merge_method": "fisher", "dtype": "float32",
        "models": [{"model": str(m), "parameters": {"fisher": str(f), "weight": w}}
                   for (m, f), w in zip(out.items(), (1.0, 3.0))],
        "parameters": {"normalize_fisher_weight": normalize, "minimal_fisher_weight": 1e-6}}))
    code, _, err = run_cli(["merge", recipe, tmp_path / "out", "-q"], capsys)
    assert code == 0, err
    merged = load_folder(tmp_path / "out")
    thetas = [load_folder(m) for m in out]
    fs = [load_folder(f) for f in out.values()]
    norms = [math.sqrt(sum(float(t.double().square().sum()) for t in f.values())) for f in fs]
    c = [1.0, 3.0]
    if normalize:
        c = [w / (n + 1e-6) for w, n in zip(c, norms)]
    for name in ("model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight"):
        w = [ci * (f[name].double() + 1e-6) for ci, f in zip(c, fs)]
        want = sum(wi * t[name].double() for wi, t in zip(w, thetas)) / sum(w)
        torch.testing.assert_close(merged[name].double(), want, rtol=1e-5, atol=1e-6)


def test_equal_fisher_gives_the_mean(fishers, tmp_path, capsys):
    _, data, out = fishers
    same = list(out.values())[0]
    recipe = tmp_path / "r.yml"
    recipe.write_text(json.dumps({
        "merge_method": "fisher", "dtype": "float32",
        "models": [{"model": str(m), "parameters": {"fisher": str(same)}} for m in out]}))
    code, _, err = run_cli(["merge", recipe, tmp_path / "out", "-q"], capsys)
    assert code == 0, err
    merged = load_folder(tmp_path / "out")
    a, b = (load_folder(m) for m in out)
    for name in merged:
        torch.testing.assert_close(merged[name], (a[name] + b[name]) / 2, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("command", ["gram", "fisher"])
def test_stats_output_inside_the_model_is_refused(fishers, capsys, command):
    _, data, _ = fishers
    model, d = next(iter(data.items()))
    before = sorted(p.name for p in model.iterdir())
    code, _, err = run_cli(["stats", command, "--model", model, "--data", d, "--out",
                            model / "stats", "--device", "cpu", "-q"], capsys)
    assert_one_line_error(code, err, "lies inside the input --model")
    assert sorted(p.name for p in model.iterdir()) == before


def test_a_fisher_folder_is_not_a_gram_folder(fishers, tmp_path, capsys):
    from support.helpers import expect_merge_error

    _, _, out = fishers
    doc = {"merge_method": "regmean",
           "models": [{"model": str(m), "parameters": {"gram": str(f)}} for m, f in out.items()]}
    expect_merge_error(tmp_path, capsys, doc, "models[0].parameters.gram", "kind 'fisher'",
                       "regmean_gram")
