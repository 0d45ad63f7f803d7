"""Every bad input: one line on stderr naming what is wrong, exit code 2, nothing at OUT."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from support.helpers import expect_merge_error as expect_error, load_folder, run_cli, write_recipe
from safetensors.torch import load_file, save_file

from mergekit_like.demo import LlamaShape, make_family

SHAPE = LlamaShape(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2)


@pytest.fixture()
def fam(tmp_path):
    make_family(tmp_path / "fam", SHAPE, n_finetunes=2, shard_bytes=[None, 20_000, None])
    return tmp_path / "fam"


def ta_recipe(fam, **over):
    doc = {"merge_method": "task_arithmetic", "base_model": str(fam / "base"),
           "models": [{"model": str(fam / "ft1"), "parameters": {"weight": 1.0}},
                      {"model": str(fam / "ft2"), "parameters": {"weight": 1.0}}]}
    doc.update(over)
    return doc




def test_unknown_method(fam, tmp_path, capsys):
    expect_error(tmp_path, capsys, ta_recipe(fam, merge_method="dare-ties"),
                 "merge_method", "dare-ties", "did you mean 'dare_ties'")


def test_yaml_syntax_error_names_the_line(fam, tmp_path, capsys):
    text = f"merge_method: linear\nmodels:\n  - model: {fam / 'ft1'}\n    parameters: {{weight: [1, \n"
    expect_error(tmp_path, capsys, text, "recipe.yml:")


def test_missing_weight(fam, tmp_path, capsys):
    doc = ta_recipe(fam)
    del doc["models"][1]["parameters"]
    expect_error(tmp_path, capsys, doc, "models[1]", "weight")


def test_base_required_but_absent(fam, tmp_path, capsys):
    doc = ta_recipe(fam)
    del doc["base_model"]
    expect_error(tmp_path, capsys, doc, "base_model")


def test_model_path_does_not_exist(fam, tmp_path, capsys):
    doc = ta_recipe(fam)
    doc["models"][0]["model"] = "./nowhere/mth"
    expect_error(tmp_path, capsys, doc, "./nowhere/mth")


def test_shape_mismatch_names_tensor_and_shapes(fam, tmp_path, capsys):
    path = fam / "ft2" / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.1.mlp.down_proj.weight"] = torch.zeros(32, 40)
    save_file(tensors, path, metadata={"format": "pt"})
    expect_error(tmp_path, capsys, ta_recipe(fam), "model.layers.1.mlp.down_proj.weight",
                 "[32, 40]", "[32, 48]", "ft2")


def test_tensor_missing_in_one_model(fam, tmp_path, capsys):
    path = fam / "ft2" / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.0.input_layernorm.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    expect_error(tmp_path, capsys, ta_recipe(fam), "ft2", "model.layers.0.input_layernorm.weight",
                 "on_missing_tensor")


def test_truncated_safetensors(fam, tmp_path, capsys):
    shard = sorted((fam / "ft1").glob("model-*.safetensors"))[1]
    os.truncate(shard, shard.stat().st_size - 100)
    expect_error(tmp_path, capsys, ta_recipe(fam), shard.name, "truncated")


def test_corrupt_safetensors(fam, tmp_path, capsys):
    (fam / "ft2" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    expect_error(tmp_path, capsys, ta_recipe(fam), "ft2", "model.safetensors")


def test_nan_in_input_is_an_error_unless_allowed(fam, tmp_path, capsys):
    path = sorted((fam / "ft1").glob("model-*.safetensors"))[1]
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name][0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    expect_error(tmp_path, capsys, ta_recipe(fam), name, "NaN", "ft1")
    recipe = tmp_path / "recipe.yml"
    code, _, err = run_cli(["merge", recipe, tmp_path / "out", "-q", "--allow-nonfinite"], capsys)
    assert code == 0, err
    assert torch.isnan(load_folder(tmp_path / "out")[name][0]).any()


def test_output_exists(fam, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    recipe = write_recipe(tmp_path / "recipe.yml", ta_recipe(fam))
    code, _, err = run_cli(["merge", recipe, out, "-q"], capsys)
    assert code == 2 and "exists" in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    code, _, err = run_cli(["merge", recipe, out, "-q", "--overwrite"], capsys)
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_disk_full_keeps_partial_then_resume_completes(fam, tmp_path, capsys, monkeypatch):
    from mergekit_like.io import writer as writer_mod

    recipe = write_recipe(tmp_path / "recipe.yml", ta_recipe(fam))
    out = tmp_path / "out"
    calls = {"n": 0}
    real = writer_mod.ShardWriter.write

    def full_after_a_while(self, name, tensor):
        calls["n"] += 1
        if calls["n"] > 12:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, name, tensor)

    monkeypatch.setattr(writer_mod.ShardWriter, "write", full_after_a_while)
    code, _, err = run_cli(["merge", recipe, out, "-q", "--out-shard-size", "8KB"], capsys)
    assert code == 2 and "disk full while writing model-" in err and "Traceback" not in err
    assert not out.exists()
    partial = tmp_path / ".out.partial"
    assert partial.is_dir()
    monkeypatch.setattr(writer_mod.ShardWriter, "write", real)
    code, _, err = run_cli(["merge", recipe, out, "-q", "--out-shard-size", "8KB"], capsys)
    assert code == 0, err
    assert "resumed" in err and not partial.exists()
    fresh = tmp_path / "fresh"
    code, _, err = run_cli(["merge", recipe, fresh, "-q", "--out-shard-size", "8KB"], capsys)
    assert code == 0
    for f in sorted(fresh.glob("*.safetensors")):
        assert f.read_bytes() == (out / f.name).read_bytes()


def test_pickle_refused_unless_allowed(tmp_path, capsys):
    folders = make_family(tmp_path / "fam", SHAPE, n_finetunes=1)
    ft = folders[1]
    torch.save(load_file(ft / "model.safetensors"), ft / "pytorch_model.bin")
    (ft / "model.safetensors").unlink()
    doc = {"merge_method": "task_arithmetic", "base_model": str(folders[0]),
           "models": [{"model": str(ft), "parameters": {"weight": 1.0}}]}
    expect_error(tmp_path, capsys, doc, "pickle", "--allow-pickle")
    code, _, err = run_cli(["merge", tmp_path / "recipe.yml", tmp_path / "out", "-q",
                            "--allow-pickle"], capsys)
    assert code == 0, err
    assert torch.equal(load_folder(tmp_path / "out")["model.norm.weight"],
                       load_file(folders[0] / "model.safetensors")["model.norm.weight"]
                       + (torch.load(ft / "pytorch_model.bin")["model.norm.weight"]
                          - load_file(folders[0] / "model.safetensors")["model.norm.weight"]))


def test_vocab_policy_base_is_refused_up_front(fam, tmp_path, capsys):
    expect_error(tmp_path, capsys, ta_recipe(fam, vocab_policy="base"), "recipe.yml:",
                 "vocab_policy", "use 'common' or 'error'")


def test_tied_base_with_untied_model_needs_on_extra_tensor(tmp_path, capsys):
    tied = LlamaShape(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      tie_word_embeddings=True)
    base = make_family(tmp_path / "tied", tied, n_finetunes=0)[0]
    ft = make_family(tmp_path / "untied", SHAPE, n_finetunes=1)[1]
    doc = {"merge_method": "task_arithmetic", "base_model": str(base),
           "models": [{"model": str(ft), "parameters": {"weight": 1.0}}]}
    expect_error(tmp_path, capsys, doc, "lm_head.weight", "on_extra_tensor")
    doc["on_extra_tensor"] = "ignore"
    code, _, err = run_cli(["merge", tmp_path / "recipe.yml", tmp_path / "out", "-q"], capsys)
    write_recipe(tmp_path / "recipe.yml", doc)
    code, _, err = run_cli(["merge", tmp_path / "recipe.yml", tmp_path / "out", "-q"], capsys)
    assert code == 0, err
    assert "lm_head.weight" not in load_folder(tmp_path / "out")


def test_usage_errors_exit_2_without_traceback(tmp_path, capsys):
    code, _, err = run_cli(["merge", tmp_path / "recipe.yml"], capsys)
    assert code == 2 and "Missing argument" in err and "Traceback" not in err
    code, _, err = run_cli(["merge", "r.yml", tmp_path / "o", "--device", "tpu"], capsys)
    assert code == 2 and "error:" in err
