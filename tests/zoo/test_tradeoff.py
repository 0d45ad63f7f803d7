"""The RCP trade-off of scripts/quality.py: each candidate's (reasoning kept, domain gain
recovered) from per-candidate test accuracies, the Pareto front, the best domain gain at ≥ 90 %
kept, and the figures written as PNG files."""

from __future__ import annotations

import pytest

from mergekit_like.zoo.quality import QualityReport, Row
from mergekit_like.zoo.quality_rcp import (DOMAIN, REASONING, best_domain_at, format_front,
                                            pareto_front, trade_off)


def _report() -> QualityReport:
    acc = lambda r, d: {REASONING: r, DOMAIN: d}  # noqa: E731
    base, r_ft, d_ft = acc(0.1, 0.2), acc(0.8, 0.2), acc(0.1, 0.6)
    cands = [({"lambda": 0.5}, 0.4), ({"lambda": 1.0}, 0.5), ({"lambda": 2.0}, 0.3)]
    # two zoos, three candidates each: the mean over zoos is what counts
    tests = [[acc(0.80, 0.20), acc(0.76, 0.40), acc(0.40, 0.60)],
             [acc(0.80, 0.30), acc(0.76, 0.40), acc(0.40, 0.60)]]
    rows = [Row("base", [base, base]), Row(f"fine-tune: {REASONING}", [r_ft, r_ft]),
            Row(f"fine-tune: {DOMAIN}", [d_ft, d_ft]),
            Row("m", [tests[0][1], tests[1][1]], [{"lambda": 1.0}] * 2, [cands, cands], tests)]
    return QualityReport([REASONING, DOMAIN], [REASONING, DOMAIN], [0, 1], rows)


def test_points_front_and_best_at_ninety_percent():
    points = trade_off(_report())["m"]
    kept = [p[0] for p in points]
    recovered = [p[1] for p in points]
    assert kept == pytest.approx([1.0, 0.95, 0.5])
    assert recovered == pytest.approx([0.125, 0.5, 1.0])     # (mean − 0.2) / (0.6 − 0.2)
    dominated = points + [(0.85, 0.4, {"lambda": 9})]
    front = pareto_front(dominated)
    assert [p[2]["lambda"] for p in front] == [2.0, 1.0, 0.5]
    assert best_domain_at(front, 0.9) == pytest.approx(0.5)
    assert best_domain_at(front, 1.01) is None
    assert "| m | 50% |" in format_front({"m": points})


def test_figures_are_png_files(tmp_path):
    pytest.importorskip("matplotlib")
    from mergekit_like.zoo.figures import accuracy_bars, trade_off_curves

    bars = accuracy_bars(["base", "ta"], [0.2, 0.5], [0.3, 0.4], tmp_path / "a.png")
    points = trade_off(_report())
    front = trade_off_curves(points, {k: pareto_front(v) for k, v in points.items()},
                             tmp_path / "b.png")
    for path in (bars, front):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000
