"""Reading local checkpoints: header validation, layouts, pickle policy, LRU reads, identity."""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
from pathlib import Path

import pytest
from support.helpers import copy_model, shard_names
import torch
from safetensors.torch import load_file, save_file

from mergekit_like.demo import LlamaShape, make_family
from mergekit_like.errors import MergeError
from mergekit_like.io.inspect import describe
from mergekit_like.io.local import LocalSource, open_source
from mergekit_like.io.safetensors_header import human_bytes, read_header

SHAPE = LlamaShape()
SHARD = 100_000  # bytes; the default tiny Llama (~0.6 MB f32) becomes several shards


def write_raw(path: Path, entries: list[tuple[str, str, list[int], tuple[int, int]]],
              data: bytes, metadata: dict | None = None) -> None:
    """A safetensors file written by hand, entries in exactly the given JSON order."""
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, offs in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": list(offs)}
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    single = make_family(root / "s", SHAPE, n_finetunes=0)[0]
    sharded = make_family(root / "m", SHAPE, n_finetunes=0, shard_bytes=[SHARD])[0]
    return {"single": single, "sharded": sharded}


# ---------------------------------------------------------------- layouts


def test_single_layout(models):
    src = LocalSource(models["single"], "org/single")
    infos = src.tensors()
    assert src.layout == "single"
    assert set(infos) == set(SHAPE.tensor_shapes())
    expect = load_file(str(models["single"] / "model.safetensors"))
    for name, info in infos.items():
        assert info.file == "model.safetensors"
        assert info.dtype == "F32"
        assert info.shape == SHAPE.tensor_shapes()[name]
        assert torch.equal(src.read_tensor(name), expect[name])
    assert src.weight_bytes() == SHAPE.num_params() * 4
    assert src.config()["num_hidden_layers"] == SHAPE.num_hidden_layers


def test_sharded_layout_matches_index(models):
    folder = models["sharded"]
    src = LocalSource(folder, "org/sharded")
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert src.layout == "sharded"
    assert len(shard_names(folder)) >= 3
    assert src.files == shard_names(folder)
    assert {n: i.file for n, i in src.tensors().items()} == weight_map


def test_layouts_read_identical_tensors(models):
    a = LocalSource(models["single"], "a")
    b = LocalSource(models["sharded"], "b")
    assert set(a.tensors()) == set(b.tensors())
    for name in a.tensors():
        ta, tb = a.read_tensor(name), b.read_tensor(name)
        assert ta.dtype == tb.dtype == torch.float32
        assert torch.equal(ta, tb), name


def test_storage_order_is_file_then_offset(models):
    src = LocalSource(models["sharded"], "m")
    infos = list(src.tensors().values())
    keys = [(src.files.index(i.file), i.data_offsets[0]) for i in infos]
    assert keys == sorted(keys)
    assert len({i.file for i in infos}) > 1


