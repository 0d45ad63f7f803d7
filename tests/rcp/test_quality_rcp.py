"""The reasoning + domain quality table on the FAST zoo: task arithmetic, TIES, RCP (importance
maps made by the real `importance` commands) and rcp_approx, tuned on validation."""

from __future__ import annotations

import json
import math

import pytest
from support.zoo_fixture import fast_zoo  # noqa: F401  (session fixture)

from mergekit_like.zoo.quality import run_quality
from mergekit_like.zoo.quality_rcp import (DOMAIN, PENALTY_LAMBDAS, RCP_DOMAIN_SCALES, RCP_ROWS,
                                           REASONING, VOTE_THRESHOLDS, format_gains, gains)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("rcp-quality")


@pytest.fixture(scope="module")
def report(fast_zoo, work):
    return run_quality([fast_zoo], work, methods=RCP_ROWS, merged_tasks=[REASONING, DOMAIN],
                       device="cpu")


def test_rows_and_candidates(report):
    labels = [r.label for r in report.rows]
    assert labels[-4:] == ["task_arithmetic", "ties", "rcp", "rcp_approx"]
    assert report.merged == [REASONING, DOMAIN]
    rcp = report.rows[labels.index("rcp")]
    swept = [(p["penalty_lambda"], p["domain_scale"], p["vote_threshold"])
             for p, _ in rcp.validation[0]]
    assert swept == [(lam, s, v) for lam in PENALTY_LAMBDAS for s in RCP_DOMAIN_SCALES
                     for v in VOTE_THRESHOLDS]
    assert VOTE_THRESHOLDS == (0.0, -16.0)      # −K/2 for the 32 domain texts
    for row in report.rows:
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in row.test.values())


def test_votes_come_from_the_importance_commands(report, work, fast_zoo):
    folders = sorted((work / fast_zoo.root.name / "importance").glob("votes_*"))
    assert len(folders) == len(PENALTY_LAMBDAS)
    fractions = []
    for lam in PENALTY_LAMBDAS:
        from mergekit_like.rcp.folder import votes_folder

        info = json.loads((votes_folder(folders[0].with_name("votes"), lam)
                           / "importance.json").read_text())
        assert info["kind"] == "rcp_votes" and float(info["penalty_lambda"]) == lam
        assert info["n_examples"] == "32"
        fractions.append(info["selected_fraction"])
    # a larger penalty never selects more weights (λ·p ≥ 0 only raises C)
    assert fractions == sorted(fractions, reverse=True) and fractions[0] > fractions[-1]


def test_rcp_keeps_the_reasoning_model_where_it_is_the_anchor(report):
    g = gains(report)
    assert g[f"fine-tune: {REASONING}"]["reasoning_kept"] == 1.0
    assert g[f"fine-tune: {DOMAIN}"]["domain_recovered"] == 1.0
    assert g["base"]["domain_recovered"] == 0.0
    # RCP adds to the reasoning model only the selected part of the domain delta
    assert g["rcp"]["reasoning_kept"] >= 0.9
    table = format_gains(report)
    assert table.count("\n") == len(g) + 1 and "| rcp |" in table
    assert list(g) == ["base", f"fine-tune: {REASONING}", f"fine-tune: {DOMAIN}",
                       "task_arithmetic", "ties", "rcp", "rcp_approx"]
