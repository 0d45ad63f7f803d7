"""The reasoning/domain table of the quality suite (docs/methods/rcp.md; issue "RCP"): the zoo's reasoning
fine-tune (``chain``) merged with its domain fine-tune (``cipher``) by task arithmetic, TIES,
RCP-Merging and the data-free ``rcp_approx``, each tuned on the validation split.

RCP's importance maps come from the real commands, once per zoo: ``importance fisher`` on
``CALIBRATION`` reasoning texts and ``importance rcp-votes`` on as many domain texts (the first
examples of each task's *train* split, so validation stays unseen), for every λ of the sweep.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from mergekit_like.zoo.build import Zoo
from mergekit_like.zoo.quality_methods import RecipeMethod, run_merge_cli

REASONING, DOMAIN = "chain", "cipher"
CALIBRATION = 32
PENALTY_LAMBDAS = (0.0, 1e3, 1e6, 1e7, 1e9, float("inf"))


def _calibration(zoo: Zoo, task: str, out: Path) -> Path:
    lines = zoo.split(task, "train").read_text().splitlines()[:CALIBRATION]
    out.write_text("\n".join(lines) + "\n")      # {"input_ids", "answer", "task"} each
    return out


def importance_folders(zoo: Zoo, work: Path) -> Path:
    """Run the two importance commands once per zoo under ``work``; returns the votes stem."""
    from mergekit_like.rcp.folder import votes_folder

    work.mkdir(parents=True, exist_ok=True)
    stem = work / "votes"
    if all(votes_folder(stem, lam).is_dir() for lam in PENALTY_LAMBDAS):
        return stem
    reason = _calibration(zoo, REASONING, work / "reasoning.jsonl")
    domain = _calibration(zoo, DOMAIN, work / "domain.jsonl")
    fisher = work / "fisher"
    run_merge_cli(["importance", "fisher", "--model", zoo.model(REASONING), "--data", reason,
                   "--out", fisher, "--device", "cpu", "-q", "--overwrite"], "importance fisher")
    args = ["importance", "rcp-votes", "--model", zoo.model(DOMAIN), "--reasoning",
            zoo.model(REASONING), "--fisher", fisher, "--data", domain, "--out", stem,
            "--device", "cpu", "-q", "--overwrite"]
    for lam in PENALTY_LAMBDAS:
        args += ["--penalty-lambda", str(lam)]
    run_merge_cli(args, "importance rcp-votes")
    return stem


@dataclass(frozen=True)
class RoleRow(RecipeMethod):
    """A recipe whose two models carry ``role: reasoning`` / ``role: domain`` (rcp, rcp_approx);
    ``votes``: the domain entry gets the votes folder of the candidate's penalty_lambda."""

    votes: bool = False

    def recipe(self, zoo: Zoo, merged_tasks: Sequence[str], params: dict[str, Any],
               out: Path | None = None) -> dict:
        doc = super().recipe(zoo, merged_tasks, params)
        for entry, task in zip(doc["models"], merged_tasks):
            entry["parameters"] = {"role": "reasoning" if task == REASONING else "domain"}
        if self.votes and out is not None:
            from mergekit_like.rcp.folder import votes_folder

            stem = importance_folders(zoo, out.parent.parent / "importance")
            lam = float(params["penalty_lambda"])
            domain = next(e for e, t in zip(doc["models"], merged_tasks) if t == DOMAIN)
            domain["parameters"]["importance"] = str(votes_folder(stem, lam).resolve())
        return doc


DOMAIN_SCALES = (0.5, 1.0)
RCP_DOMAIN_SCALES = (1.0, 2.0, 2.5)
"""RCP adds δ_domain on a scattered minority of the weights (2–48 % with vote_threshold 0, by λ);
scaling it up makes up for the weights it leaves out (docs/quality.md §4)."""
VOTE_THRESHOLDS = (0.0, -CALIBRATION / 2)
"""0: most domain texts must vote for a weight (the code's default); −K/2: more than a quarter."""
RCP_ROWS = [
    RecipeMethod("task_arithmetic", "task_arithmetic", {"weight": 1.0},
                 sweep={"lambda": (0.2, 0.3, 0.5, 0.7, 1.0)}),
    RecipeMethod("ties", "ties", {"weight": 1.0},
                 sweep={"density": (0.1, 0.3, 0.5, 0.7), "lambda": (0.5, 1.0)}),
    RoleRow("rcp", "rcp", {}, sweep={"penalty_lambda": PENALTY_LAMBDAS,
                                     "domain_scale": RCP_DOMAIN_SCALES,
                                     "vote_threshold": VOTE_THRESHOLDS}, votes=True),
    RoleRow("rcp_approx", "rcp_approx", {}, sweep={"approx_lambda": (0.5, 1.0, 2.0),
                                                   "domain_scale": DOMAIN_SCALES}),
]