def test_storage_order_ignores_header_json_order(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    a = torch.arange(4, dtype=torch.float32)
    b = torch.arange(2, dtype=torch.int64)
    # JSON lists 'a' first, but 'b' is stored first in the data buffer.
    write_raw(folder / "model.safetensors",
              [("a", "F32", [4], (16, 32)), ("b", "I64", [2], (0, 16))],
              b.numpy().tobytes() + a.numpy().tobytes())
    src = LocalSource(folder, "m")
    assert list(src.tensors()) == ["b", "a"]
    assert torch.equal(src.read_tensor("a"), a)
    assert torch.equal(src.read_tensor("b"), b)
    assert src.config() is None


def test_read_header_returns_header_metadata_and_length(models):
    path = models["single"] / "model.safetensors"
    header, metadata, n = read_header(path, model="x")
    assert metadata == {"format": "pt"}
    assert "__metadata__" not in header
    assert set(header) == set(SHAPE.tensor_shapes())
    assert 8 + n + max(e["data_offsets"][1] for e in header.values()) == path.stat().st_size


def test_human_bytes():
    assert human_bytes(4_200_000_000) == "4.20 GB"
    assert human_bytes(3_100_000_000) == "3.10 GB"
    assert human_bytes(999) == "999 B"
    assert human_bytes(65_536) == "65.54 KB"


# ---------------------------------------------------------------- broken inputs


def test_truncated_shard_error_names_model_file_and_sizes(models, tmp_path):
    folder = copy_model(models["sharded"], tmp_path / "m")
    victim = folder / shard_names(folder)[1]
    size = victim.stat().st_size
    header, _, n = read_header(victim, model="x")
    declared = max(e["data_offsets"][1] for e in header.values())
    os.truncate(victim, size - 1000)
    with pytest.raises(MergeError) as ei:
        LocalSource(folder, "org/x")
    msg = str(ei.value)
    assert msg == (f"org/x: {victim.name} is truncated (header declares {human_bytes(declared)} "
                   f"of data, file has {human_bytes(declared - 1000)})")


def test_garbage_file_is_not_safetensors(models, tmp_path):
    folder = copy_model(models["single"], tmp_path / "m")
    path = folder / "model.safetensors"
    path.write_bytes(b"\xde\xad\xbe\xef" * 64 + path.read_bytes()[256:])
    with pytest.raises(MergeError, match=r"^org/x: model.safetensors is not a safetensors file"):
        LocalSource(folder, "org/x")


def test_header_not_json(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    body = b"{not json}      "
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(MergeError, match="not valid JSON"):
        LocalSource(folder, "org/x")


@pytest.mark.parametrize("entries,data_len,pattern", [
    ([("a", "F32", [2], (0, 8)), ("b", "F32", [2], (4, 12))], 12, "overlaps"),
    ([("a", "F32", [2], (0, 8)), ("b", "F32", [2], (12, 20))], 20, "hole"),
    ([("a", "F32", [3], (0, 8))], 8, "needs 12"),
    ([("a", "F32", [2], (0, 8))], 12, "unexpected bytes"),
    ([("a", "F8_E4M3", [8], (0, 8))], 8, r"F8_E4M3.*not supported"),
    ([("a", "Q9", [8], (0, 8))], 8, "unknown dtype 'Q9'"),
])
def test_bad_headers_are_refused(tmp_path, entries, data_len, pattern):
    folder = tmp_path / "m"
    folder.mkdir()
    write_raw(folder / "model.safetensors", entries, bytes(data_len))
    with pytest.raises(MergeError, match=pattern) as ei:
        LocalSource(folder, "org/x")
    assert str(ei.value).startswith("org/x: model.safetensors ")


def test_duplicate_tensor_names_refused(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    e = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    raw = f'{{"a": {e}, "a": {e}}}'.encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4))
    with pytest.raises(MergeError, match="'a' appears twice"):
        LocalSource(folder, "org/x")


def edit_index(folder: Path, fn) -> None:
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    fn(index["weight_map"])
    path.write_text(json.dumps(index))


def test_index_names_missing_file(models, tmp_path):
    folder = copy_model(models["sharded"], tmp_path / "m")
    edit_index(folder, lambda wm: wm.update({"lm_head.weight": "model-00099-of-00099.safetensors"}))
    with pytest.raises(MergeError, match=r"^org/x: .*lists model-00099-of-00099.safetensors, "
                                         r"which is missing"):
        LocalSource(folder, "org/x")


def test_index_entry_escaping_folder(models, tmp_path):
    folder = copy_model(models["sharded"], tmp_path / "m")
    shutil.copy(folder / shard_names(folder)[0], tmp_path / "x.safetensors")  # exists outside
    edit_index(folder, lambda wm: wm.update({"lm_head.weight": "../x.safetensors"}))
    with pytest.raises(MergeError, match=r"'\.\./x\.safetensors'.*not a file inside"):
        LocalSource(folder, "org/x")


def test_header_tensor_missing_from_index(models, tmp_path):
    folder = copy_model(models["sharded"], tmp_path / "m")
    edit_index(folder, lambda wm: wm.pop("model.norm.weight"))
    with pytest.raises(MergeError, match=r"holds 'model.norm.weight', which .* does not list"):
        LocalSource(folder, "org/x")


def test_index_tensor_missing_from_header(models, tmp_path):
    folder = copy_model(models["sharded"], tmp_path / "m")
    first = shard_names(folder)[0]
    edit_index(folder, lambda wm: wm.update({"ghost.weight": first}))
    with pytest.raises(MergeError, match=rf"puts 'ghost.weight' in {first}, but"):
        LocalSource(folder, "org/x")


def test_missing_folder_and_no_weights(tmp_path):
    with pytest.raises(MergeError, match=r"^org/x: model folder does not exist"):
        LocalSource(tmp_path / "nope", "org/x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(MergeError, match=r"^org/y: no model weights"):
        LocalSource(tmp_path / "empty", "org/y")
    (tmp_path / "empty" / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(MergeError, match="need their index"):
        LocalSource(tmp_path / "empty", "org/y")


def test_quantization_config_refused(models, tmp_path):
    folder = copy_model(models["single"], tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8"}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MergeError, match=r"^org/q: quantized checkpoint .*quant_method=fp8"):
        LocalSource(folder, "org/q")


# ---------------------------------------------------------------- pickle


def make_pickle_model(models, tmp_path, sharded: bool) -> Path:
    folder = tmp_path / ("pb" if sharded else "p")
    folder.mkdir()
    shutil.copy(models["single"] / "config.json", folder / "config.json")
    sd = load_file(str(models["single"] / "model.safetensors"))
    if not sharded:
        torch.save(sd, folder / "pytorch_model.bin")
        return folder
    names = list(sd)
    parts = [names[: len(names) // 2], names[len(names) // 2:]]
    wm = {}
    for k, part in enumerate(parts, start=1):
        fname = f"pytorch_model-{k:05d}-of-00002.bin"
        torch.save({n: sd[n] for n in part}, folder / fname)
        wm.update({n: fname for n in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    return folder


@pytest.mark.parametrize("sharded", [False, True])
def test_pickle_refused_then_loaded_with_allow_pickle(models, tmp_path, sharded):
    folder = make_pickle_model(models, tmp_path, sharded)
    with pytest.raises(MergeError) as ei:
        LocalSource(folder, "org/p")
    msg = str(ei.value)
    assert msg.startswith("org/p: only pickle weights (pytorch_model.bin")
    assert "--allow-pickle" in msg
    src = LocalSource(folder, "org/p", allow_pickle=True)
    ref = LocalSource(models["single"], "ref")
    assert set(src.tensors()) == set(ref.tensors())
    for name, info in src.tensors().items():
        assert info.file.endswith(".bin")
        assert info.dtype == "F32"
        assert info.data_offsets == (0, info.nbytes)
        assert torch.equal(src.read_tensor(name), ref.read_tensor(name))
    ident = src.identity()
    assert set(ident["files"]) == set(src.files)
    assert all(len(v["sha256"]) == 64 for v in ident["files"].values())
    src.close()


# ---------------------------------------------------------------- reads, identity, files


def test_read_tensor_owns_its_memory(models):
    src = LocalSource(models["sharded"], "m")
    name = "model.layers.0.mlp.up_proj.weight"
    t = src.read_tensor(name)
    before = t.clone()
    assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    t.add_(1.0)
    again = src.read_tensor(name)
    assert torch.equal(again, before)
    assert not torch.equal(again, t)
    on_disk = load_file(str(models["sharded"] / src.tensors()[name].file))[name]
    assert torch.equal(on_disk, before)


def test_lru_keeps_at_most_two_handles_and_threads_read(models):
    src = LocalSource(models["sharded"], "m")
    names = list(src.tensors())
    results: dict[str, torch.Tensor] = {}

    def reader():
        for n in names:
            results[n] = src.read_tensor(n)

    th = threading.Thread(target=reader)
    th.start()
    for n in reversed(names):
        src.read_tensor(n)
        assert len(src._handles) <= 2
    th.join()
    ref = LocalSource(models["single"], "s")
    assert all(torch.equal(results[n], ref.read_tensor(n)) for n in names)
    src.close()
    assert not src._handles
    assert torch.equal(src.read_tensor(names[0]), results[names[0]])  # reopens after close


def test_read_rows(models):
    src = LocalSource(models["sharded"], "m")
    full = src.read_tensor("model.embed_tokens.weight")
    part = src.read_rows("model.embed_tokens.weight", 10, 20)
    assert torch.equal(part, full[10:20])
    with pytest.raises(MergeError, match="has no tensor 'nope'"):
        src.read_tensor("nope")


def test_identity_changes_when_a_file_changes(models, tmp_path):
    folder = copy_model(models["sharded"], tmp_path / "m")
    first = LocalSource(folder, "m").identity()
    assert first["kind"] == "local"
    assert set(first["files"]) == set(shard_names(folder))
    for entry in first["files"].values():
        assert set(entry) == {"size", "header_sha256", "mtime_ns"}
    assert LocalSource(folder, "m").identity() == first  # stable
    # Rewrite one shard: same tensors, different metadata -> header hash changes.
    victim = folder / shard_names(folder)[0]
    save_file(load_file(str(victim)), str(victim), metadata={"format": "pt", "x": "1"})
    second = LocalSource(folder, "m").identity()
    assert second != first
    assert second["files"][victim.name] != first["files"][victim.name]
    other = shard_names(folder)[1]
    assert second["files"][other] == first["files"][other]


def test_list_and_fetch_files(models, tmp_path):
    folder = copy_model(models["sharded"], tmp_path / "m")
    for extra in ("README.md", ".gitattributes", "tokenizer.json", "pytorch_model.bin",
                  "consolidated.pth"):
        (folder / extra).write_text("x")
    (folder / "sub").mkdir()
    (folder / "sub" / "special.txt").write_text("y")
    src = LocalSource(folder, "m")
    assert src.list_files() == ["config.json", "generation_config.json", "sub/special.txt",
                                "tokenizer.json"]
    assert src.fetch_file("tokenizer.json") == folder / "tokenizer.json"
    assert src.fetch_file("sub/special.txt").read_text() == "y"
    for bad in ("README.md", shard_names(folder)[0], "../m/config.json", "missing.json"):
        with pytest.raises(MergeError, match="has no file"):
            src.fetch_file(bad)


def test_open_source_and_describe(models):
    src = open_source(str(models["sharded"]), "org/m")
    assert isinstance(src, LocalSource) and src.ref == "org/m"
    summary = describe(src)
    assert summary.total_params == SHAPE.num_params()
    assert summary.total_bytes == SHAPE.num_params() * 4
    assert summary.num_layers == SHAPE.num_hidden_layers
    assert summary.sharded and summary.layout == "sharded"
    assert list(summary.files) == src.files
    assert sum(n for n, _ in summary.files.values()) == len(SHAPE.tensor_shapes())
    assert sum(f.bytes for f in summary.files.values()) == summary.total_bytes
    first = src.files[0]
    assert summary.files[first].tensors == sum(i.file == first for i in src.tensors().values())
    assert summary.dtypes == {"F32": len(SHAPE.tensor_shapes())}
    assert summary.dtype_bytes == {"F32": summary.total_bytes}
    assert [t.name for t in summary.tensors] == list(src.tensors())
    assert summary.architectures == ["LlamaForCausalLM"] and summary.model_type == "llama"
    single = describe(LocalSource(models["single"], "s"))
    assert not single.sharded and single.total_params == summary.total_params
