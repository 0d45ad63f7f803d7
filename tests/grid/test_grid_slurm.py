"""`grid --executor slurm` end to end through submitit's local executor (`--slurm-cluster local`:
the same job array, each pass a local process): the same folders, bit for bit, and rows as the
sequential grid; a task that dies fails its pass with a reason and a re-run resumes; no sbatch is
a one-line error."""

from __future__ import annotations

import pytest

from test_grid_ray import (digests, last_rows, no_local_merges, reference,  # noqa: F401
                                untimed)
from mergekit_like.grid.executors import CRASH_HOOK_ENV
from support.helpers import run_cli

submitit = pytest.importorskip("submitit")


def slurm(path, root, *extra):
    return ["grid", path, root, "--pass-size", "2", "--executor", "slurm",
            "--slurm-cluster", "local", *extra]


def test_local_job_array_equals_sequential_grid(reference, tmp_path, capsys,  # noqa: F811
                                                monkeypatch):
    path, seq, _ = reference
    no_local_merges(monkeypatch)
    root = tmp_path / "slurm"
    code, out, err = run_cli(slurm(path, root, "--time-min", "5"), capsys)
    assert code == 0, err
    assert "4 points: 4 ok, 0 failed, 0 skipped" in out
    assert digests(root) == digests(seq)
    assert untimed(last_rows(root)) == untimed(last_rows(seq))
    logs = root / ".slurm"                                  # the default --slurm-log-dir
    assert len(list(logs.glob("*_submitted.pkl"))) == 2      # one array task per pass
    assert len(list(logs.glob("*_result.pkl"))) == 2
    code, out, err = run_cli(slurm(path, root, "--resume"), capsys)
    assert code == 0, err
    assert "4 points: 0 ok, 0 failed, 4 skipped" in out
    assert len(list(logs.glob("*_submitted.pkl"))) == 2      # nothing left to submit


def test_dead_array_task_fails_its_pass_then_rerun_resumes(reference, tmp_path,  # noqa: F811
                                                           capsys, monkeypatch):
    path, seq, points = reference
    doomed = sorted(pid for pid, p in points.items() if p["pass"] == 2)
    crash = tmp_path / "die-in-pass"
    crash.write_text(doomed[1])
    monkeypatch.setenv(CRASH_HOOK_ENV, str(crash))           # inherited by the array tasks
    root = tmp_path / "slurm"
    logs = tmp_path / "logs"
    code, out, err = run_cli(slurm(path, root, "--slurm-log-dir", logs), capsys)
    assert code == 3, err
    assert not crash.exists()
    rows = last_rows(root)
    assert sorted(k for k, r in rows.items() if r["status"] == "failed") == doomed
    for pid in doomed:
        assert "the Slurm task" in rows[pid]["error"] and "of pass 2" in rows[pid]["error"]
        assert not (root / pid).exists()
    assert not list(root.glob(".*.partial"))
    assert not (root / ".slurm").exists() and list(logs.glob("*_submitted.pkl"))
    code, out, err = run_cli(slurm(path, root, "--slurm-log-dir", logs, "--resume"), capsys)
    assert code == 0, err
    assert "4 points: 2 ok, 0 failed, 2 skipped" in out
    assert digests(root) == digests(seq)


def test_no_sbatch_is_a_one_line_error(reference, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setenv("PATH", str(tmp_path))                # no sbatch anywhere
    code, _, err = run_cli(["grid", reference[0], tmp_path / "r", "--executor", "slurm"], capsys)
    assert code == 2 and "no sbatch" in err and err.strip().count("\n") == 0
    assert not (tmp_path / "r").exists()