def gains(report) -> dict[str, dict[str, float]]:
    """Per row: test accuracy on the two tasks, the share of the reasoning fine-tune's reasoning
    accuracy kept, and the share of the domain fine-tune's gain over the base recovered (rows:
    the base, the two fine-tunes merged, the methods)."""
    rows = {r.label: r.test for r in report.rows}
    base, r_ft, d_ft = rows["base"], rows[f"fine-tune: {REASONING}"], rows[f"fine-tune: {DOMAIN}"]
    shown = ["base", f"fine-tune: {REASONING}", f"fine-tune: {DOMAIN}",
             *[label for label in rows if not label.startswith(("base", "fine-tune:"))]]
    out = {}
    for label in shown:
        test = rows[label]
        gain = d_ft[DOMAIN] - base[DOMAIN]
        out[label] = {REASONING: test[REASONING], DOMAIN: test[DOMAIN],
                      "reasoning_kept": test[REASONING] / r_ft[REASONING] if r_ft[REASONING] else 0.0,
                      "domain_recovered": (test[DOMAIN] - base[DOMAIN]) / gain if gain else 0.0}
    return out


def format_gains(report) -> str:
    """Markdown: reasoning kept and domain gain recovered per row (the issue's targets:
    RCP ≥ 95 % kept and ≥ 50 % recovered)."""
    lines = ["| model | chain (reasoning) | cipher (domain) | reasoning kept | domain gain recovered |",
             "|---|---|---|---|---|"]
    for label, g in gains(report).items():
        lines.append(f"| {label} | {g[REASONING]:.2f} | {g[DOMAIN]:.2f} | "
                     f"{g['reasoning_kept']:.0%} | {g['domain_recovered']:.0%} |")
    return "\n".join(lines)


def trade_off(report) -> dict[str, list[tuple[float, float, dict[str, Any]]]]:
    """Per method, every swept candidate as (reasoning kept, domain gain recovered, params),
    test accuracies averaged over the zoos (needs ``run_quality(..., every_test=True)``)."""
    rows = {r.label: r.test for r in report.rows}
    base, r_ft, d_ft = rows["base"], rows[f"fine-tune: {REASONING}"], rows[f"fine-tune: {DOMAIN}"]
    gain = d_ft[DOMAIN] - base[DOMAIN]
    out: dict[str, list[tuple[float, float, dict[str, Any]]]] = {}
    for row in report.rows:
        if not row.candidate_tests:
            continue
        points = []
        for k, (params, _) in enumerate(row.validation[0]):
            per_zoo = [cands[k] for cands in row.candidate_tests]
            reason = sum(t[REASONING] for t in per_zoo) / len(per_zoo)
            domain = sum(t[DOMAIN] for t in per_zoo) / len(per_zoo)
            points.append((reason / r_ft[REASONING] if r_ft[REASONING] else 0.0,
                           (domain - base[DOMAIN]) / gain if gain else 0.0, params))
        out[row.label] = points
    return out


def pareto_front(points: Sequence[tuple[float, float, Any]]) -> list[tuple[float, float, Any]]:
    """The points no other point beats on both coordinates, by increasing reasoning kept."""
    front = [p for p in points
             if not any(q[0] >= p[0] and q[1] >= p[1] and (q[0], q[1]) != (p[0], p[1])
                        for q in points)]
    return sorted(front, key=lambda p: p[0])


def best_domain_at(front: Sequence[tuple[float, float, Any]], kept: float) -> float | None:
    """The most domain gain recovered among front points keeping ≥ ``kept`` of reasoning."""
    ok = [p[1] for p in front if p[0] >= kept]
    return max(ok) if ok else None


def format_front(curves: dict[str, list[tuple[float, float, dict[str, Any]]]]) -> str:
    """Markdown: each method's Pareto front, and its best domain recovery at ≥ 90 % kept."""
    lines = ["| method | best domain gain recovered with reasoning kept ≥ 90 % | front "
             "(reasoning kept, domain recovered: parameters) |", "|---|---|---|"]
    for label, points in curves.items():
        front = pareto_front(points)
        best = best_domain_at(front, 0.9)
        cells = "; ".join(f"{k:.0%}, {d:.0%}: {', '.join(f'{a}={b}' for a, b in p.items())}"
                          for k, d, p in front)
        lines.append(f"| {label} | {'—' if best is None else f'{best:.0%}'} | {cells} |")
    return "\n".join(lines)
