"""RegMean end to end (docs/methods/regmean.md): `stats gram` against the layer inputs captured
here by plain forward hooks, the merge against least squares on those stacked inputs, and bad
statistics refused in one line naming the model and tensor."""

from __future__ import annotations

import json

import pytest
import torch
from support.helpers import expect_merge_error, load_folder, run_cli
from support.rcp_fixture import SHAPE, family, texts

from mergekit_like.demo import LlamaShape, make_family

pytest.importorskip("transformers")
Q = "model.layers.1.self_attn.q_proj.weight"
DOWN = "model.layers.0.mlp.down_proj.weight"


def captured_inputs(folder, data, module_names) -> dict[str, torch.Tensor]:
    """Each named linear layer's inputs over every text, (T, in) float64, by forward hooks on
    the transformers model (independent of the stats pass)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    seen = {n: [] for n in module_names}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: seen[n].append(a[0].reshape(-1, a[0].shape[-1]).double()))
        for n in module_names]
    with torch.no_grad():
        for line in data.read_text().splitlines():
            model(input_ids=torch.tensor([json.loads(line)["input_ids"]]), use_cache=False)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


@pytest.fixture(scope="module")
def stats(tmp_path_factory):
    root = tmp_path_factory.mktemp("regmean")
    _, ft1, ft2 = family(root / "fam")
    data = {ft1: texts(root / "a.jsonl", 4, seed=1), ft2: texts(root / "b.jsonl", 3, seed=2)}
    grams = {}
    for k, (model, d) in enumerate(data.items()):
        out = root / f"gram{k}"
        code = _cli(["stats", "gram", "--model", model, "--data", d, "--out", out])
        assert code == 0
        grams[model] = out
    return root, data, grams


def _cli(args) -> int:
    from mergekit_like.cli import main

    return main([str(a) for a in args] + ["--device", "cpu", "-q"])


def _recipe(grams: dict, alpha: float = 1.0, **extra) -> dict:
    return {"merge_method": "regmean",
            "models": [{"model": str(m), "parameters": {"gram": str(g)}} for m, g in grams.items()],
            "parameters": {"reduce_non_diagonal_ratio": alpha}, "dtype": "float32", **extra}


def test_gram_is_the_mean_outer_product_of_the_layer_inputs(stats):
    root, data, grams = stats
    model = next(iter(data))
    names = [Q[:-7], Q[:-7].replace("q_proj", "k_proj"), DOWN[:-7]]
    x = captured_inputs(model, data[model], names)
    g = load_folder(grams[model])
    for name in names:
        want = x[name].T @ x[name] / len(x[name])
        torch.testing.assert_close(g[name + ".weight"].double(), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(g[Q], g[Q.replace("q_proj", "k_proj")])   # one input, one Gram
    info = json.loads((grams[model] / "importance.json").read_text())
    assert info["kind"] == "regmean_gram" and info["n_examples"] == "4"
    assert info["tensors"][DOWN]["tokens"] == len(x[DOWN[:-7]])
    assert "model.embed_tokens.weight" not in g and "model.norm.weight" not in g


def test_merge_is_least_squares_on_the_stacked_inputs(stats, tmp_path, capsys):
    root, data, grams = stats
    out = tmp_path / "out"
    recipe = tmp_path / "r.yml"
    recipe.write_text(json.dumps(_recipe(grams)))
    code, _, err = run_cli(["merge", recipe, out, "-q"], capsys)
    assert code == 0, err
    merged = load_folder(out)
    models = list(data)
    inputs = [captured_inputs(m, data[m], [Q[:-7], DOWN[:-7]]) for m in models]
    weights = [load_folder(m) for m in models]
    for name in (Q, DOWN):
        a = torch.cat([x[name[:-7]] / len(x[name[:-7]]) ** 0.5 for x in inputs])
        b = torch.cat([x[name[:-7]] @ w[name].double().T / len(x[name[:-7]]) ** 0.5
                       for x, w in zip(inputs, weights)])
        want = torch.linalg.lstsq(a, b).solution.T
        torch.testing.assert_close(merged[name].double(), want, rtol=1e-3, atol=1e-4)
    norm = "model.layers.0.input_layernorm.weight"
    torch.testing.assert_close(merged[norm], (weights[0][norm] + weights[1][norm]) / 2)
    assert json.loads((out / "regmean_report.json").read_text())["ridge_fallback"] == {}


def test_dry_run_states_the_statistics_and_the_solve(stats, tmp_path, capsys):
    _, _, grams = stats
    recipe = tmp_path / "r.yml"
    recipe.write_text(json.dumps(_recipe(grams)))
    code, out, err = run_cli(["merge", recipe, tmp_path / "out", "--dry-run"], capsys)
    assert code == 0, err
    n = SHAPE.intermediate_size
    solve = 8 * (3 * n * n + 3 * n * SHAPE.hidden_size)
    assert "regmean: 15 linear weights solved from Grams" in out
    assert f"largest solve {solve / 1000:.2f} KB in float64 ({DOWN})" in out
    assert not (tmp_path / "out").exists()


def test_statistics_of_another_shape_are_refused(stats, tmp_path_factory, tmp_path, capsys):
    root, data, grams = stats
    other_root = tmp_path_factory.mktemp("other")
    wide = LlamaShape(vocab_size=32, hidden_size=24, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
    _, other = make_family(other_root, wide, 1)
    assert _cli(["stats", "gram", "--model", other, "--data", texts(other_root / "t.jsonl", 2, 3),
                 "--out", other_root / "g"]) == 0
    bad = dict(grams)
    bad[list(bad)[1]] = other_root / "g"
    capsys.readouterr()
    expect_merge_error(tmp_path, capsys, _recipe(bad), f"gram of models[1] ({other_root / 'g'})",
                       "statistics of tensor '", "have shape [24, 24]", "needs [16, 16]")


def test_statistics_missing_a_layer_are_refused(stats, tmp_path_factory, tmp_path, capsys):
    root, data, grams = stats
    cut = tmp_path_factory.mktemp("cut") / "g"
    from mergekit_like.runtime.stats_folder import write_stats_folder

    tensors = {k: v for k, v in load_folder(list(grams.values())[0]).items() if ".layers.1." not in k}
    write_stats_folder(cut, tensors, {"kind": "regmean_gram"}, {}, overwrite=False)
    bad = dict(grams)
    bad[list(bad)[0]] = cut
    expect_merge_error(tmp_path, capsys, _recipe(bad), "gram of models[0]",
                       "no statistics for tensor 'model.layers.1.")


@pytest.mark.parametrize("models, needle", [
    (lambda g: [{"model": str(m)} for m in g], "regmean needs 'gram: FOLDER' on every model"),
    (lambda g: [{"model": str(m), "parameters": {"gram": str(m)}} for m in g],
     "no importance.json"),
])
def test_a_model_without_its_gram_folder_is_refused_at_its_line(stats, tmp_path, capsys, models, needle):
    _, _, grams = stats
    doc = _recipe(grams)
    doc["models"] = models(grams)
    line = expect_merge_error(tmp_path, capsys, doc, needle)
    assert "models[0]" in line or "line" in line


def test_a_singular_gram_sum_falls_back_and_says_so(stats, tmp_path_factory, tmp_path, capsys):
    _, _, grams = stats
    from mergekit_like.runtime.stats_folder import write_stats_folder

    fixed = {}
    for k, (model, folder) in enumerate(grams.items()):
        g = load_folder(folder)
        g[Q][:, 3] = 0.0
        g[Q][3, :] = 0.0                        # input feature 3 of q_proj never seen
        fixed[model] = tmp_path_factory.mktemp(f"sing{k}") / "g"
        write_stats_folder(fixed[model], g, {"kind": "regmean_gram"}, {}, overwrite=False)
    recipe = tmp_path / "r.yml"
    recipe.write_text(json.dumps(_recipe(fixed)))
    code, _, err = run_cli(["merge", recipe, tmp_path / "out", "-q"], capsys)
    assert code == 0, err
    assert "1 Gram sum(s) not positive definite" in err and Q in err
    report = json.loads((tmp_path / "out" / "regmean_report.json").read_text())
    assert list(report["ridge_fallback"]) == [Q] and report["ridge_fallback"][Q] > 0
    merged = load_folder(tmp_path / "out")[Q]
    ws = [load_folder(m)[Q] for m in fixed]
    torch.testing.assert_close(merged[:, 3], (ws[0][:, 3] + ws[1][:, 3]) / 2, rtol=1e-5, atol=1e-6)


def test_lambda_scales_the_merge_from_the_base(stats, tmp_path, capsys):
    root, data, grams = stats
    base = root / "fam" / "base"
    outs = {}
    assert len(grams) == 2
    for name, lam in (("plain", None), ("inv_n", 0.5), ("one", 1.0)):
        doc = _recipe(grams)
        if lam is not None:
            doc["base_model"] = str(base)
            doc["parameters"]["lambda"] = lam
        recipe = tmp_path / f"{name}.yml"
        recipe.write_text(json.dumps(doc))
        code, _, err = run_cli(["merge", recipe, tmp_path / name, "-q"], capsys)
        assert code == 0, err
        outs[name] = load_folder(tmp_path / name)
    b = load_folder(base)
    models = [load_folder(m) for m in data]
    norm = "model.norm.weight"
    torch.testing.assert_close(outs["one"][norm],
                               b[norm] + sum(m[norm] - b[norm] for m in models))
    for name in (Q, DOWN):            # λ = 1/N is RegMean itself; λ = 1 doubles its delta (N = 2)
        torch.testing.assert_close(outs["inv_n"][name], outs["plain"][name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(outs["one"][name] - b[name], 2 * (outs["plain"][name] - b[name]),
                                   rtol=1e-4, atol=1e-5)


def test_lambda_without_a_base_is_refused(stats, tmp_path, capsys):
    _, _, grams = stats
    doc = _recipe(grams)
    doc["parameters"]["lambda"] = 0.5
    expect_merge_error(tmp_path, capsys, doc, "parameters.lambda", "needs a base_model")
