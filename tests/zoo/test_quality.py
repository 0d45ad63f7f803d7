"""The merge-quality suite end to end on the FAST zoo: every method merged through the CLI,
parameters chosen on validation, a table of finite test accuracies, and task arithmetic ahead of
the base on the merged tasks."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
from pathlib import Path

import pytest
import torch
from support.helpers import load_folder
from support.zoo_fixture import fast_zoo  # noqa: F401  (session fixture)

from mergekit_like.zoo.quality import METHODS, RecipeMethod, format_table, run_quality

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report(fast_zoo, tmp_path_factory):
    return run_quality([fast_zoo], tmp_path_factory.mktemp("merges"), device="cpu")


def test_one_row_per_model_and_method_with_finite_accuracies(report, fast_zoo):
    expected = ["base"] + [f"fine-tune: {t}" for t in fast_zoo.tasks] + [m.label for m in METHODS]
    assert [row.label for row in report.rows] == expected
    assert report.merged == fast_zoo.tasks_of_kind("skill")
    assert report.merged == ["copy", "reverse", "sort", "increment"]
    assert report.seeds == [0]
    for row in report.rows:
        assert len(row.tests) == 1 and list(row.test) == fast_zoo.tasks
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in row.test.values()), row


def test_task_arithmetic_beats_the_base_on_the_merged_tasks(report):
    rows = {row.label: row for row in report.rows}

    def merged_mean(row):
        return sum(row.test[t] for t in report.merged) / len(report.merged)

    assert merged_mean(rows["task_arithmetic"]) > merged_mean(rows["base"])


def test_each_method_keeps_the_candidate_best_on_validation(report):
    for row, method in zip(report.rows[-len(METHODS):], METHODS):
        (tried,), (chosen,) = row.validation, row.chosen
        assert [p for p, _ in tried] == method.candidates()
        best = max(score for _, score in tried)
        assert chosen == next(p for p, score in tried if score == best)  # first best wins
    lambdas = [p["lambda"] for p, _ in report.rows[-len(METHODS)].validation[0]]
    assert lambdas == [0.2, 0.3, 0.5, 0.7, 1.0]


def test_table_is_markdown_with_a_cell_per_task_and_average(report):
    table = format_table(report)
    lines = table.splitlines()
    width = len(report.tasks) + 3
    assert lines[0].startswith("| model | copy | reverse |") and lines[1] == "|" + "---|" * width
    body = lines[2:2 + len(report.rows)]
    assert all(line.count("|") == width + 1 for line in body)
    row = next(r for r in report.rows if r.label == "task_arithmetic")
    chosen = row.chosen[0]["lambda"]
    ta = next(line for line in body if line.startswith(f"| task_arithmetic (λ={chosen}) |"))
    assert ta.split(" | ")[1] == f"{row.test['copy']:.2f}"
    assert "* task_arithmetic: λ=0.2: " in table and f"→ λ={chosen}" in table


def test_recipe_points_at_the_zoo_and_merges_through_the_cli(fast_zoo, tmp_path):
    method = RecipeMethod("ta", "task_arithmetic", {"weight": 1.0}, sweep={"lambda": (1.0,)})
    doc = method.recipe(fast_zoo, ["sort"], {"lambda": 1.0})
    assert doc["base_model"] == str(fast_zoo.base.resolve())
    assert doc["models"] == [{"model": str(fast_zoo.model("sort").resolve()),
                              "parameters": {"weight": 1.0}}]
    assert doc["parameters"] == {"lambda": 1.0} and "seed" not in doc
    # base + 1.0 * (sort - base) is the sort fine-tune itself
    out = method.build(fast_zoo, ["sort"], {"lambda": 1.0}, tmp_path / "m")
    merged, tuned = load_folder(out), load_folder(fast_zoo.model("sort"))
    assert merged.keys() == tuned.keys()
    for name in tuned:
        torch.testing.assert_close(merged[name], tuned[name], rtol=0, atol=1e-6)
    assert RecipeMethod("d", "dare_ties", {}, seed=7).recipe(fast_zoo, [], {})["seed"] == 7


def test_quality_script_prints_the_same_table(report, fast_zoo):
    spec = importlib.util.spec_from_file_location("quality_script", REPO / "scripts" / "quality.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert script.main(["--fast", "--zoo", str(fast_zoo.root.parent), "--device", "cpu"]) == 0
    assert format_table(report) in out.getvalue()  # deterministic: same merges, same scores
    assert "nothing to build" in err.getvalue()
