"""passthrough (docs/methods/passthrough.md): the one model's tensors, times the per-model
``scale`` where set. Expected tensors are the input's own, or input × scale written here."""

from __future__ import annotations

import pytest
import torch
from support.helpers import (SMALL_SHAPE, expect_merge_error, load_folder, run_cli, small_family,
                             write_recipe)

from mergekit_like.methods.base import TensorTask
from mergekit_like.registry import get_method

SHAPE = SMALL_SHAPE


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return small_family(tmp_path_factory.mktemp("fam"))


def merged(tmp_path, capsys, doc) -> tuple[dict[str, torch.Tensor], str]:
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", write_recipe(tmp_path / "r.yml", doc), out, "-q"], capsys)
    assert code == 0, err
    return load_folder(out), err


def test_copies_the_one_model(fam, tmp_path, capsys):
    out, _ = merged(tmp_path, capsys, {"merge_method": "passthrough",
                                       "models": [{"model": str(fam / "ft2")}],
                                       "dtype": "float32"})
    ft2 = load_folder(fam / "ft2")
    assert out.keys() == ft2.keys()
    assert all(torch.equal(out[k], ft2[k]) and out[k].dtype == torch.float32 for k in ft2)


def test_scale_by_filter(fam, tmp_path, capsys):
    """scale 0.5 on down_proj (no catch-all: elsewhere unset, the tensor untouched), -2 on the
    layernorms; the products are exact in float32."""
    doc = {"merge_method": "passthrough",
           "models": [{"model": str(fam / "ft1"), "parameters": {"scale": [
               {"filter": "down_proj", "value": 0.5}, {"filter": "layernorm", "value": -2.0}]}}],
           "dtype": "float32"}
    out, _ = merged(tmp_path, capsys, doc)
    ft1 = load_folder(fam / "ft1")
    for k, x in ft1.items():
        factor = 0.5 if "down_proj" in k else -2.0 if "layernorm" in k else 1.0
        assert torch.equal(out[k], x * factor), k
    assert any("down_proj" in k for k in ft1) and any("layernorm" in k for k in ft1)


def test_base_model_naming_the_same_model_is_one_model(fam, tmp_path, capsys):
    doc = {"merge_method": "passthrough", "base_model": str(fam / "ft1"),
           "models": [{"model": str(fam / "ft1"), "parameters": {"scale": 0.25}}],
           "dtype": "float32"}
    out, _ = merged(tmp_path, capsys, doc)
    ft1 = load_folder(fam / "ft1")
    assert all(torch.equal(out[k], ft1[k] * 0.25) for k in ft1)


def test_blocked_equals_whole():
    x = torch.randn(37, 5, generator=torch.Generator().manual_seed(0))
    m = get_method("passthrough")
    outs = []
    for block_elems in (1 << 22, 7):
        task = TensorTask(name="w", shape=(37, 5), out_dtype=torch.bfloat16,
                          compute_dtype=torch.float32, load_dtype=None, base=None, inputs=[x],
                          input_indices=[0], model_params=[{"scale": 3.0}], params={},
                          block_elems=block_elems)
        outs.append(m.merge(task)["w"])
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], (x * 3.0).bfloat16())


@pytest.mark.parametrize("extra, needles", [
    ({"models": ["ft1", "ft2"]}, ("passthrough takes exactly one model (base_model included), "
                                  "got 2",)),
    ({"base_model": "base", "models": ["ft1"]}, ("passthrough takes exactly one model", "got 2")),
    ({"models": ["ft1"], "scale": "half"}, ("scale", "expected a number")),
    ({"models": ["ft1"], "scale": ".nan"}, ("not a finite number",)),
    ({"models": ["ft1"], "weight": 1.0}, ("unknown parameter for method 'passthrough'",)),
])
def test_bad_recipes(fam, tmp_path, capsys, extra, needles):
    models = [{"model": str(fam / m)} for m in extra["models"]]
    for key in ("scale", "weight"):
        if key in extra:
            models[0]["parameters"] = {key: extra[key]}
    text = "merge_method: passthrough\n"
    if "base_model" in extra:
        text += f"base_model: {fam / extra['base_model']}\n"
    text += "models:\n" + "".join(
        f"  - model: {m['model']}\n" + "".join(f"    parameters: {{{k}: {v}}}\n"
                                              for k, v in m.get("parameters", {}).items())
        for m in models)
    expect_merge_error(tmp_path, capsys, text, *needles)
