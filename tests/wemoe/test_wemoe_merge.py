"""merge_method: wemoe — the upscaled checkpoint the merge writes (docs/methods/wemoe.md §2, §3)."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from support.helpers import load_folder, run_cli, write_recipe
from support.twin_fixture import tiny_family

from mergekit_like.io.verify import verify_output

TASKS = ["alpha", "beta"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return tiny_family(tmp_path_factory.mktemp("wemoe-family"), n_tasks=2)


def wemoe_doc(family, out_dtype="float32", weights=(1.0, 1.0), **params):
    return {"merge_method": "wemoe", "base_model": str(family[0]),
            "models": [{"model": str(f), "name": t, "parameters": {"weight": w}}
                       for f, t, w in zip(family[1:], TASKS, weights)],
            "parameters": params, "dtype": "float32", "out_dtype": out_dtype}


def ta_doc(family, weights, lam=0.3):
    """The task_arithmetic recipe WEMoE's static part (and untrained model) must equal."""
    return {"merge_method": "task_arithmetic", "base_model": str(family[0]),
            "models": [{"model": str(f), "parameters": {"weight": w}}
                       for f, w in zip(family[1:], weights)],
            "parameters": {"lambda": lam}, "dtype": "float32", "out_dtype": "float32"}


def merge(tmp_path, capsys, doc, name="up"):
    recipe = write_recipe(tmp_path / f"{name}.yml", doc)
    out = tmp_path / name
    code, _, err = run_cli(["merge", recipe, out, "-q"], capsys)
    return code, out, err


def test_names_shapes_config_and_files(family, tmp_path, capsys):
    code, out, err = merge(tmp_path, capsys, wemoe_doc(family, **{"lambda": 0.4}))
    assert code == 0, err
    tensors = load_folder(out) | load_folder_router(out)
    base = load_folder(family[0])
    T = len(TASKS)
    for layer in range(2):
        p = f"model.layers.{layer}.mlp"
        for linear in ("gate_proj", "up_proj", "down_proj"):
            w0 = base[f"{p}.{linear}.weight"]
            assert f"{p}.{linear}.weight" not in tensors
            assert torch.equal(tensors[f"{p}.base.{linear}.weight"], w0)
            experts = tensors[f"{p}.experts.{linear}.weight"]
            assert experts.shape == (T, *w0.shape)
            for t, ft in enumerate(family[1:]):
                torch.testing.assert_close(experts[t], load_folder(ft)[f"{p}.{linear}.weight"] - w0,
                                           rtol=0, atol=0)
        router = {k: tensors[f"{p}.router.{k}"] for k in ("fc1.weight", "fc1.bias", "fc2.weight",
                                                          "fc2.bias")}
        assert all(t.dtype == torch.float32 for t in router.values())
        assert router["fc1.weight"].shape == (32, 32) and router["fc2.weight"].shape == (T, 32)
        assert 0.005 < float(router["fc1.weight"].std()) < 0.015
        assert not router["fc2.weight"].any() and not router["fc1.bias"].any()
        torch.testing.assert_close(router["fc2.bias"], torch.tensor([0.4, 0.4]))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors",
                                                 "router.safetensors"}
    assert not (out / "model.safetensors").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "wemoe" and config["architectures"] == ["WEMoEForCausalLM"]
    assert config["base_model_type"] == "llama" and config["hidden_size"] == 32
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_wemoe.WEMoEForCausalLM"
    info = config["wemoe"]
    assert info["tasks"] == TASKS and info["lambda"] == 0.4 and info["router_hidden"] == 32
    code_sha = hashlib.sha256((out / "modeling_wemoe.py").read_bytes()).hexdigest()
    assert info["modeling_sha256"] == code_sha
    assert "task_arithmetic" in (out / "README.md").read_text()
    verify_output(out)


def load_folder_router(out):
    from safetensors.torch import load_file
    return load_file(str(out / "router.safetensors"))


def test_static_part_is_the_task_arithmetic_merge_bit_for_bit(family, tmp_path, capsys):
    code, out, err = merge(tmp_path, capsys, wemoe_doc(family, weights=(1.0, 0.5)))
    assert code == 0, err
    code, ta_out, err = merge(tmp_path, capsys, ta_doc(family, (1.0, 0.5)), name="ta")
    assert code == 0, err
    got, want = load_folder(out), load_folder(ta_out)
    static = [n for n in want if ".mlp." not in n]
    assert len(static) == len(want) - 6
    assert all(torch.equal(got[n], want[n]) for n in static)
    router = load_folder_router(out)
    torch.testing.assert_close(router["model.layers.0.mlp.router.fc2.bias"],
                               torch.tensor([0.3, 0.15]))


