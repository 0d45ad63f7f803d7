"""``slices:`` recipes (docs/recipe.md §8): layer stacking, per-slice gradients and parameters,
the stacked config, and the errors, each output tensor compared with an assembly of the
expected source layers computed here."""

from __future__ import annotations

import json

import pytest
import torch

from mergekit_like.demo import LlamaShape, make_family
from tests.support.helpers import (assert_one_line_error, config_of, expect_merge_error,
                                   load_folder, run_cli, write_recipe)

SHAPE = LlamaShape(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=6,
                   num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("slices")
    base, ft1, ft2 = make_family(root, SHAPE, n_finetunes=2, delta_scale=0.05)
    return {"base": str(base), "ft1": str(ft1), "ft2": str(ft2)}


def _merge(tmp_path, capsys, doc, *extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    write_recipe(tmp_path / "recipe.yml", doc)
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", tmp_path / "recipe.yml", out, "-q", *extra], capsys)
    assert code == 0, err
    return out


def _layer(name: str, i: int) -> str:
    return f"model.layers.{i}.{name}"


SUFFIXES = ["self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"]


def test_frankenmerge_stacks_layers_from_two_models(fam, tmp_path, capsys):
    doc = {"merge_method": "passthrough", "dtype": "float32",
           "slices": [{"sources": [{"model": fam["ft1"], "layer_range": [0, 4]}]},
                      {"sources": [{"model": fam["ft2"], "layer_range": [2, 6]}]}]}
    out = _merge(tmp_path, capsys, doc)
    got = load_folder(out)
    a, b = load_folder(fam["ft1"]), load_folder(fam["ft2"])
    expected_sources = [(a, 0), (a, 1), (a, 2), (a, 3), (b, 2), (b, 3), (b, 4), (b, 5)]
    for j, (src, i) in enumerate(expected_sources):
        for suffix in SUFFIXES:
            assert torch.equal(got[_layer(suffix, j)], src[_layer(suffix, i)]), (j, suffix)
    assert not any(n.startswith("model.layers.8.") for n in got)
    assert torch.equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(got["model.norm.weight"], b["model.norm.weight"])
    assert torch.equal(got["lm_head.weight"], b["lm_head.weight"])
    assert config_of(out)["num_hidden_layers"] == 8
    code, _, err = run_cli(["verify", out], capsys)
    assert code == 0, err


def test_stacked_model_loads_and_runs_in_transformers(fam, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    doc = {"merge_method": "passthrough",
           "slices": [{"sources": [{"model": fam["ft1"], "layer_range": [0, 5]}]},
                      {"sources": [{"model": fam["base"], "layer_range": [1, 6]}]}]}
    out = _merge(tmp_path, capsys, doc)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 10 and len(model.model.layers) == 10
    logits = model(torch.tensor([[1, 5, 9, 3]])).logits
    assert logits.shape == (1, 4, SHAPE.vocab_size) and torch.isfinite(logits).all()


def test_whole_model_slice_equals_the_models_form(fam, tmp_path, capsys):
    """One slice over every layer is the models form: same t per layer, same bits."""
    params = {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}
    sliced = {"merge_method": "slerp", "base_model": fam["base"], "parameters": params,
              "dtype": "float32",
              "slices": [{"sources": [{"model": fam["base"], "layer_range": [0, 6]},
                                      {"model": fam["ft1"], "layer_range": [0, 6]}]}]}
    whole = {"merge_method": "slerp", "base_model": fam["base"], "parameters": params,
             "dtype": "float32", "models": [{"model": fam["base"]}, {"model": fam["ft1"]}]}
    a = load_folder(_merge(tmp_path / "a", capsys, sliced))
    b = load_folder(_merge(tmp_path / "b", capsys, whole))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_gradient_runs_over_each_slices_own_layers(fam, tmp_path, capsys):
    """linear with weights [1, 0] / [0, 1]: layer o of a 3-layer slice is (1−t)·x + t·y with
    t = o/2, restarting in the second slice; slice parameters beat the top level's."""
    x, y = fam["ft1"], fam["ft2"]
    doc = {"merge_method": "linear", "dtype": "float32", "parameters": {"weight": 0.5},
           "slices": [
               {"sources": [{"model": x, "layer_range": [0, 3], "parameters": {"weight": [1, 0]}},
                            {"model": y, "layer_range": [0, 3],
                             "parameters": {"weight": [0, 1]}}]},
               {"sources": [{"model": x, "layer_range": [3, 6]},
                            {"model": y, "layer_range": [3, 6], "parameters": {"weight": 3.0}}],
                "parameters": {"weight": 1.0}}]}
    got = load_folder(_merge(tmp_path, capsys, doc))
    a, b = load_folder(x), load_folder(y)
    for j in range(6):
        name = _layer("mlp.down_proj.weight", j)
        if j < 3:
            t = j / 2
            want = (1 - t) * a[name] + t * b[name]
        else:  # x takes the slice's 1.0, y its own 3.0, normalised: (x + 3y)/4
            want = (a[name] + 3 * b[name]) / 4
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6)
    # the embeddings take the first slice's parameters at t = 0: x's weight 1, y's 0
    torch.testing.assert_close(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"],
                               rtol=0, atol=1e-6)
    # the head takes the last slice's: (x + 3y)/4
    want = (a["lm_head.weight"] + 3 * b["lm_head.weight"]) / 4
    torch.testing.assert_close(got["lm_head.weight"], want, rtol=0, atol=1e-6)


def test_task_arithmetic_slice_takes_vectors_against_its_own_base(fam, tmp_path, capsys):
    doc = {"merge_method": "task_arithmetic", "dtype": "float32",
           "slices": [{"base_model": fam["base"],
                       "sources": [{"model": fam["base"], "layer_range": [0, 2]},
                                   {"model": fam["ft1"], "layer_range": [4, 6],
                                    "parameters": {"weight": 0.5}}]}]}
    got = load_folder(_merge(tmp_path, capsys, doc))
    base, ft = load_folder(fam["base"]), load_folder(fam["ft1"])
    for j in range(2):
        name = _layer("self_attn.q_proj.weight", j)
        want = base[name] + 0.5 * (ft[_layer("self_attn.q_proj.weight", 4 + j)] - base[name])
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6)


def test_per_layer_config_lists_follow_their_layers(tmp_path, capsys):
    fam_root = tmp_path / "fam"
    base, ft = make_family(fam_root, SHAPE, n_finetunes=1)
    for folder, kinds in ((base, "ab"), (ft, "xy")):
        cfg = json.loads((folder / "config.json").read_text())
        cfg["layer_types"] = [f"{kinds[i % 2]}{i}" for i in range(6)]
        (folder / "config.json").write_text(json.dumps(cfg))
    doc = {"merge_method": "passthrough",
           "slices": [{"sources": [{"model": str(base), "layer_range": [4, 6]}]},
                      {"sources": [{"model": str(ft), "layer_range": [0, 3]}]}]}
    out = _merge(tmp_path, capsys, doc)
    cfg = config_of(out)
    assert cfg["num_hidden_layers"] == 5
    assert cfg["layer_types"] == ["a4", "b5", "x0", "y1", "x2"]


def test_dry_run_prints_the_layer_map(fam, tmp_path, capsys):
    doc = {"merge_method": "passthrough",
           "slices": [{"sources": [{"model": fam["ft1"], "layer_range": [0, 4]}]},
                      {"sources": [{"model": fam["ft2"], "layer_range": [2, 6]}]}]}
    write_recipe(tmp_path / "recipe.yml", doc)
    code, out, err = run_cli(["merge", tmp_path / "recipe.yml", tmp_path / "out", "--dry-run"],
                             capsys)
    assert code == 0, err
    text = out + err
    assert "layers 0–3 ← slice 0" in text and "layers 4–7 ← slice 1" in text
    assert f"{fam['ft2']}[2:6]" in text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("slices, needles", [
    ([{"sources": [{"model": "FT1", "layer_range": [0, 7]}]}],
     ["recipe.yml:", "slices[0].sources[0]", "layer_range [0, 7] goes past the model's 6 layers"]),
    ([{"sources": [{"model": "FT1", "layer_range": [3, 3]}]}],
     ["slices[0].sources[0].layer_range", "need 0 ≤ first < end"]),
    ([{"sources": [{"model": "FT1", "layer_range": [0, 2]}, {"model": "FT2",
                                                             "layer_range": [0, 3]}]}],
     ["slices[0].sources[1].layer_range", "3 layers, but sources[0] has 2"]),
    ([{"sources": [{"model": "FT1", "layer_range": "0-2"}]}],
     ["slices[0].sources[0].layer_range", "expected two integers"]),
    ([{"sources": [{"model": "FT1", "layers": [0, 2]}]}],
     ["slices[0].sources[0].layers", "unknown key", "layer_range"]),
])
def test_bad_slices_give_one_line(fam, tmp_path, capsys, slices, needles):
    for sl in slices:
        for src in sl["sources"]:
            src["model"] = fam[src["model"].lower()]
    doc = {"merge_method": "passthrough", "slices": slices}
    expect_merge_error(tmp_path, capsys, doc, *needles)


def test_slice_without_its_base_is_refused(fam, tmp_path, capsys):
    doc = {"merge_method": "ties", "base_model": fam["base"],
           "parameters": {"weight": 1.0, "density": 0.5},
           "slices": [{"sources": [{"model": fam["ft1"], "layer_range": [0, 2]},
                                   {"model": fam["ft2"], "layer_range": [0, 2]}]}]}
    expect_merge_error(tmp_path, capsys, doc, "slices[0]",
                       "needs the base among each slice's sources", "is not among")


def test_models_and_slices_together_and_data_driven_methods_are_refused(fam, tmp_path, capsys):
    src = [{"sources": [{"model": fam["ft1"], "layer_range": [0, 2]}]}]
    doc = {"merge_method": "passthrough", "models": [{"model": fam["ft1"]}], "slices": src}
    expect_merge_error(tmp_path, capsys, doc, "slices", "either 'models' or 'slices', not both")
    doc = {"merge_method": "twin", "base_model": fam["base"], "slices": src}
    expect_merge_error(tmp_path, capsys, doc, "merge_method 'twin' merges whole models")
    doc = {"merge_method": "passthrough", "modules": {"text": {"slices": src}}}
    expect_merge_error(tmp_path, capsys, doc, "modules", "not supported")


def test_passthrough_slice_with_two_sources_is_refused(fam, tmp_path, capsys):
    doc = {"merge_method": "passthrough",
           "slices": [{"sources": [{"model": fam["ft1"], "layer_range": [0, 2]},
                                   {"model": fam["ft2"], "layer_range": [0, 2]}]}]}
    code, _, err = _run(tmp_path, capsys, doc)
    line = assert_one_line_error(code, err, "slices[0].sources", "exactly one model")
    assert "recipe.yml:" in line


def _run(tmp_path, capsys, doc):
    write_recipe(tmp_path / "recipe.yml", doc)
    return run_cli(["merge", tmp_path / "recipe.yml", tmp_path / "out"], capsys)


def test_forty_layers_stacked_to_forty_four(tmp_path, capsys):
    """The frankenmerge of the issue: layers [0, 24) and [16, 36) of a 40-layer model give 44
    layers, each the source layer it names; the result loads and runs in transformers."""
    transformers = pytest.importorskip("transformers")
    deep = LlamaShape(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=40,
                      num_attention_heads=2, num_key_value_heads=1)
    base, ft = make_family(tmp_path / "deep", deep, n_finetunes=1, delta_scale=0.05)
    doc = {"merge_method": "passthrough",
           "slices": [{"sources": [{"model": str(ft), "layer_range": [0, 24]}]},
                      {"sources": [{"model": str(base), "layer_range": [16, 36]}]}]}
    out = _merge(tmp_path, capsys, doc)
    got, a, b = load_folder(out), load_folder(ft), load_folder(base)
    order = [(a, i) for i in range(24)] + [(b, i) for i in range(16, 36)]
    for j, (src, i) in enumerate(order):
        for suffix in SUFFIXES:
            assert torch.equal(got[_layer(suffix, j)], src[_layer(suffix, i)])
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 44
    assert torch.isfinite(model(torch.tensor([[3, 1, 4, 1, 5]])).logits).all()
