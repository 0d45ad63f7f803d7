"""Shard planning, the streaming shard writer and the async writer (docs/output_format.md §3–§4)."""

from __future__ import annotations

import errno
import hashlib
import json
import struct

import pytest
import torch
from huggingface_hub import constants as hf_constants
from safetensors import safe_open
from safetensors.torch import load_file

from mergekit_like.errors import MergeError
from mergekit_like.io import writer as writer_mod
from mergekit_like.io.output import OutputFolder
from mergekit_like.io.shards import index_json, parse_size, plan_shards
from mergekit_like.io.writer import AsyncShardWriter, ShardWriter, iter_write_order
from mergekit_like.methods.base import OutputSpec


def spec(name, shape, dtype=torch.float32):
    return OutputSpec(name, tuple(shape), dtype)


def sample(o: OutputSpec, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + sum(map(ord, o.name)))
    if o.dtype == torch.bool:
        return torch.randint(0, 2, o.shape, generator=g).bool()
    if not o.dtype.is_floating_point:
        return torch.randint(-1000, 1000, o.shape, generator=g).to(o.dtype)
    return torch.randn(o.shape, generator=g).to(o.dtype)


MIXED = [
    spec("a.bool", (3,), torch.bool),
    spec("b.bf16", (5, 3), torch.bfloat16),
    spec("c.scalar", (), torch.float32),
    spec("d.i64", (7,), torch.int64),
    spec("e.empty", (0, 4), torch.float16),
    spec("f.f16", (3, 3), torch.float16),
    spec("g.f32", (2, 5), torch.float32),
]


# ---- parse_size -------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("1234", 1234), (1234, 1234), ("5GB", 5 * 10**9), ("500MB", 500 * 10**6),
    ("2KB", 2000), ("1TB", 10**12), ("5B", 5 * 10**9), ("500M", 500 * 10**6), ("3K", 3000),
    ("2GiB", 2 * 2**30), ("64MiB", 64 * 2**20), ("1KiB", 1024), ("1.5GB", 1_500_000_000),
    (" 5 gb ", 5 * 10**9),
])
def test_parse_size_forms(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "abc", "5XB", "-5GB", "0", 0, -3, "5 G B", True])
def test_parse_size_rejects(bad):
    with pytest.raises(MergeError, match="--out-shard-size"):
        parse_size(bad)


# ---- planning ----------------------------------------------------------------------------------

def _check_alignment(plan):
    n = struct.unpack("<Q", plan.header_bytes[:8])[0]
    assert len(plan.header_bytes) == 8 + n and (8 + n) % 8 == 0
    header = json.loads(plan.header_bytes[8:])
    assert header["__metadata__"] == {"format": "pt"}
    offset = 0
    for t in plan.tensors:
        assert t.begin == offset and t.begin % t.dtype.itemsize == 0
        assert header[t.name]["data_offsets"] == [t.begin, t.end]
        assert header[t.name]["shape"] == list(t.shape)
        offset = t.end
    assert plan.data_size == offset and plan.file_size == len(plan.header_bytes) + offset


def test_plan_limit_oversized_and_names():
    outs = [spec(f"t{i}", (25,)) for i in range(5)]  # 100 bytes each
    outs.insert(2, spec("big", (100,)))  # 400 bytes > limit
    plans = plan_shards(outs, 250)
    assert [p.names for p in plans] == [["t0", "t1"], ["big"], ["t2", "t3"], ["t4"]]
    assert all(p.data_size <= 250 for p in plans if p.names != ["big"])
    assert [p.filename for p in plans] == [
        hf_constants.SAFETENSORS_WEIGHTS_FILE_PATTERN.format(suffix=f"-0000{i}-of-00004")
        for i in range(1, 5)]
    assert plans[0].filename == "model-00001-of-00004.safetensors"
    for p in plans:
        _check_alignment(p)
    idx = index_json(plans, "9.9")
    assert idx["metadata"] == {"total_size": 900, "total_parameters": 225,
                               "mergekit_like_version": "9.9"}
    assert idx["weight_map"]["big"] == plans[1].filename
    assert idx["weight_map"]["t4"] == plans[3].filename and len(idx["weight_map"]) == 6


def test_plan_single_shard_and_write_order():
    plans = plan_shards(MIXED, 10**9)
    assert len(plans) == 1 and plans[0].filename == hf_constants.SAFETENSORS_SINGLE_FILE
    # (itemsize desc, plan order)
    assert plans[0].names == ["d.i64", "c.scalar", "g.f32", "b.bf16", "e.empty", "f.f16",
                              "a.bool"]
    _check_alignment(plans[0])


