"""The output folder (lock, free space, resume, atomic finalize) and side files
(docs/output_format.md §5, §6, §8, §9; docs/hub.md §4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import yaml

from mergekit_like.errors import MergeError
from mergekit_like.io import output as output_mod
from mergekit_like.io.output import OutputFolder
from mergekit_like.io.manifest import MANIFEST, file_entry
from mergekit_like.io.shards import plan_shards
from mergekit_like.io.side_files import (
    CONFIG_DONOR_FILES,
    TOKENIZER_FILES,
    copy_side_files,
    model_card,
    updated_config,
)
from mergekit_like.io.source import CheckpointSource
from mergekit_like.io.writer import AsyncShardWriter, iter_write_order
from mergekit_like.methods.base import OutputSpec

OUTS = [OutputSpec(f"w{i}", (4, 4), torch.float32) for i in range(6)]  # 64 bytes each
PLANS = plan_shards(OUTS, 128)  # three shards of two tensors


def make(tmp_path, key="key-1", **kw):
    kw.setdefault("overwrite", False)
    kw.setdefault("resume", True)
    return OutputFolder(tmp_path / "out", resume_key=key, plans=PLANS,
                        planned_bytes=sum(p.file_size for p in PLANS), **kw)


def write_shards(folder, count=None, skip=frozenset()):
    """Write the first ``count`` not-skipped shards (all by default) and mark them done."""
    todo = [p for p in PLANS if p.filename not in skip][:count]
    w = AsyncShardWriter(folder, todo, skip=set())
    for name in iter_write_order(todo, set()):
        w.submit(name, torch.full((4, 4), float(int(name[1:]))))
    w.close()


def leftovers(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if p.name != "out")


# ---- refusal, overwrite, finalize -----------------------------------------------------------

def test_exists_refused_and_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    before = sorted(os.listdir(out)), out.stat().st_mtime_ns
    with pytest.raises(MergeError, match=r"^output folder exists: .*out \(pass --overwrite"):
        make(tmp_path).prepare()
    assert (sorted(os.listdir(out)), out.stat().st_mtime_ns) == before
    assert leftovers(tmp_path) == []  # no lock, no partial


def test_fresh_run_finalize_leaves_nothing_else(tmp_path):
    folder = make(tmp_path)
    assert folder.prepare() == set()
    assert folder.lock_path.read_text().strip() == str(os.getpid())
    state = json.loads((folder.state_dir / "state.json").read_text())
    assert state["resume_key"] == "key-1" and [s["file"] for s in state["shards"]] == \
        [p.filename for p in PLANS]
    write_shards(folder)
    folder.write_side_file("config.json", "{}\n")
    assert folder.finalize() == tmp_path / "out"
    assert leftovers(tmp_path) == []
    assert sorted(os.listdir(tmp_path / "out")) == sorted([p.filename for p in PLANS] +
                                                         ["config.json", MANIFEST])
    assert folder.written_files == sorted([p.filename for p in PLANS] + ["config.json"])


def test_overwrite_replaces(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.safetensors").write_text("old")
    folder = make(tmp_path, overwrite=True)
    folder.prepare()
    assert (out / "stale.safetensors").exists()  # old OUT untouched until finalize
    write_shards(folder)
    folder.finalize()
    assert not (out / "stale.safetensors").exists()
    assert sorted(os.listdir(out)) == sorted([p.filename for p in PLANS] + [MANIFEST])
    assert leftovers(tmp_path) == []


def test_abort_keep_and_remove(tmp_path):
    folder = make(tmp_path)
    folder.prepare()
    write_shards(folder, count=1)
    folder.abort(keep_partial=True)
    assert (folder.partial / PLANS[0].filename).exists()
    assert not folder.lock_path.exists() and not (tmp_path / "out").exists()
    folder2 = make(tmp_path)
    assert folder2.prepare() == {PLANS[0].filename}
    folder2.abort(keep_partial=False)
    assert leftovers(tmp_path) == []


# ---- the lock ----------------------------------------------------------------------------

def test_lock_held_by_live_process(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp_path / ".out.lock"
        lock.write_text(f"{proc.pid}\n")
        folder = make(tmp_path)
        with pytest.raises(MergeError, match=f"locked by process {proc.pid}"):
            folder.prepare()
        folder.abort(keep_partial=False)  # must not release someone else's lock
        assert lock.read_text().strip() == str(proc.pid)
        assert not folder.partial.exists()
    finally:
        proc.kill()
        proc.wait()


def test_stale_lock_taken_over(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    lock = tmp_path / ".out.lock"
    lock.write_text(f"{proc.pid}\n")
    folder = make(tmp_path)
    folder.prepare()
    assert lock.read_text().strip() == str(os.getpid())
    assert any("stale lock" in w for w in folder.warnings)
    folder.abort(keep_partial=False)
    assert not lock.exists()


# ---- free space ----------------------------------------------------------------------------

def test_free_space_check(tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    planned = sum(p.file_size for p in PLANS)
    monkeypatch.setattr(output_mod.shutil, "disk_usage", lambda p: Usage(10**9, 0, planned))
    with pytest.raises(MergeError, match="not enough free space") as info:
        make(tmp_path).prepare()
    msg = str(info.value)
    assert str(int(planned * 1.02)) in msg and f"({planned} bytes) available" in msg
    assert leftovers(tmp_path) == []  # lock released, nothing created
    monkeypatch.setattr(output_mod.shutil, "disk_usage",
                        lambda p: Usage(10**9, 0, int(planned * 1.02) + 1))
    folder = make(tmp_path)
    folder.prepare()
    folder.abort(keep_partial=False)


# ---- resume ---------------------------------------------------------------------------------

def crashed_run(tmp_path):
    folder = make(tmp_path)
    folder.prepare()
    write_shards(folder)
    folder.write_side_file("README.md", "card")
    folder.state_set("ties_thresholds", [0.5, 0.25])
    folder.abort(keep_partial=True)  # as if killed before finalize
    return folder.partial


def test_resume_keeps_valid_and_deletes_corrupted(tmp_path):
    partial = crashed_run(tmp_path)
    good, bad_header, truncated = (partial / p.filename for p in PLANS)
    data = bytearray(bad_header.read_bytes())
    data[len(PLANS[1].header_bytes) - 1] = ord("x")  # a header padding/brace byte
    bad_header.write_bytes(bytes(data))
    with open(truncated, "r+b") as f:
        f.truncate(PLANS[2].file_size - 4)
    folder = make(tmp_path)
    assert folder.prepare() == {PLANS[0].filename}
    assert good.exists() and not bad_header.exists() and not truncated.exists()
    assert not (partial / "README.md").exists()
    assert sorted(os.listdir(folder.done_dir)) == [f"{PLANS[0].filename}.json"]
    assert folder.state_get("ties_thresholds") == [0.5, 0.25]
    assert folder.warnings == []
    write_shards(folder, skip={PLANS[0].filename})
    folder.finalize()
    assert sorted(os.listdir(tmp_path / "out")) == sorted([p.filename for p in PLANS] + [MANIFEST])
    recorded = json.loads((tmp_path / "out" / MANIFEST).read_text())["files"]
    for p in PLANS:  # the kept shard's hash comes from its marker, the others from the writer
        assert recorded[p.filename] == file_entry(tmp_path / "out" / p.filename)


def test_resume_marker_mismatch_with_plan(tmp_path):
    partial = crashed_run(tmp_path)
    marker = partial / ".mergekit_like_state" / "done" / f"{PLANS[0].filename}.json"
    m = json.loads(marker.read_text())
    m["header_sha256"] = "0" * 64
    marker.write_text(json.dumps(m))
    folder = make(tmp_path)
    assert folder.prepare() == {PLANS[1].filename, PLANS[2].filename}
    folder.abort(keep_partial=False)


def test_key_mismatch_starts_over(tmp_path):
    partial = crashed_run(tmp_path)
    folder = make(tmp_path, key="key-2")
    assert folder.prepare() == set()
    assert any("partial output from a different recipe/input; starting over" in w
               for w in folder.warnings)
    assert sorted(os.listdir(partial)) == [".mergekit_like_state"]
    assert os.listdir(folder.done_dir) == []
    assert folder.state_get("ties_thresholds") is None
    folder.abort(keep_partial=False)


def test_no_resume_starts_fresh(tmp_path):
    partial = crashed_run(tmp_path)
    folder = make(tmp_path, resume=False)
    assert folder.prepare() == set()
    assert folder.warnings == []
    assert sorted(os.listdir(partial)) == [".mergekit_like_state"]
    folder.abort(keep_partial=False)


# ---- config.json ---------------------------------------------------------------------------

def test_updated_config_cases():
    only_torch = json.loads(updated_config({"a": 1, "torch_dtype": "float32", "z": 2}, "bfloat16"))
    assert list(only_torch) == ["a", "torch_dtype", "z"] and only_torch["torch_dtype"] == "bfloat16"
    only_new = json.loads(updated_config({"dtype": "float32", "b": [1]}, "float16"))
    assert only_new == {"dtype": "float16", "b": [1]}
    both = json.loads(updated_config({"torch_dtype": "float32", "dtype": "float32"}, "bfloat16"))
    assert both == {"torch_dtype": "bfloat16", "dtype": "bfloat16"}
    neither = json.loads(updated_config({"model_type": "llama"}, torch.float16))
    assert list(neither) == ["model_type", "torch_dtype"] and neither["torch_dtype"] == "float16"
    donor = {"model_type": "llava", "text_config": {"dtype": "float32", "hidden_size": 8},
             "vision_config": {"hidden_size": 4}, "torch_dtype": "float32"}
    text = updated_config(donor, "bfloat16")
    nested = json.loads(text)
    assert nested["text_config"] == {"dtype": "bfloat16", "hidden_size": 8}
    assert nested["vision_config"] == {"hidden_size": 4}
    assert donor["text_config"]["dtype"] == "float32"  # the donor dict is not modified
    assert text.endswith("}\n") and text.startswith('{\n  "model_type"')
    with pytest.raises(ValueError):
        updated_config({}, "int8")


# ---- side files ----------------------------------------------------------------------------

class FakeSource(CheckpointSource):
    def __init__(self, root: Path, ref: str, config=None):
        self.root, self.ref, self._config = root, ref, config

    def tensors(self):
        return {}

    def config(self):
        return self._config

    def list_files(self):
        return sorted(p.name for p in self.root.iterdir())

    def fetch_file(self, name):
        return self.root / name

    def read_tensor(self, name, device="cpu"):
        raise KeyError(name)

    def identity(self):
        return {}


def test_copy_side_files(tmp_path):
    tok, cfg = tmp_path / "tok", tmp_path / "cfg"
    tok.mkdir()
    cfg.mkdir()
    for name in ("tokenizer.json", "tokenizer.model", "README.md", "model.safetensors",
                 "generation_config.json", ".gitattributes"):
        (tok / name).write_text(f"tok:{name}")
    for name in ("generation_config.json", "processor_config.json", "tokenizer.json",
                 "modeling_x.py", "configuration_x.py", "README.md", "pytorch_model.bin"):
        (cfg / name).write_text(f"cfg:{name}")
    config = {"auto_map": {"AutoConfig": "configuration_x.XConfig",
                           "AutoModelForCausalLM": "modeling_x.XForCausalLM",
                           "AutoModel": "other/repo--modeling_y.Y"}}
    folder = make(tmp_path)
    folder.prepare()
    warnings = copy_side_files(folder, FakeSource(tok, "tokdonor"),
                               FakeSource(cfg, "cfgdonor", config))
    got = {p.name: p.read_text() for p in folder.partial.iterdir() if p.is_file()}
    assert got == {"tokenizer.json": "tok:tokenizer.json", "tokenizer.model": "tok:tokenizer.model",
                   "generation_config.json": "cfg:generation_config.json",
                   "processor_config.json": "cfg:processor_config.json",
                   "modeling_x.py": "cfg:modeling_x.py",
                   "configuration_x.py": "cfg:configuration_x.py"}
    assert len(warnings) == 1 and "trust_remote_code" in warnings[0]
    assert "generation_config.json" in CONFIG_DONOR_FILES and "merges.txt" in TOKENIZER_FILES
    folder.abort(keep_partial=False)


def test_model_card_front_matter():
    recipe = "merge_method: ties\nmodels:\n  - model: org/a\n"
    card = model_card(method="ties", base_models=["org/base", "org/a", "org/a"],
                      models=["org/base@abc123", "org/a"], recipe_text=recipe,
                      extra={"seed": 7})
    assert card.startswith("---\n")
    front_text, body = card[4:].split("\n---\n", 1)
    front = yaml.safe_load(front_text)
    assert front == {"base_model": ["org/base", "org/a"], "base_model_relation": "merge",
                     "library_name": "transformers", "tags": ["merge", "mergekit_like", "ties"]}
    assert "mergekit_like" in body and "ties" in body and "- org/base@abc123" in body
    assert "```yaml\n" + recipe + "```\n" in body
    assert "- seed: 7" in body
    leaky = model_card(method="linear", base_models=[], models=["m"],
                       recipe_text="token: hf_" + "a" * 34 + "\n")
    assert "hf_aaaa" not in leaky and "base_model:" not in leaky
