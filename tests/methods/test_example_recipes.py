"""Every example recipe in recipes/ runs against the demo family, as the README promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.helpers import config_of, load_folder, run_cli

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yml"))
SHAPES = sorted((ROOT / "recipes" / "shapes").glob("*.yml"))


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """The demo family, made by the script the README's set-up command runs."""
    work = tmp_path_factory.mktemp("demo")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo_models.py"), "--out",
                    str(work / "demo_models")], check=True, capture_output=True)
    return work


def test_one_recipe_per_method():
    from mergekit_like.registry import method_names

    assert {p.stem for p in RECIPES} == set(method_names())


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_example_recipe_runs(recipe, demo_dir, capsys, monkeypatch):
    monkeypatch.chdir(demo_dir)
    out = demo_dir / f"out-{recipe.stem}"
    code, _, err = run_cli(["merge", recipe, out, "-q"], capsys)
    assert code == 0, err
    merged = load_folder(out)
    base = load_folder(demo_dir / "demo_models" / "base")
    if recipe.stem == "wemoe":  # block MLPs upscaled: base + experts (+ float32 routers)
        upscaled = {k for k in merged if any(f".mlp.{p}." in k for p in ("base", "experts",
                                                                         "router"))}
        assert upscaled and {k for k in base if ".mlp." not in k} == merged.keys() - upscaled
        merged = {k: v for k, v in merged.items() if k not in upscaled}
        base = {k: v for k, v in base.items() if k in merged}
    else:
        assert merged.keys() == base.keys()
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    assert config_of(out)["torch_dtype"] == "bfloat16"
    changed = sum(not torch.equal(merged[k], base[k]) for k in base)
    assert changed > len(base) // 2  # a real merge, not a copy of the base
    assert (out / "mergekit_config.yml").read_text() == recipe.read_text()
    assert_loads_in_transformers(out, wemoe=recipe.stem == "wemoe")


@pytest.mark.parametrize("recipe", SHAPES, ids=lambda p: p.stem)
def test_recipe_shape_runs(recipe, demo_dir, capsys, monkeypatch):
    """The slices examples (recipes/shapes/) run unchanged and load in transformers; the
    layer count is the slices' total."""
    import yaml

    monkeypatch.chdir(demo_dir)
    out = demo_dir / f"out-shape-{recipe.stem}"
    code, _, err = run_cli(["merge", recipe, out, "-q"], capsys)
    assert code == 0, err
    doc = yaml.safe_load(recipe.read_text())
    layers = sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0]
                 for s in doc["slices"])
    assert config_of(out)["num_hidden_layers"] == layers
    merged = load_folder(out)
    assert max(int(k.split(".")[2]) for k in merged if k.startswith("model.layers.")) == layers - 1
    assert_loads_in_transformers(out, wemoe=False)


def assert_loads_in_transformers(out: Path, *, wemoe: bool) -> None:
    """The output loads as a causal LM (WEMoE through its own modeling code) and a forward pass
    gives finite logits of the vocabulary's width."""
    transformers = pytest.importorskip("transformers")
    if wemoe:
        from mergekit_like.wemoe.runtime import load_wemoe
        model = load_wemoe(out, device="cpu").model
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, 4, config_of(out)["vocab_size"])
    assert torch.isfinite(logits).all()