def test_plan_pads_odd_header():
    for k in range(1, 12):  # names of varying length hit every padding remainder
        plans = plan_shards([spec("x" * k, (1,), torch.bool), spec("y", (3,), torch.float64)], 99)
        for p in plans:
            _check_alignment(p)


def test_plan_rejects_duplicates():
    with pytest.raises(MergeError, match="twice"):
        plan_shards([spec("a", (1,)), spec("a", (1,))], 100)


# ---- ShardWriter ------------------------------------------------------------------------------

def test_shard_writer_roundtrip_all_dtypes(tmp_path):
    (plan,) = plan_shards(MIXED, 10**9)
    data = {o.name: sample(o) for o in MIXED}
    w = ShardWriter(tmp_path / plan.filename, plan)
    for t in plan.tensors:
        w.write(t.name, data[t.name])
    marker = w.finish()
    path = tmp_path / plan.filename
    assert marker == {"file": plan.filename, "size": path.stat().st_size,
                      "header_sha256": plan.header_sha256,
                      "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert path.read_bytes()[:len(plan.header_bytes)] == plan.header_bytes
    with safe_open(str(path), framework="pt", device="cpu") as f:
        assert set(f.keys()) == set(data) and f.metadata() == {"format": "pt"}
        for name, ref in data.items():
            got = f.get_tensor(name)
            assert got.dtype == ref.dtype and got.shape == ref.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8))


def test_shard_writer_rejects_mismatches(tmp_path):
    (plan,) = plan_shards([spec("a", (2, 2)), spec("b", (3,))], 10**9)
    w = ShardWriter(tmp_path / plan.filename, plan)
    with pytest.raises(ValueError, match="expected 'a'"):
        w.write("b", torch.zeros(3))
    with pytest.raises(ValueError, match="shape"):
        w.write("a", torch.zeros(4))
    with pytest.raises(ValueError, match="dtype"):
        w.write("a", torch.zeros(2, 2, dtype=torch.float16))
    w.write("a", torch.zeros(2, 2))
    with pytest.raises(ValueError, match="before all tensors"):
        w.finish()


def test_shard_writer_noncontiguous_input(tmp_path):
    (plan,) = plan_shards([spec("t", (3, 2))], 10**9)
    src = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    w = ShardWriter(tmp_path / plan.filename, plan)
    w.write("t", src.t())
    w.finish()
    assert torch.equal(load_file(tmp_path / plan.filename)["t"], src.t())


# ---- AsyncShardWriter ------------------------------------------------------------------------

def _folder(tmp_path, plans, **kw):
    folder = OutputFolder(tmp_path / "out", overwrite=False, resume=kw.pop("resume", True),
                          resume_key=kw.pop("key", "k"),
                          planned_bytes=sum(p.file_size for p in plans), plans=plans)
    return folder


def test_async_writer_end_to_end(tmp_path):
    outs = MIXED + [spec(f"layer.{i}", (16, 8), torch.bfloat16) for i in range(6)]
    plans = plan_shards(outs, 600)
    assert len(plans) > 2
    data = {o.name: sample(o, 1) for o in outs}
    folder = _folder(tmp_path, plans)
    assert folder.prepare() == set()
    writer = AsyncShardWriter(folder, plans, skip=set())
    for name in iter_write_order(plans, set()):
        writer.submit(name, data[name])
    writer.close()
    folder.write_side_file(hf_constants.SAFETENSORS_INDEX_FILE,
                           json.dumps(index_json(plans, "0")))
    folder.finalize()
    out = tmp_path / "out"
    index = json.loads((out / hf_constants.SAFETENSORS_INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(data)
    loaded = {}
    for p in plans:
        assert (out / p.filename).stat().st_size == p.file_size
        part = load_file(out / p.filename)
        assert all(index["weight_map"][k] == p.filename for k in part)
        loaded.update(part)
    assert loaded.keys() == data.keys()
    for k, v in data.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v)


def test_async_writer_skip_and_order_errors(tmp_path):
    outs = [spec(f"t{i}", (4,)) for i in range(4)]
    plans = plan_shards(outs, 32)
    assert len(plans) == 2
    assert list(iter_write_order(plans, {plans[0].filename})) == ["t2", "t3"]
    folder = _folder(tmp_path, plans)
    folder.prepare()
    w = AsyncShardWriter(folder, plans, skip={plans[0].filename})
    with pytest.raises(ValueError, match="expected 't2'"):
        w.submit("t0", torch.zeros(4))
    with pytest.raises(ValueError, match="dtype"):
        w.submit("t2", torch.zeros(4, dtype=torch.float64))
    w.abort()
    folder.abort(keep_partial=False)
    assert not folder.partial.exists()


def test_async_writer_close_early_raises(tmp_path):
    plans = plan_shards([spec("a", (4,)), spec("b", (4,))], 10**9)
    folder = _folder(tmp_path, plans)
    folder.prepare()
    w = AsyncShardWriter(folder, plans, skip=set())
    w.submit("a", torch.ones(4))
    with pytest.raises(ValueError, match="before all tensors"):
        w.close()
    assert not (folder.done_dir / f"{plans[0].filename}.json").exists()
    folder.abort(keep_partial=False)


def test_enospc_becomes_merge_error(tmp_path, monkeypatch):
    outs = [spec(f"t{i}", (4,)) for i in range(6)]
    plans = plan_shards(outs, 32)  # three shards of two
    folder = _folder(tmp_path, plans)
    folder.prepare()
    real = ShardWriter._raw_write

    def full_on_third(self, data):
        if self.plan.filename == plans[2].filename and len(data) == 16:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, data)

    monkeypatch.setattr(writer_mod.ShardWriter, "_raw_write", full_on_third)
    w = AsyncShardWriter(folder, plans, skip=set())
    with pytest.raises(MergeError) as info:
        for name in iter_write_order(plans, set()):
            w.submit(name, torch.ones(4))
        w.close()
    assert str(info.value) == ("disk full while writing model-00003-of-00003.safetensors; "
                               "free space and re-run to resume")
    w.abort()
    folder.abort(keep_partial=True)
    assert (folder.done_dir / f"{plans[1].filename}.json").exists()
    assert not (folder.done_dir / f"{plans[2].filename}.json").exists()
    # a resume keeps the two finished shards
    again = _folder(tmp_path, plans)
    assert again.prepare() == {plans[0].filename, plans[1].filename}
    again.abort(keep_partial=False)


