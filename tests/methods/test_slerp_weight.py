"""slerp accepts mergekit's per-model ``weight`` (which mergekit's slerp ignores) with one
warning naming the recipe line, and the merge is bit-identical to the one without it."""

from __future__ import annotations

import pytest
import torch
from support.helpers import expect_merge_error, folder_digest, load_folder, run_cli, write_recipe

from mergekit_like.demo import LlamaShape, make_family

SHAPE = LlamaShape(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    make_family(root, SHAPE, n_finetunes=1, dtype=torch.float32)
    return root


def text(fam, weight_lines: str = "", top: str = "") -> str:
    return (f"merge_method: slerp\n"            # line 1
            f"base_model: {fam / 'base'}\n"     # line 2
            f"models:\n"                        # line 3
            f"  - model: {fam / 'base'}\n"      # line 4
            f"  - model: {fam / 'ft1'}\n"       # line 5
            f"{weight_lines}"                   # line 6-
            f"parameters:\n  t: 0.4\n{top}")


def run(tmp_path, capsys, name, doc):
    out = tmp_path / name
    code, _, err = run_cli(["merge", write_recipe(tmp_path / f"{name}.yml", doc), out, "-q"],
                           capsys)
    assert code == 0, err
    return out, err


def test_weight_is_accepted_with_a_warning(fam, tmp_path, capsys):
    plain, err0 = run(tmp_path, capsys, "plain", text(fam))
    assert "'weight'" not in err0
    weighted, err = run(tmp_path, capsys, "weighted",
                        text(fam, "    parameters:\n      weight: 0.7\n"))
    warns = [ln for ln in err.splitlines() if "'weight'" in ln]
    assert warns == [f"warning: {tmp_path / 'weighted.yml'}:7 models[1].parameters.weight: "
                     "'weight' has no effect for merge_method 'slerp' (accepted for mergekit "
                     "compatibility)"]
    a, b = load_folder(plain), load_folder(weighted)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    shards = {k: v for k, v in folder_digest(plain).items() if k.endswith(".safetensors")}
    assert shards == {k: v for k, v in folder_digest(weighted).items() if k in shards}


def test_top_level_weight_warns_too(fam, tmp_path, capsys):
    _, err = run(tmp_path, capsys, "top", text(fam, top="  weight: [0.2, 0.8]\n"))
    assert "top.yml:8 parameters.weight: 'weight' has no effect for merge_method 'slerp'" in err


def test_weight_must_still_be_a_number(fam, tmp_path, capsys):
    expect_merge_error(tmp_path, capsys, text(fam, "    parameters:\n      weight: heavy\n"),
                       "models[1].parameters.weight", "expected a number")
