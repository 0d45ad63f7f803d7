"""`mergekit-like grid` end to end on a tiny family: shared passes, identity, resume, shards."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from mergekit_like.demo import LlamaShape, make_family
from support.helpers import folder_digest, run_cli

SHAPE = LlamaShape(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    return make_family(root, SHAPE, n_finetunes=2, shard_bytes=[6000, None, 9000])


def grid_file(tmp_path: Path, family, **extra) -> Path:
    doc = {
        "merge_method": "ties", "base_model": str(family[0]),
        "models": [{"model": str(family[1]), "parameters": {"weight": 1.0, "density": 0.5}},
                   {"model": str(family[2]), "parameters": {"weight": 0.5, "density": 0.5}}],
        "dtype": "float32", "seed": 3,
        "grid": {"parameters.lambda": [0.7, 1.0], "models.0.parameters.density": [0.3, 0.6]},
        "zip": [{"merge_method": ["ties", "dare_ties"]}],
    }
    doc.update(extra)
    doc = {k: v for k, v in doc.items() if v is not None}
    path = tmp_path / "grid.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def weights(folder: Path) -> dict[str, str]:
    return {k: v for k, v in folder_digest(folder).items()
            if k.endswith((".safetensors", ".json"))
            and k not in ("grid_point.json", "merge_manifest.json")}  # these name the point


def results(root: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(root.glob("results*.jsonl"))
            for line in f.read_text().splitlines()]


def point_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_every_point_equals_its_standalone_merge_and_inputs_are_read_once(
        family, tmp_path, capsys, monkeypatch):
    from mergekit_like.io import local

    reads: Counter = Counter()
    real = local.LocalSource.read_tensor

    def counting(self, name, device="cpu"):
        reads[(str(self.folder), name)] += 1
        return real(self, name, device)

    monkeypatch.setattr(local.LocalSource, "read_tensor", counting)
    root = tmp_path / "sweep"
    code, out, err = run_cli(["grid", grid_file(tmp_path, family), root], capsys)
    assert code == 0, err
    dirs = point_dirs(root)
    assert len(dirs) == 8                                     # 2 × 2 × 2 points, one pass
    assert set(reads.values()) == {1}                         # every input tensor read once
    assert "8 points: 8 ok, 0 failed, 0 skipped" in out
    monkeypatch.setattr(local.LocalSource, "read_tensor", real)
    for d in dirs[:3] + dirs[-1:]:
        meta = json.loads((d / "grid_point.json").read_text())
        assert meta["id"] == d.name
        single = tmp_path / f"single-{d.name}"
        code, _, err = run_cli(["merge", d / "mergekit_config.yml", single, "-q"], capsys)
        assert code == 0, err
        assert weights(single) == weights(d)
    rows = results(root)
    assert sorted(r["id"] for r in rows) == [d.name for d in dirs]
    assert all(r["status"] == "ok" and r["pass"] == 1 for r in rows)
    assert (root / "results.csv").read_text().splitlines()[0].startswith(
        "id,label,parameters.lambda,models.0.parameters.density,merge_method,status")


def test_failed_point_is_isolated(family, tmp_path, capsys, monkeypatch):
    from mergekit_like.engine import run as engine

    real = engine.merge_job

    def flaky(plan, job, inputs, options, **kw):
        if plan.recipe.merge_method == "dare_ties" and plan.recipe.top_params["lambda"].value == 0.7:
            raise RuntimeError("injected operator failure")
        return real(plan, job, inputs, options, **kw)

    monkeypatch.setattr(engine, "merge_job", flaky)
    root = tmp_path / "sweep"
    code, out, err = run_cli(["grid", grid_file(tmp_path, family), root], capsys)
    assert code == 3
    rows = results(root)
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 2 and all("injected operator failure" in r["error"] for r in failed)
    assert len(point_dirs(root)) == 6
    assert not list(root.glob(".*.partial"))
    assert "8 points: 6 ok, 2 failed, 0 skipped" in out


def swept_without_one(family, tmp_path, capsys, k):
    """The grid run into ``tmp_path/sweep``, then its k-th point's folder deleted: (root, grid
    file, each point's weights digests before the deletion, the deleted folder)."""
    import shutil

    root = tmp_path / "sweep"
    path = grid_file(tmp_path, family)
    assert run_cli(["grid", path, root], capsys)[0] == 0
    before = {d.name: weights(d) for d in point_dirs(root)}
    victim = point_dirs(root)[k]
    shutil.rmtree(victim)
    return root, path, before, victim