def test_enospc_plain_shard_writer(tmp_path, monkeypatch):
    (plan,) = plan_shards([spec("a", (4,))], 10**9)

    def full(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer_mod.ShardWriter, "_raw_write", full)
    with pytest.raises(MergeError, match="^disk full while writing model.safetensors;"):
        ShardWriter(tmp_path / plan.filename, plan)


def test_enospc_from_anywhere_in_thread_is_mapped(tmp_path, monkeypatch):
    plans = plan_shards([spec("a", (4,)), spec("b", (4,))], 16)

    def full(self, name, tensor):
        raise OSError(errno.ENOSPC, "No space left on device")

    folder = _folder(tmp_path, plans)
    folder.prepare()
    monkeypatch.setattr(writer_mod.ShardWriter, "write", full)
    w = AsyncShardWriter(folder, plans, skip={plans[0].filename})
    w.submit("b", torch.ones(4))
    with pytest.raises(MergeError, match="^disk full while writing model-00002-of-00002"):
        w.close()
    folder.abort(keep_partial=False)


def test_shard_writer_starts_writeback_of_written_ranges(tmp_path, monkeypatch):
    """Every WRITEBACK_BYTES written, the range since the last hint is handed to the kernel's
    write-back (flushed first, so the hint covers bytes that are in the file): the hints tile
    the file from byte 0 without gaps or overlap, and the file is unchanged by them."""
    monkeypatch.setattr(writer_mod, "WRITEBACK_BYTES", 1000)
    calls = []
    real = writer_mod.os.posix_fadvise if hasattr(writer_mod.os, "posix_fadvise") else None

    def record(fd, offset, nbytes, advice):
        calls.append((offset, nbytes, advice, writer_mod.os.fstat(fd).st_size))
        if real is not None:
            real(fd, offset, nbytes, advice)

    monkeypatch.setattr(writer_mod.os, "posix_fadvise", record, raising=False)
    monkeypatch.setattr(writer_mod.os, "POSIX_FADV_DONTNEED", 4, raising=False)
    specs = [spec(f"t{i}", (100 + 37 * i,)) for i in range(8)]      # 400 … 1436 bytes each
    (plan,) = plan_shards(specs, 10**9)
    data = {o.name: sample(o) for o in specs}
    w = ShardWriter(tmp_path / plan.filename, plan)
    for t in plan.tensors:
        w.write(t.name, data[t.name])
    w.finish()
    size = (tmp_path / plan.filename).stat().st_size
    assert len(calls) >= 5
    ends = 0
    for offset, nbytes, advice, file_size in calls:
        assert offset == ends and nbytes >= 1000 and advice == 4
        assert file_size >= offset + nbytes          # flushed before the hint
        ends = offset + nbytes
    assert size - ends < 1000 + 1436                  # the tail is left to finish()'s fsync
    loaded = load_file(str(tmp_path / plan.filename))
    assert all(torch.equal(loaded[n], data[n]) for n in data)
