"""`grid --executor ray` on a local 2-CPU Ray cluster (loopback only): the same folders, bit for
bit, and the same rows as the sequential grid; a worker that dies mid-pass fails its points with a
reason while the others finish, and --resume completes the grid. Plus the progress view and the
one-line error when ray is missing (these two run without ray)."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from mergekit_like.demo import LlamaShape, make_family
from mergekit_like.grid.executors import CRASH_HOOK_ENV
from mergekit_like.grid.progress import GridProgress
from support.helpers import folder_digest, run_cli

SHAPE = LlamaShape(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
TIMING = {"wall_s", "pass_wall_s", "peak_rss_mb", "started_at", "finished_at", "host"}


def four_point_grid(root: Path) -> Path:
    fam = make_family(root / "fam", SHAPE, n_finetunes=2, shard_bytes=[6000, None, 9000])
    doc = {"merge_method": "ties", "base_model": str(fam[0]), "dtype": "float32", "seed": 3,
           "models": [{"model": str(fam[1]), "parameters": {"weight": 1.0, "density": 0.5}},
                      {"model": str(fam[2]), "parameters": {"weight": 0.5, "density": 0.5}}],
           "grid": {"parameters.lambda": [0.7, 1.0], "models.0.parameters.density": [0.3, 0.6]}}
    path = root / "grid.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def digests(root: Path) -> dict[str, dict[str, str]]:
    """sha256 of every file of every point folder (safetensors, configs, grid_point.json...)."""
    return {d.name: folder_digest(d) for d in sorted(root.iterdir())
            if d.is_dir() and not d.name.startswith(".")}


def last_rows(root: Path) -> dict[str, dict]:
    rows = {}
    for line in (root / "results.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["id"]] = row
    return rows


def untimed(rows: dict[str, dict]) -> dict[str, dict]:
    return {k: {f: v for f, v in r.items() if f not in TIMING} for k, r in rows.items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The grid file and its sequential run (--pass-size 2: two passes of two points)."""
    tmp = tmp_path_factory.mktemp("ray_ref")
    path = four_point_grid(tmp)
    import contextlib
    from mergekit_like.cli.app import main
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["grid", str(path), str(tmp / "seq"), "--pass-size", "2"]) == 0
    points = json.loads((tmp / "seq" / "points.json").read_text())
    return path, tmp / "seq", points


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """One local Ray for the module: 2 CPUs, loopback, no dashboard, no usage report. Workers
    inherit CRASH_HOOK_ENV (a file that arms the test-only worker death)."""
    ray = pytest.importorskip("ray")
    crash = tmp_path_factory.mktemp("crash") / "die-in-pass"
    saved = {k: os.environ.get(k) for k in (CRASH_HOOK_ENV, "RAY_USAGE_STATS_ENABLED")}
    os.environ[CRASH_HOOK_ENV] = str(crash)
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=80 * 2**20, log_to_driver=False)
    try:
        yield crash
    finally:
        ray.shutdown()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def no_local_merges(monkeypatch):
    """A merge in the driver process fails loudly: the passes must run on workers."""
    def refuse(*a, **k):
        raise AssertionError("a pass ran in the driver")
    monkeypatch.setattr("mergekit_like.grid.executors.run_pass", refuse)


def test_ray_grid_equals_sequential_grid_bit_for_bit(reference, ray_cluster, tmp_path, capsys,
                                                     monkeypatch):
    path, seq, _ = reference
    no_local_merges(monkeypatch)
    root = tmp_path / "ray"
    code, out, err = run_cli(["grid", path, root, "--pass-size", "2", "--executor", "ray"],
                             capsys)
    assert code == 0, err
    assert "4 points: 4 ok, 0 failed, 0 skipped" in out
    want = digests(seq)
    assert len(want) == 4 and digests(root) == want
    assert untimed(last_rows(root)) == untimed(last_rows(seq))
    assert not list(root.glob(".*.partial")) and not (root / ".grid.lock").exists()


def test_dead_worker_fails_its_pass_then_resume_completes(reference, ray_cluster, tmp_path,
                                                          capsys, monkeypatch):
    path, seq, points = reference
    doomed = sorted(pid for pid, p in points.items() if p["pass"] == 1)
    survivors = sorted(pid for pid, p in points.items() if p["pass"] == 2)
    ray_cluster.write_text(doomed[0])            # the worker of pass 1 calls os._exit mid-pass
    root = tmp_path / "ray"
    code, out, err = run_cli(["grid", path, root, "--pass-size", "2", "--executor", "ray"],
                             capsys)
    assert code == 3, err
    assert not ray_cluster.exists()              # the hook fired (and disarmed itself)
    rows = last_rows(root)
    assert sorted(r["id"] for r in rows.values() if r["status"] == "failed") == doomed
    assert sorted(r["id"] for r in rows.values() if r["status"] == "ok") == survivors
    for pid in doomed:
        assert "Ray worker died during pass 1" in rows[pid]["error"], rows[pid]["error"]
        assert not (root / pid).exists()
    assert not list(root.glob(".*.partial"))     # the dead worker's partial folders removed
    assert "4 points: 2 ok, 2 failed, 0 skipped" in out

    no_local_merges(monkeypatch)
    code, out, err = run_cli(["grid", path, root, "--pass-size", "2", "--executor", "ray",
                              "--resume"], capsys)
    assert code == 0, err
    assert "4 points: 2 ok, 0 failed, 2 skipped" in out
    assert digests(root) == digests(seq)
    assert {k: r["status"] for k, r in last_rows(root).items()} == \
        {**{pid: "ok" for pid in doomed}, **{pid: "skipped" for pid in survivors}}


def test_progress_view_counts_done_running_failed():
    buf = io.StringIO()
    view = GridProgress(Console(file=buf, force_terminal=True, width=160, color_system=None), "ray")
    view.begin(5, skipped=1)

    class Job:
        points = [1, 2]
    view.started(Job())
    view.started(Job())
    assert view.counts() == "done 0 · running 4 · failed 0 · skipped 1"
    view.finished([{"status": "ok"}, {"status": "failed"}])
    view.end()
    assert view.counts() == "done 1 · running 2 · failed 1 · skipped 1"
    text = buf.getvalue()
    assert "grid (ray)" in text and "3/5 points" in text and "running 2 · failed 1" in text
    silent = GridProgress(None)                  # --quiet / not a terminal: nothing drawn
    silent.begin(3)
    silent.finished([{"status": "ok"}])
    silent.end()
    assert silent.done == 1


def test_missing_ray_is_a_one_line_error_before_anything(reference, tmp_path, capsys,
                                                         monkeypatch):
    path = reference[0]
    monkeypatch.setitem(sys.modules, "ray", None)      # import ray raises ImportError
    code, out, err = run_cli(["grid", path, tmp_path / "r", "--executor", "ray"], capsys)
    assert code == 2
    assert err.strip().count("\n") == 0 and "mergekit_like[ray]" in err
    assert not (tmp_path / "r").exists()
    code, _, err = run_cli(["grid", path, tmp_path / "r", "--executor", "spark"], capsys)
    assert code == 2 and "--executor 'spark'" in err and not (tmp_path / "r").exists()
