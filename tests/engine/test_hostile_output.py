"""Hostile probes of what the commands write: an output that overlaps an input (case 1), silent
corruption that verify must find (3), unwritable or over-long output names (4), interrupts (10),
and running the same merge twice (11). Each test failed on the code before these fixes, except
``test_twin_materialize_over_its_bundle_is_refused``: materialize already refused that, and the
test keeps it so."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.helpers import assert_one_line_error, folder_digest, run_cli, shard_names, write_recipe
from support.twin_fixture import hand_bundle, tiny_family

from mergekit_like.demo import LlamaShape, make_family
from mergekit_like.io.manifest import MANIFEST

SHAPE = LlamaShape()


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path (the inputs must never change)."""
    return {p.relative_to(root).as_posix(): folder_digest(p.parent)[p.name]
            for p in sorted(root.rglob("*")) if p.is_file()}


def linear_recipe(path: Path, fam: Path, **extra) -> Path:
    """linear over ft1, ft2; task arithmetic when a ``base_model`` is given."""
    doc = {"merge_method": "task_arithmetic" if "base_model" in extra else "linear",
           "models": [{"model": str(fam / m), "parameters": {"weight": 0.5}} for m in ("ft1", "ft2")],
           "dtype": "float32", **extra}
    return write_recipe(path, doc)


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile") / "fam"
    make_family(root, SHAPE, n_finetunes=2, shard_bytes=[None, 40_000, None])
    return root


# ---- 1. an output never replaces, holds or lies inside an input ------------------------------

@pytest.mark.parametrize("target", ["fam", "fam/ft1", "fam/base", "recipe", "fam/ft1/sub"])
def test_merge_overwrite_never_touches_an_input(fam, tmp_path, capsys, target):
    recipe = linear_recipe(tmp_path / "r.yml", fam, base_model=str(fam / "base"))
    out = recipe if target == "recipe" else fam.parent / target
    before, recipe_text = tree_digest(fam.parent), recipe.read_text()
    code, _, err = run_cli(["merge", recipe, out, "--overwrite", "-q"], capsys)
    how = {"fam": "contains", "fam/ft1/sub": "lies inside"}.get(target, "is")
    assert_one_line_error(code, err, f"output {out} {how} the input")
    assert tree_digest(fam.parent) == before and recipe.read_text() == recipe_text
    assert not any(p.name.startswith(".") for p in fam.parent.iterdir())  # no partial, no lock


def test_merge_into_a_symlink_of_an_input_is_refused(fam, tmp_path, capsys):
    recipe = linear_recipe(tmp_path / "r.yml", fam)
    link = tmp_path / "alias"
    link.symlink_to(fam / "ft2")
    before = tree_digest(fam)
    code, _, err = run_cli(["merge", recipe, link, "--overwrite", "-q"], capsys)
    assert_one_line_error(code, err, "is the input model")
    assert tree_digest(fam) == before and link.is_symlink()


def test_grid_root_holding_the_models_is_refused(fam, tmp_path, capsys):
    grid = tmp_path / "grid.yml"
    grid.write_text(linear_recipe(tmp_path / "r.yml", fam).read_text()
                    + "grid:\n  models.0.parameters.weight: [0.3, 0.7]\n")
    before = tree_digest(fam)
    code, _, err = run_cli(["grid", grid, fam / "ft1", "--force"], capsys)
    assert_one_line_error(code, err, f"output {fam / 'ft1'} is the input")
    code, _, err = run_cli(["grid", grid, fam, "--force"], capsys)
    assert_one_line_error(code, err, "contains the input")
    assert tree_digest(fam) == before
    assert not (fam / "results.jsonl").exists() and not (fam.parent / "grid.yml").exists()


def test_twin_materialize_over_its_bundle_is_refused(tmp_path, capsys):
    family = tiny_family(tmp_path / "tf")
    bundle = hand_bundle(tmp_path / "bundle", family, ["a", "b"])
    before = tree_digest(bundle)
    code, _, err = run_cli(["twin", "materialize", bundle, bundle, "--task", "a", "--overwrite",
                            "-q"], capsys)
    assert_one_line_error(code, err, "is the bundle")
    code, _, err = run_cli(["twin", "materialize", bundle, bundle / "twin" / "x", "--task", "a",
                            "-q"], capsys)
    assert_one_line_error(code, err, "or inside it")
    assert tree_digest(bundle) == before