def test_point_whose_output_is_locked_fails_alone_with_the_reason(family, tmp_path, capsys):
    """A point whose output cannot be opened (locked by a live process) fails with that
    reason; the other points of its pass are merged (engine.run_pass isolates the opening)."""
    import os

    root, path, want, victim = swept_without_one(family, tmp_path, capsys, 1)
    lock = root / f".{victim.name}.lock"
    lock.write_text(f"{os.getppid()}\n")                    # a live process holds it
    code, out, _ = run_cli(["grid", path, root, "--resume", "--force"], capsys)
    assert code == 3
    last = {r["id"]: r for r in results(root)}
    assert last[victim.name]["status"] == "failed"
    assert "is locked by process" in last[victim.name]["error"]
    assert sum(r["status"] == "ok" for r in last.values()) == 7
    assert "8 points: 7 ok, 1 failed, 0 skipped" in out
    assert not victim.exists() and lock.read_text() == f"{os.getppid()}\n"
    lock.unlink()
    assert run_cli(["grid", path, root, "--resume"], capsys)[0] == 0
    assert {d.name: weights(d) for d in point_dirs(root)} == want


def test_resume_skips_complete_points(family, tmp_path, capsys, monkeypatch):
    root, path, before, victim = swept_without_one(family, tmp_path, capsys, 2)
    (root / f".{victim.name}.partial").mkdir()              # a stale partial of a killed run
    code, _, err = run_cli(["grid", path, root], capsys)
    assert code == 2 and "--resume" in err                   # an existing grid needs --resume
    from mergekit_like.engine import run as engine
    merged: list[int] = []
    real = engine.run_pass
    monkeypatch.setattr("mergekit_like.grid.executors.run_pass",
                        lambda plans, *a, **k: merged.append(len(plans)) or real(plans, *a, **k))
    code, out, err = run_cli(["grid", path, root, "--resume"], capsys)
    assert code == 0, err
    assert merged == [1]                                     # only the missing point ran
    assert {d.name: weights(d) for d in point_dirs(root)} == before
    assert not (root / f".{victim.name}.partial").exists()
    assert "8 points: 1 ok, 0 failed, 7 skipped" in out


def test_shards_cover_every_point_once(family, tmp_path, capsys):
    path = grid_file(tmp_path, family)
    ids = []
    for i in range(3):
        code, _, err = run_cli(["grid", path, tmp_path / "root", "--resume", "--pass-size", "2",
                                "--shard", f"{i}/3"], capsys)
        assert code == 0, err
        ids.append({r["id"] for r in results(tmp_path / "root")
                    if r.get("shard") == f"{i}/3"})
    assert sum(len(s) for s in ids) == 8 and len(set().union(*ids)) == 8
    assert all(ids)
    assert sorted(p.name for p in (tmp_path / "root").glob("results.*-of-3.jsonl")) == [
        f"results.{i}-of-3.jsonl" for i in range(3)]


def test_eval_command_metric_and_failure(family, tmp_path, capsys):
    path = grid_file(tmp_path, family, grid={"parameters.lambda": [0.5, 1.0]}, zip=None)
    script = tmp_path / "score.py"
    script.write_text("import json, sys, pathlib\n"
                      "cfg = pathlib.Path(sys.argv[1], 'mergekit_config.yml').read_text()\n"
                      "lam = 0.5 if 'lambda: 0.5' in cfg else 1.0\n"
                      "print('noise')\nprint(json.dumps({'acc': lam * 2, 'other': 1}))\n")
    code, out, err = run_cli(["grid", path, tmp_path / "a", "--eval",
                              f"python {script} {{out}}", "--eval-key", "acc"], capsys)
    assert code == 0, err
    last = {r["id"]: r for r in results(tmp_path / "a")}
    assert sorted(r["metric"] for r in last.values()) == [1.0, 2.0]
    assert all(r["eval"] == {"acc": r["metric"], "other": 1.0} for r in last.values())
    code, out, err = run_cli(["grid", path, tmp_path / "b", "--eval", "exit 4"], capsys)
    assert code == 3
    last = {r["id"]: r for r in results(tmp_path / "b")}
    assert all(r["status"] == "ok" and "exited 4" in r["eval_error"] for r in last.values())


