"""End-to-end merges through the CLI, re-read and compared with independent computations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from support.helpers import (config_of, folder_digest, load_folder, ref_dare_keep, ref_ties, run_cli,
                     write_recipe)

from mergekit_like.demo import LlamaShape, make_family

SHAPE = LlamaShape(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    # different shard layouts across the inputs
    make_family(root, SHAPE, n_finetunes=3, dtype=torch.float32,
                shard_bytes=[None, 20_000, None, 9_000])
    return root


def _models(family):
    return {name: load_folder(family / name) for name in ("base", "ft1", "ft2", "ft3")}


def _merge(tmp_path, capsys, doc, *extra):
    recipe = write_recipe(tmp_path / "recipe.yml", doc)
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", recipe, out, "--quiet", *extra], capsys)
    assert code == 0, err
    return out


def test_task_arithmetic_matches_hand_computation(family, tmp_path, capsys):
    doc = {"merge_method": "task_arithmetic", "base_model": str(family / "base"),
           "models": [{"model": str(family / "ft1"), "parameters": {"weight": 1.0}},
                      {"model": str(family / "ft2"), "parameters": {"weight": 0.5}}],
           "parameters": {"lambda": 0.5}, "dtype": "float32"}
    out = _merge(tmp_path, capsys, doc)
    m = _models(family)
    got = load_folder(out)
    assert set(got) == set(m["base"])
    for name, b in m["base"].items():
        want = b + 0.5 * (1.0 * (m["ft1"][name] - b) + 0.5 * (m["ft2"][name] - b))
        torch.testing.assert_close(got[name], want, rtol=0, atol=2e-7)
    assert (out / "mergekit_config.yml").read_text() == (tmp_path / "recipe.yml").read_text()


def test_linear_normalized_mean_and_bf16_output(family, tmp_path, capsys):
    doc = {"merge_method": "linear",
           "models": [{"model": str(family / "ft1"), "parameters": {"weight": 3.0}},
                      {"model": str(family / "ft3"), "parameters": {"weight": 1.0}}],
           "out_dtype": "bfloat16"}
    out = _merge(tmp_path, capsys, doc)
    m = _models(family)
    got = load_folder(out)
    for name in m["base"]:
        want = ((3.0 * m["ft1"][name] + 1.0 * m["ft3"][name]) / 4.0).to(torch.bfloat16)
        assert got[name].dtype == torch.bfloat16
        assert torch.equal(got[name], want), name
    assert config_of(out)["torch_dtype"] == "bfloat16"


def test_ties_with_gradient_and_filter(family, tmp_path, capsys):
    doc = {"merge_method": "ties", "base_model": str(family / "base"),
           "models": [{"model": str(family / "ft1"), "parameters": {"weight": 1.0, "density": 0.5}},
                      {"model": str(family / "ft2"),
                       "parameters": {"weight": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}],
                                      "density": [1.0, 0.3]}},
                      {"model": str(family / "ft3"), "parameters": {"weight": 0.7, "density": 0.2}}]}
    out = _merge(tmp_path, capsys, doc)
    m = _models(family)
    got = load_folder(out)
    for name, b in m["base"].items():
        layer = int(name.split(".")[2]) if ".layers." in name else None
        t = 0.0 if layer is None else layer / (SHAPE.num_hidden_layers - 1)
        w2 = 0.5 if "mlp" in name else 1.0
        grad = [1.0, 0.3]  # the recipe gradient formula with n = 2
        i0 = int(t)
        i1 = min(1, i0 + 1)
        f = t - i0
        d2 = (1 - f) * grad[i0] + f * grad[i1]
        want = ref_ties(b, [m["ft1"][name], m["ft2"][name], m["ft3"][name]],
                        [1.0, w2, 0.7], [0.5, d2, 0.2])
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6)


def test_dare_ties_mask_is_the_normative_one(family, tmp_path, capsys):
    doc = {"merge_method": "dare_ties", "base_model": str(family / "base"), "seed": 3,
           "models": [{"model": str(family / "ft1"), "parameters": {"weight": 1.0, "density": 0.4}},
                      {"model": str(family / "ft2"), "parameters": {"weight": 1.0, "density": 0.6}}]}
    out = _merge(tmp_path, capsys, doc)
    m = _models(family)
    got = load_folder(out)
    for name, b in m["base"].items():
        kept = []
        for idx, (ft, d) in enumerate([("ft1", 0.4), ("ft2", 0.6)]):
            keep = torch.from_numpy(ref_dare_keep(3, idx, name, b.numel(), d)).reshape(b.shape)
            kept.append((m[ft][name] - b) * keep / d)
        total = kept[0] + kept[1]
        sign = torch.where(total >= 0, 1.0, -1.0)
        want = b + sum(k * (torch.sign(k) == sign) for k in kept)
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6)
    assert "splitmix64-v1" in (out / "README.md").read_text()


def test_slerp_endpoints_and_midpoint(family, tmp_path, capsys):
    doc = {"merge_method": "slerp", "base_model": str(family / "base"),
           "models": [{"model": str(family / "base")}, {"model": str(family / "ft1")}],
           "parameters": {"t": [{"filter": "norm", "value": 0.0}, {"filter": "lm_head", "value": 1.0},
                                {"value": 0.5}]}}
    out = _merge(tmp_path, capsys, doc)
    m = _models(family)
    got = load_folder(out)
    for name, b in m["base"].items():
        x = m["ft1"][name]
        if "norm" in name:
            assert torch.equal(got[name], b)
        elif "lm_head" in name:
            assert torch.equal(got[name], x)
        else:
            v0, v1 = b.double().reshape(-1), x.double().reshape(-1)
            c = float((v0 / v0.norm()) @ (v1 / v1.norm()))
            theta = np.arccos(c)
            want = (np.sin(theta / 2) / np.sin(theta)) * (v0 + v1)
            torch.testing.assert_close(got[name].double().reshape(-1), want, rtol=1e-5, atol=1e-7)


def test_same_result_whatever_the_input_shard_layout(family, tmp_path, capsys):
    other = tmp_path / "single"
    make_family(other, SHAPE, n_finetunes=3, dtype=torch.float32)  # same seed, one file each
    outs = []
    for k, root in enumerate((family, other)):
        doc = {"merge_method": "ties", "base_model": str(root / "base"),
               "models": [{"model": str(root / f"ft{k}"), "parameters": {"weight": 1.0, "density": 0.5}}
                          for k in (1, 2, 3)], "out_dtype": "bfloat16"}
        work = tmp_path / f"work{k}"
        work.mkdir()
        outs.append(_merge(work, capsys, doc))
    a, b = load_folder(outs[0]), load_folder(outs[1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_output_loads_in_transformers(family, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    doc = {"merge_method": "task_arithmetic", "base_model": str(family / "base"),
           "models": [{"model": str(family / "ft1"), "parameters": {"weight": 1.0}}],
           "out_dtype": "bfloat16"}
    out = _merge(tmp_path, capsys, doc, "--out-shard-size", "10KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files[0].endswith(f"-of-{len(files):05d}.safetensors")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    merged = load_folder(out)
    for name, p in model.state_dict().items():
        assert torch.equal(p, merged[name]), name
    # forward in float32: bf16 matmul kernels can hit unsupported CPU instructions on CI machines
    logits = model.float()(torch.tensor([[1, 5, 9]])).logits
    assert logits.shape == (1, 3, SHAPE.vocab_size) and torch.isfinite(logits).all()
    code, out_text, _ = run_cli(["verify", out], capsys)
    assert code == 0 and f"{len(merged)} tensors in {len(files)} file(s)" in out_text


def test_tied_embeddings_and_non_float_buffers(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    shape = LlamaShape(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       tie_word_embeddings=True)
    make_family(tmp_path / "tied", shape, n_finetunes=2)
    doc = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "tied/base"),
           "models": [{"model": str(tmp_path / f"tied/ft{k}"), "parameters": {"weight": 0.5}}
                      for k in (1, 2)]}
    out = _merge(tmp_path, capsys, doc)
    got = load_folder(out)
    assert "lm_head.weight" not in got and config_of(out)["tie_word_embeddings"] is True
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.lm_head.weight, got["model.embed_tokens.weight"])


def test_int_buffers_are_copied_from_the_base(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    folders = make_family(tmp_path / "fam", SHAPE, n_finetunes=2)
    for k, folder in enumerate(folders):
        tensors = load_file(folder / "model.safetensors")
        tensors["model.position_ids"] = torch.arange(8, dtype=torch.int64) * (1 + k)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    doc = {"merge_method": "task_arithmetic", "base_model": str(folders[0]),
           "models": [{"model": str(f), "parameters": {"weight": 1.0}} for f in folders[1:]]}
    recipe = write_recipe(tmp_path / "r.yml", doc)
    code, _, err = run_cli(["merge", recipe, tmp_path / "out", "-q"], capsys)
    assert code == 0, err
    got = load_folder(tmp_path / "out")
    assert got["model.position_ids"].dtype == torch.int64
    assert torch.equal(got["model.position_ids"], torch.arange(8))
    assert "position_ids" in err  # the differing copies are reported


def test_dry_run_prints_plan_and_writes_nothing(family, tmp_path, capsys):
    doc = {"merge_method": "ties", "base_model": str(family / "base"),
           "models": [{"model": str(family / "ft1"), "parameters": {"weight": 1.0, "density": 0.5}}]}
    recipe = write_recipe(tmp_path / "r.yml", doc)
    code, out, err = run_cli(["merge", recipe, tmp_path / "out", "--dry-run"], capsys)
    assert code == 0, err
    n = len(SHAPE.tensor_shapes())
    assert f"output tensors: {n}" in out and "bytes to read" in out and "peak memory" in out
    assert list(tmp_path.iterdir()) == [recipe]


def test_side_files_card_and_tokenizer(family, tmp_path, capsys):
    donor = tmp_path / "tokdonor"
    make_family(donor, SHAPE, n_finetunes=0)
    (donor / "base" / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    (donor / "base" / "README.md").write_text("donor card, never copied")
    doc = {"merge_method": "task_arithmetic", "base_model": str(family / "base"),
           "tokenizer_source": str(donor / "base"),
           "models": [{"model": str(family / "ft1"), "parameters": {"weight": 1.0}}]}
    out = _merge(tmp_path, capsys, doc)
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 128}'
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert "merge" in front["tags"] and "mergekit_like" in front["tags"]
    assert "task_arithmetic" in front["tags"] and "donor card" not in card
    assert {p.name for p in tmp_path.iterdir()} == {"recipe.yml", "out", "tokdonor"}
    assert folder_digest(out)  # readable, no partial/lock left beside it


def test_merge_of_local_folders_never_imports_the_hub_client(family, tmp_path):
    """The Hub client (huggingface_hub.hf_api and its HTTP stack, ~0.2 s) is imported only for a
    Hub reference: a merge of local folders runs in a fresh process without it."""
    import subprocess
    import sys

    doc = {"merge_method": "linear",
           "models": [{"model": str(family / name), "parameters": {"weight": 1.0}}
                      for name in ("ft1", "ft2")]}
    recipe = write_recipe(tmp_path / "recipe.yml", doc)
    probe = ("import sys\nfrom mergekit_like.cli import main\n"
             f"code = main(['merge', {str(recipe)!r}, {str(tmp_path / 'out')!r}, '--quiet'])\n"
             "print(code, 'huggingface_hub.hf_api' in sys.modules, "
             "'mergekit_like.hub.source' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-3:] == ["0", "False", "False"], done.stdout
    assert (tmp_path / "out" / "config.json").exists()
