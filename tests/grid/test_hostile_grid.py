"""Grid points that fail validation (``density: 1.5``) are failed rows, not warnings: in
results.jsonl, results.csv, the table and the summary, with the validator's one-line reason;
the valid points still run, exit 3; --strict stops first; --resume/--skip-failed/--shard/
--dry-run/--report-only treat them like any failed point; no folder is made for them."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import yaml

from mergekit_like.demo import LlamaShape, make_family
from mergekit_like.grid import load_grid_text
from support.helpers import run_cli

SHAPE = LlamaShape(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
REASON = "models[0].parameters.density: 1.5 is outside [0, 1]"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("fam"), SHAPE, n_finetunes=2)


def grid_file(tmp_path: Path, family, densities: list) -> tuple[Path, int]:
    """A TIES grid over the first model's density; returns the file and the line of the last
    candidate value (the invalid one in these tests)."""
    doc = {
        "merge_method": "ties", "base_model": str(family[0]),
        "models": [{"model": str(family[1]), "parameters": {"weight": 1.0, "density": 0.5}},
                   {"model": str(family[2]), "parameters": {"weight": 0.5, "density": 0.5}}],
        "dtype": "float32",
        "grid": {"models.0.parameters.density": densities},
    }
    path = tmp_path / "grid.yml"
    text = yaml.safe_dump(doc, sort_keys=False)
    path.write_text(text)
    line = max(i for i, ln in enumerate(text.splitlines(), 1)
               if ln.strip() == f"- {densities[-1]}")
    return path, line


def rows_of(root: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(root.glob("results*.jsonl"))
            for line in f.read_text().splitlines()]


def point_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_invalid_point_is_a_failed_row_with_its_reason(family, tmp_path, capsys):
    path, line = grid_file(tmp_path, family, [0.5, 1.5])
    reason = f"{path}:{line} {REASON}"
    root = tmp_path / "sweep"
    code, out, err = run_cli(["grid", path, root], capsys)
    assert code == 3, err
    rows = rows_of(root)
    assert [(r["label"], r["status"]) for r in rows] == [("density=1.5", "failed"),
                                                       ("density=0.5", "ok")]
    bad, good = rows
    assert bad["error"] == reason and bad["values"] == {"models.0.parameters.density": 1.5}
    assert bad["pass"] is None and bad["inputs"] == {}
    assert point_dirs(root) == [good["id"]]                   # no folder for the invalid point
    assert not list(root.glob(".*.partial")) and not (root / ".grid.lock").exists()
    table = list(csv.DictReader(io.StringIO((root / "results.csv").read_text())))
    assert [(r["id"], r["status"], r["error"]) for r in table] == [
        (good["id"], "ok", ""), (bad["id"], "failed", reason)]
    assert table[1]["models.0.parameters.density"] == "1.5"
    assert "2 points: 1 ok, 1 failed, 0 skipped" in out
    assert f"failed density=1.5 ({bad['id']}): {reason}\n" in out
    assert "warning:" not in err and f"point density=1.5 is invalid: {reason}" in err
    points = json.loads((root / "points.json").read_text())
    assert points[bad["id"]] == {"label": "density=1.5",
                                 "values": {"models.0.parameters.density": 1.5},
                                 "pass": None, "error": reason}
    code, out, _ = run_cli(["grid", path, root, "--report-only"], capsys)
    assert code == 3 and "2 points: 1 ok, 1 failed, 0 skipped" in out


def test_strict_stops_the_grid_and_dry_run_lists_the_invalid_point(family, tmp_path, capsys):
    path, line = grid_file(tmp_path, family, [0.5, 1.5])
    code, _, err = run_cli(["grid", path, tmp_path / "strict", "--strict"], capsys)
    assert code == 2 and not (tmp_path / "strict").exists()
    assert err.strip() == (f"error: {path}: 1 of 2 points are invalid: density=1.5: "
                           f"{path}:{line} {REASON}")
    code, out, _ = run_cli(["grid", path, tmp_path / "dry", "--dry-run"], capsys)
    assert code == 0 and not (tmp_path / "dry").exists()
    assert "2 points in 1 pass(es)" in out and "invalid:" in out


def test_resume_retries_the_invalid_point_and_skip_failed_leaves_it(family, tmp_path, capsys):
    path, line = grid_file(tmp_path, family, [0.5, 1.5])
    root = tmp_path / "sweep"
    assert run_cli(["grid", path, root], capsys)[0] == 3
    bad_id = next(r["id"] for r in rows_of(root) if r["status"] == "failed")
    code, out, _ = run_cli(["grid", path, root, "--resume"], capsys)
    assert code == 3 and "2 points: 0 ok, 1 failed, 1 skipped" in out
    assert [r["status"] for r in rows_of(root) if r["id"] == bad_id] == ["failed", "failed"]
    code, out, _ = run_cli(["grid", path, root, "--resume", "--skip-failed"], capsys)
    assert code == 0 and "1 points: 0 ok, 0 failed, 1 skipped" in out
    assert [r["status"] for r in rows_of(root) if r["id"] == bad_id] == ["failed", "failed"]
    assert len(point_dirs(root)) == 1 and bad_id not in point_dirs(root)


def test_shards_record_the_invalid_point_once(family, tmp_path, capsys):
    path, _ = grid_file(tmp_path, family, [0.3, 0.6, 1.5])
    root = tmp_path / "root"
    codes = [run_cli(["grid", path, root, "--resume", "--pass-size", "1", "--shard", f"{i}/2"],
                     capsys)[0] for i in range(2)]
    assert codes == [3, 0]
    rows = rows_of(root)
    failed = [r for r in rows if r["status"] == "failed"]
    assert [(r["label"], r["shard"]) for r in failed] == [("density=1.5", "0/2")]
    assert sorted(r["label"] for r in rows if r["status"] == "ok") == ["density=0.3",
                                                                        "density=0.6"]


def test_a_grid_with_no_valid_point_is_bad_input(family, tmp_path, capsys):
    path, _ = grid_file(tmp_path, family, [1.5, 2.0])
    code, _, err = run_cli(["grid", path, tmp_path / "none"], capsys)
    assert code == 2 and not (tmp_path / "none").exists()
    assert err.startswith(f"error: {path}: 2 of 2 points are invalid: density=1.5: ")
    assert len(err.strip().splitlines()) == 1


def test_expansion_keeps_invalid_points_with_stable_ids():
    text = ("merge_method: ties\nbase_model: org/base\nmodels:\n"
            "  - {model: org/a, parameters: {weight: 1, density: 0.5}}\n"
            "grid:\n  models.0.parameters.density: [0.5, 1.5, 1.5]\n")
    g = load_grid_text(text, "g.yml", strict=False)
    assert [p.label for p in g.points] == ["density=0.5"] and g.warnings == []
    assert [(p.label, p.message) for p in g.invalid_points] == [
        ("density=1.5", f"g.yml:6 {REASON}")]                  # the duplicate collapses
    again = load_grid_text(text, "g.yml", strict=False)
    assert again.invalid_points[0].id == g.invalid_points[0].id
    assert len(g.invalid_points[0].id) == 12 and g.invalid_points[0].id != g.points[0].id