def test_bad_grid_path_and_dry_run(family, tmp_path, capsys):
    path = grid_file(tmp_path, family, grid={"models.5.parameters.weight": [1.0]}, zip=None)
    code, _, err = run_cli(["grid", path, tmp_path / "x"], capsys)
    assert code == 2 and "models.5" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    good = grid_file(tmp_path, family)
    code, out, _ = run_cli(["grid", good, tmp_path / "y", "--dry-run"], capsys)
    assert code == 0 and "8 points in 1 pass(es)" in out
    assert not (tmp_path / "y").exists()


def test_sigkill_mid_grid_then_resume_is_bit_identical(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    fam = make_family(tmp_path / "fam", LlamaShape(vocab_size=1024, hidden_size=256,
                                                   intermediate_size=512, num_hidden_layers=4),
                      n_finetunes=2)
    path = grid_file(tmp_path, fam, grid={"parameters.lambda": [0.5, 0.7, 0.9, 1.1, 1.3]},
                     zip=None)

    def cmd(root, *extra):
        return [sys.executable, "-m", "mergekit_like", "grid", str(path), str(root),
                "--pass-size", "1", *extra]

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(cmd(tmp_path / "ref"), check=True, env=env, capture_output=True)
    want = {d.name: folder_digest(d) for d in point_dirs(tmp_path / "ref")}
    root = tmp_path / "killed"
    proc = subprocess.Popen(cmd(root), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and (not root.exists() or len(point_dirs(root)) < 2):
        assert time.monotonic() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(point_dirs(root))
    if done_before == len(want):
        pytest.skip("the grid finished before it could be killed")
    result = subprocess.run(cmd(root, "--resume"), env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    got = {d.name: folder_digest(d) for d in point_dirs(root)}
    log = (root / "results.jsonl").read_text() if (root / "results.jsonl").exists() else ""
    assert got.keys() == want.keys(), (sorted(got), sorted(want), result.stdout, result.stderr, log)
    assert got == want
    assert not list(root.glob(".*.partial")) and not (root / ".grid.lock").exists()
    last = {r["id"]: r for r in results(root)}
    assert sum(r["status"] == "skipped" for r in last.values()) == done_before


def test_ties_points_of_a_pass_share_thresholds(family, tmp_path, capsys, monkeypatch):
    """A λ sweep computes each model's TIES threshold and the merged Δ once per tensor, not
    once per point, and gives the same bytes as points run one per pass."""
    from mergekit_like.methods import ties

    made: Counter = Counter()
    real = ties.MagnitudeTrim.__init__

    def counting(self, task, pos, density, scratch):
        made[(task.name, pos)] += 1
        real(self, task, pos, density, scratch)

    monkeypatch.setattr(ties.MagnitudeTrim, "__init__", counting)
    from mergekit_like.methods import task_arithmetic as ta
    deltas: list[int] = []
    real_delta = ta.merged_delta_
    monkeypatch.setattr(ta, "merged_delta_", lambda *a, **k: deltas.append(1) or real_delta(*a, **k))
    path = grid_file(tmp_path, family, grid={"parameters.lambda": [0.5, 0.8, 1.0]}, zip=None)
    code, _, err = run_cli(["grid", path, tmp_path / "root"], capsys)
    assert code == 0, err
    assert made and set(made.values()) == {1}
    shared = len(deltas)                          # Δ computed for the first point only
    made.clear()
    deltas.clear()
    code, _, err = run_cli(["grid", path, tmp_path / "solo", "--pass-size", "1"], capsys)
    assert code == 0, err
    assert set(made.values()) == {3}
    assert len(deltas) == 3 * shared
    assert {d.name: weights(d) for d in point_dirs(tmp_path / "root")} == \
        {d.name: weights(d) for d in point_dirs(tmp_path / "solo")}
