"""verify_output: a complete output passes; every kind of incompleteness is named."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
from support.helpers import copy_model, shard_names
import torch
from safetensors.torch import load_file, save_file

import mergekit_like.io.verify as verify_mod
from mergekit_like.demo import LlamaShape, make_family, write_checkpoint
from mergekit_like.errors import MergeError
from mergekit_like.io.verify import VerifyReport, verify_output

SHAPE = LlamaShape()
N_TENSORS = len(SHAPE.tensor_shapes())


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("out")
    single = make_family(root / "s", SHAPE, n_finetunes=0)[0]
    sharded = make_family(root / "m", SHAPE, n_finetunes=0, shard_bytes=[100_000])[0]
    return {"single": single, "sharded": sharded}


def index_of(folder: Path) -> dict:
    return json.loads((folder / "model.safetensors.index.json").read_text())


def test_good_single_folder_passes(outputs):
    rep = verify_output(outputs["single"])
    assert isinstance(rep, VerifyReport)
    assert rep.files == 1 and rep.file_names == ["model.safetensors"] and not rep.sharded
    assert rep.tensors == N_TENSORS
    assert rep.total_bytes == SHAPE.num_params() * 4
    assert rep.dtypes == Counter({"F32": N_TENSORS})


def test_good_sharded_folder_passes(outputs):
    folder = outputs["sharded"]
    rep = verify_output(folder)
    assert rep.sharded and rep.file_names == shard_names(folder) and rep.files == len(shard_names(folder))
    assert rep.files >= 3
    assert rep.tensors == N_TENSORS
    assert rep.total_bytes == index_of(folder)["metadata"]["total_size"]


def test_missing_shard(outputs, tmp_path):
    folder = copy_model(outputs["sharded"], tmp_path / "o")
    victim = shard_names(folder)[2]
    (folder / victim).unlink()
    with pytest.raises(MergeError, match=rf"{victim} is missing"):
        verify_output(folder)


def test_extra_tensor_in_shard(outputs, tmp_path):
    folder = copy_model(outputs["sharded"], tmp_path / "o")
    victim = folder / shard_names(folder)[1]
    tensors = load_file(str(victim))
    tensors["extra.weight"] = torch.zeros(3)
    save_file(tensors, str(victim), metadata={"format": "pt"})
    with pytest.raises(MergeError, match=rf"{victim.name} holds 'extra.weight'"):
        verify_output(folder)


def test_index_lists_tensor_the_shard_lacks(outputs, tmp_path):
    folder = copy_model(outputs["sharded"], tmp_path / "o")
    index = index_of(folder)
    index["weight_map"]["ghost"] = shard_names(folder)[0]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MergeError, match=rf"puts 'ghost' in {shard_names(folder)[0]}"):
        verify_output(folder)


def test_unreferenced_safetensors_file(outputs, tmp_path):
    folder = copy_model(outputs["sharded"], tmp_path / "o")
    save_file({"x": torch.zeros(1)}, str(folder / "stray.safetensors"))
    with pytest.raises(MergeError, match="stray.safetensors is not referenced"):
        verify_output(folder)
    single = copy_model(outputs["single"], tmp_path / "s")
    save_file({"x": torch.zeros(1)}, str(single / "model-00001-of-00002.safetensors"))
    with pytest.raises(MergeError, match="model-00001-of-00002.safetensors is not part"):
        verify_output(single)


def test_wrong_total_size(outputs, tmp_path):
    folder = copy_model(outputs["sharded"], tmp_path / "o")
    index = index_of(folder)
    real = index["metadata"]["total_size"]
    index["metadata"]["total_size"] = real + 4
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MergeError, match=rf"total_size is {real + 4}, but the tensors hold {real}"):
        verify_output(folder)


def nan_model(tmp_path: Path, sharded: bool) -> Path:
    gen = torch.Generator().manual_seed(1)
    tensors = {n: torch.randn(s, generator=gen) for n, s in SHAPE.tensor_shapes().items()}
    tensors["model.layers.2.mlp.down_proj.weight"][5, 7] = float("nan")
    tensors["model.norm.weight"][3] = float("inf")
    folder = tmp_path / ("nan_m" if sharded else "nan_s")
    write_checkpoint(folder, tensors, SHAPE.config(torch.float32),
                     100_000 if sharded else None)
    return folder


@pytest.mark.parametrize("sharded", [False, True])
def test_nonfinite_tensor_named_and_allowed(tmp_path, sharded):
    folder = nan_model(tmp_path, sharded)
    weight_map = (index_of(folder)["weight_map"] if sharded
                  else {n: "model.safetensors" for n in SHAPE.tensor_shapes()})
    # Files are checked in order, tensors in storage order: the first bad one is reported.
    first_file = min(weight_map[n] for n in
                     ("model.layers.2.mlp.down_proj.weight", "model.norm.weight"))
    with pytest.raises(MergeError) as ei:
        verify_output(folder)
    msg = str(ei.value)
    assert f"{first_file}: tensor '" in msg and "non-finite" in msg
    bad = msg.split("tensor '")[1].split("'")[0]
    assert bad in ("model.layers.2.mlp.down_proj.weight", "model.norm.weight")
    assert weight_map[bad] == first_file
    rep = verify_output(folder, allow_nonfinite=True)
    assert rep.tensors == N_TENSORS
    assert verify_output(folder, read_data=False).tensors == N_TENSORS  # headers only


def test_nonfinite_found_in_row_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(verify_mod, "BLOCK_BYTES", 1024)  # force the get_slice path
    folder = tmp_path / "o"
    t = torch.zeros(300, 64)
    t[299, 63] = float("-inf")  # in the last block only
    write_checkpoint(folder, {"w": t, "ok": torch.ones(300, 64)}, {"model_type": "x"})
    with pytest.raises(MergeError, match=r"model.safetensors: tensor 'w' has non-finite values \(Inf\)"):
        verify_output(folder)
    assert verify_output(folder, allow_nonfinite=True).tensors == 2


def test_leftover_state_dir(outputs, tmp_path):
    folder = copy_model(outputs["single"], tmp_path / "o")
    (folder / ".mergekit_like_state" / "done").mkdir(parents=True)
    with pytest.raises(MergeError, match=r"incomplete output \(\.mergekit_like_state/"):
        verify_output(folder)
    assert verify_output(folder, allow_state_dir=True).tensors == N_TENSORS


def test_config_missing_or_invalid(outputs, tmp_path):
    folder = copy_model(outputs["single"], tmp_path / "o")
    (folder / "config.json").write_text("{oops")
    with pytest.raises(MergeError, match="config.json is not valid JSON"):
        verify_output(folder)
    (folder / "config.json").unlink()
    with pytest.raises(MergeError, match="config.json is missing"):
        verify_output(folder)


def test_truncated_and_missing_weights(outputs, tmp_path):
    folder = copy_model(outputs["sharded"], tmp_path / "o")
    victim = folder / shard_names(folder)[-1]
    os.truncate(victim, victim.stat().st_size - 4)
    with pytest.raises(MergeError, match=rf"{victim.name} is truncated"):
        verify_output(folder)
    empty = tmp_path / "e"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(MergeError, match="no weights"):
        verify_output(empty)
    with pytest.raises(MergeError, match="does not exist"):
        verify_output(tmp_path / "nope")