def test_importance_output_over_its_model_or_data_is_refused(fam, tmp_path, capsys):
    data = tmp_path / "texts.jsonl"
    data.write_text('{"input_ids": [1, 2, 3, 4]}\n')
    before = tree_digest(fam)
    for out in (fam / "base", fam, data):
        code, _, err = run_cli(["importance", "fisher", "--model", fam / "base", "--data", data,
                                "--out", out, "--overwrite", "-q"], capsys)
        assert_one_line_error(code, err, f"output {out}")
    assert tree_digest(fam) == before and data.read_text() == '{"input_ids": [1, 2, 3, 4]}\n'


def test_train_router_never_writes_over_its_data(tmp_path, capsys):
    family = tiny_family(tmp_path / "tf")
    bundle = hand_bundle(tmp_path / "bundle", family, ["a", "b"])
    data = bundle / "twin" / "router.safetensors"   # a data path that is the router it writes
    data.write_text('{"text": "x", "task": "a"}\n')
    code, _, err = run_cli(["train-router", bundle, "--data", data, "-q"], capsys)
    assert_one_line_error(code, err, "is the input --data")
    assert data.read_text() == '{"text": "x", "task": "a"}\n'


# ---- 3. verify finds silent corruption --------------------------------------------------------

@pytest.fixture(scope="module")
def merged(fam, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("merged")
    recipe = linear_recipe(root / "r.yml", fam)
    out = root / "out"
    from mergekit_like.cli import main
    assert main(["merge", str(recipe), str(out), "-q", "--out-shard-size", "60KB"]) == 0
    assert len(shard_names(out)) >= 4
    return out


def corrupt_copy(merged: Path, tmp_path: Path) -> Path:
    import shutil
    return Path(shutil.copytree(merged, tmp_path / "copy"))


def test_manifest_lists_every_file_with_its_hash(merged):
    doc = json.loads((merged / MANIFEST).read_text())
    on_disk = sorted(p.name for p in merged.iterdir() if p.name not in (MANIFEST, "README.md"))
    assert sorted(doc["files"]) == on_disk
    assert doc["files"] == {n: {"size": (merged / n).stat().st_size,
                                "sha256": folder_digest(merged)[n]} for n in on_disk}


def test_verify_passes_the_untouched_output(merged, capsys):
    code, out, err = run_cli(["verify", merged], capsys)
    assert code == 0, err
    assert "sha256 of every file checked" in out


@pytest.mark.parametrize("damage", ["bit", "xor64"])
def test_verify_finds_flipped_bytes_in_tensor_data(merged, tmp_path, capsys, damage):
    out = corrupt_copy(merged, tmp_path)
    shard = out / shard_names(out)[1]
    data = bytearray(shard.read_bytes())
    at = len(data) - 200                       # inside tensor data, far from the header
    if damage == "bit":
        data[at] ^= 0x01
    else:
        for i in range(64):
            data[at - 64 + i] ^= 0xA5
    shard.write_bytes(bytes(data))
    code, _, err = run_cli(["verify", out], capsys)
    assert_one_line_error(code, err, shard.name, "sha256")


def test_verify_finds_removed_shards_with_an_edited_index(merged, tmp_path, capsys):
    out = corrupt_copy(merged, tmp_path)
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    names = shard_names(out)
    gone = names[len(names) // 2:]           # the second half: the last layers, norm and head
    index["weight_map"] = {t: f for t, f in index["weight_map"].items() if f not in gone}
    kept_files = set(index["weight_map"].values())
    index["metadata"]["total_size"] = sum(
        e["data_offsets"][1] - e["data_offsets"][0]
        for f in kept_files for e in _header(out / f).values())
    index_path.write_text(json.dumps(index, indent=2))
    for name in gone:
        (out / name).unlink()
    code, _, err = run_cli(["verify", out], capsys)
    assert_one_line_error(code, err)
    # without the manifest, the config cross-check still catches the missing layers
    code, _, err = run_cli(["verify", out, "--no-manifest"], capsys)
    assert_one_line_error(code, err, "config.json says")


def test_verify_requires_the_manifest_unless_told(merged, tmp_path, capsys):
    out = corrupt_copy(merged, tmp_path)
    (out / MANIFEST).unlink()
    code, _, err = run_cli(["verify", out], capsys)
    assert_one_line_error(code, err, MANIFEST, "--no-manifest")
    code, _, err = run_cli(["verify", out, "--no-manifest"], capsys)
    assert code == 0, err


def _header(path: Path) -> dict:
    import struct
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


# ---- 4. unwritable places and over-long names -------------------------------------------------

def test_read_only_output_place_is_one_line(fam, tmp_path, capsys, monkeypatch):
    recipe = linear_recipe(tmp_path / "r.yml", fam)
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):   # the lock and its temporary (io/lock.py)
        if flags & os.O_CREAT and ".lock" in os.path.basename(str(path)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    code, _, err = run_cli(["merge", recipe, tmp_path / "out", "-q"], capsys)
    assert_one_line_error(code, err, "Read-only file system", "cannot write the output")
    assert not (tmp_path / "out").exists()


def test_real_read_only_mount_is_one_line(fam, tmp_path, capsys):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        recipe = linear_recipe(tmp_path / "r.yml", fam)
        code, _, err = run_cli(["merge", recipe, mnt / "out", "-q"], capsys)
        assert_one_line_error(code, err, "Read-only file system")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_output_name_at_the_filesystem_limit_still_merges(fam, tmp_path, capsys):
    recipe = linear_recipe(tmp_path / "r.yml", fam)
    out = tmp_path / ("m" * 250)               # legal; ".<name>.partial" would not be
    code, _, err = run_cli(["merge", recipe, out, "-q"], capsys)
    assert code == 0, err
    assert (out / MANIFEST).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["r.yml", out.name])


# ---- 10. interrupts say what was kept ---------------------------------------------------------

DRIVER = r"""
import sys, time, pathlib
import mergekit_like.engine.run as engine
ready, after_marker = pathlib.Path(sys.argv[1]), sys.argv[2] == "1"
real = engine._merge_and_submit
def slow(pt, *args, **kw):
    real(pt, *args, **kw)
    done = pt.folder.done_dir
    if not after_marker or (done.is_dir() and any(done.iterdir())):
        ready.touch()
        time.sleep(120)
engine._merge_and_submit = slow
from mergekit_like.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _interrupt(tmp_path: Path, recipe: Path, out: Path, sig: int, after_marker: bool,
               shard_size: str = "60KB"):
    ready = tmp_path / "ready"
    ready.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(ready), "1" if after_marker else "0",
                             "merge", str(recipe), str(out), "-q", "--out-shard-size", shard_size],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def test_sigint_after_a_shard_says_resume_and_the_resume_finishes(fam, merged, tmp_path, capsys):
    recipe = linear_recipe(tmp_path / "r.yml", fam)
    out = tmp_path / "out"
    code, err = _interrupt(tmp_path, recipe, out, signal.SIGINT, after_marker=True)
    assert code == 130, err
    assert err.strip().splitlines()[-1] == "interrupted; run the same command again to resume"
    assert "Traceback" not in err and not out.exists()
    assert (tmp_path / ".out.partial").is_dir()
    code, _, err = run_cli(["merge", recipe, out, "-q", "--out-shard-size", "60KB"], capsys)
    assert code == 0, err
    assert {k: v for k, v in folder_digest(out).items() if k != "README.md"} == \
        {k: v for k, v in folder_digest(merged).items() if k != "README.md"}


def test_sigterm_before_any_shard_says_nothing_written(fam, tmp_path):
    recipe = linear_recipe(tmp_path / "r.yml", fam)
    out = tmp_path / "out"
    code, err = _interrupt(tmp_path, recipe, out, signal.SIGTERM, after_marker=False,
                           shard_size="5GB")     # one shard: none is finished before the end
    assert code == 143, err
    assert err.strip().splitlines()[-1] == "terminated; nothing written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yml", "ready"]


# ---- 11. the same merge twice -----------------------------------------------------------------

def test_same_merge_again_is_already_complete(fam, tmp_path, capsys):
    recipe = linear_recipe(tmp_path / "r.yml", fam)
    out = tmp_path / "out"
    assert run_cli(["merge", recipe, out, "-q"], capsys)[0] == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code, _, err = run_cli(["merge", recipe, out, "-q"], capsys)
    assert code == 0, err
    assert err.strip() == f"already complete: {out}"
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    other = linear_recipe(tmp_path / "r2.yml", fam, out_dtype="bfloat16")
    code, _, err = run_cli(["merge", other, out, "-q"], capsys)
    assert_one_line_error(code, err, "output folder exists", "--overwrite")
    (out / shard_names(out)[0] if shard_names(out) else out / "model.safetensors").write_bytes(b"x")
    code, _, err = run_cli(["merge", recipe, out, "-q"], capsys)   # damaged: not "complete"
    assert_one_line_error(code, err, "output folder exists")