def test_sparse_and_lowrank_experts(family, tmp_path, capsys):
    code, out, err = merge(tmp_path, capsys, wemoe_doc(family, expert_density=0.1), name="sp")
    assert code == 0, err
    got, base = load_folder(out), load_folder(family[0])
    name = "model.layers.1.mlp.up_proj.weight"
    tau = load_folder(family[2])[name] - base[name]
    k = math.floor(0.1 * tau.numel())
    values = got["model.layers.1.mlp.experts.up_proj.weight_values"][1]
    indices = got["model.layers.1.mlp.experts.up_proj.weight_indices"][1]
    assert indices.dtype == torch.int32 and values.shape == (k,)
    expected = torch.topk(tau.abs().reshape(-1), k).indices.sort().values
    assert torch.equal(indices.long(), expected)
    assert torch.equal(values, tau.reshape(-1)[expected])
    code, out, err = merge(tmp_path, capsys, wemoe_doc(family, expert_rank="full"), name="lr")
    assert code == 0, err
    got = load_folder(out)
    a = got["model.layers.1.mlp.experts.up_proj.weight_A"][1]
    b = got["model.layers.1.mlp.experts.up_proj.weight_B"][1]
    torch.testing.assert_close(a @ b, tau, rtol=0, atol=1e-5)
    assert json.loads((out / "config.json").read_text())["wemoe"]["expert_storage"] == "lowrank"


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("base_model"), "needs base_model"),
    (lambda d: d["models"][1].pop("name"), "needs a task 'name'"),
    (lambda d: d["parameters"].update(expert_density=0.1, expert_rank=0.1), "mutually exclusive"),
    (lambda d: d["parameters"].update(router_hidden=0), "integer ≥ 1"),
    (lambda d: d.update(models=d["models"][:1]), "at least 2"),
])
def test_bad_recipes(family, tmp_path, capsys, change, message):
    doc = wemoe_doc(family)
    change(doc)
    code, out, err = merge(tmp_path, capsys, doc)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not out.exists()


def test_different_mlp_shapes_and_unsupported_types_are_refused(family, tmp_path, capsys):
    from mergekit_like.demo import LlamaShape

    other = tiny_family(tmp_path / "other", n_tasks=1,
                        shape=LlamaShape(vocab_size=64, hidden_size=32, intermediate_size=40,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2))
    doc = wemoe_doc(family)
    doc["models"][1]["model"] = str(other[1])
    code, out, err = merge(tmp_path, capsys, doc)
    assert code == 2 and "has shape" in err and ".mlp." in err and not out.exists()
    gpt = tmp_path / "gpt"
    for src in family:
        dst = gpt / src.name
        dst.mkdir(parents=True)
        for f in src.iterdir():
            (dst / f.name).write_bytes(f.read_bytes())
        config = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    doc = wemoe_doc([gpt / f.name for f in family])
    code, out, err = merge(tmp_path, capsys, doc, name="g")
    assert code == 2 and "model type 'gpt2' is not supported" in err and not out.exists()


def test_untrained_output_computes_the_task_arithmetic_model(family, tmp_path, capsys):
    """Through both loaders (remote code and the package's), the merge output's logits equal
    the task_arithmetic recipe's (float32, tight tolerance)."""
    transformers = pytest.importorskip("transformers")
    from mergekit_like.runtime import load_model
    from mergekit_like.wemoe.runtime import load_wemoe

    code, out, err = merge(tmp_path, capsys, wemoe_doc(family, weights=(1.0, 0.5)))
    assert code == 0, err
    code, ta_out, err = merge(tmp_path, capsys, ta_doc(family, (1.0, 0.5)), name="ta")
    assert code == 0, err
    ids = torch.tensor([[1, 5, 9, 13, 2, 7], [1, 3, 3, 40, 41, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    want = load_model(ta_out, device="cpu").model(input_ids=ids, attention_mask=mask).logits
    remote = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    own = load_wemoe(out, device="cpu").model
    with torch.no_grad():
        for model in (remote, own):
            got = model(input_ids=ids, attention_mask=mask).logits
            torch.testing.assert_close(got[mask.bool()], want[mask.bool()].detach(),
                                       rtol=1e-5, atol=1e-5)
