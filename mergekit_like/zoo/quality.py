"""Merge quality on the zoo: merge the skill fine-tunes with each method through the real CLI,
choose each method's hyper-parameters on the validation split, report held-out test accuracy.

A table row is a ``Method``: a label, the hyper-parameter candidates to try, and a ``build``
that turns one candidate into a model folder. ``METHODS`` lists the merge rows; adding a method
is one entry there (``RecipeMethod`` for anything the ``merge`` command runs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from mergekit_like.zoo.build import Zoo
from mergekit_like.zoo.quality_methods import Log, Method, RecipeMethod
from mergekit_like.zoo.quality_stats import STATS_ROWS
from mergekit_like.zoo.quality_twin import TWIN_ROWS
from mergekit_like.zoo.quality_wemoe import WEMOE_ROWS

SYMBOLS = {"lambda": "λ"}  # how a parameter name is printed in a row label

LAMBDAS = (0.2, 0.3, 0.5, 0.7, 1.0)
METHODS: list[Method] = [
    RecipeMethod("task_arithmetic", "task_arithmetic", {"weight": 1.0}, sweep={"lambda": LAMBDAS}),
    RecipeMethod("ties", "ties", {"weight": 1.0}, sweep={"density": (0.3, 0.5, 0.7)}),
    RecipeMethod("dare_ties", "dare_ties", {"weight": 1.0, "density": 0.5},
                 sweep={"lambda": LAMBDAS}, seed=0),
    *STATS_ROWS,
    *TWIN_ROWS,
    *WEMOE_ROWS,
]


@dataclass
class Row:
    """One table row over one or more zoos (seeds): per zoo, the test accuracy of every task
    (fractions in [0, 1]) and, for a merge, the chosen parameters and every candidate's
    validation score (mean over the merged tasks)."""

    label: str
    tests: list[dict[str, float]]
    chosen: list[dict[str, Any]] | None = None
    validation: list[list[tuple[dict[str, Any], float]]] | None = None
    candidate_tests: list[list[dict[str, float]]] | None = None
    """With ``every_test``: per zoo, the test accuracy of every candidate (sweep order), for
    trade-off curves; the table itself only ever reports the candidate chosen on validation."""

    @property
    def test(self) -> dict[str, float]:
        """Test accuracy per task, averaged over the zoos."""
        return {t: mean([scores[t] for scores in self.tests]) for t in self.tests[0]}


@dataclass
class QualityReport:
    """tasks: the table's task columns; merged: the tasks whose fine-tunes were merged; seeds:
    the seed of each zoo, in the order of every row's per-zoo lists."""

    tasks: list[str]
    merged: list[str]
    seeds: list[int]
    rows: list[Row]


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _accuracy(folder: Path, examples: list, device: str, batch_size: int) -> dict[str, float]:
    """Per-task exact-match accuracy of the model in ``folder`` (the runtime's evaluation)."""
    from mergekit_like.runtime import evaluate_accuracy, load_model

    scores = evaluate_accuracy(load_model(folder, device=device), examples, batch_size=batch_size)
    return {task: value for task, value in scores.items() if task != "average"}


def _folder_name(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def param_text(params: Mapping[str, Any]) -> str:
    """``{"lambda": 0.3}`` -> ``λ=0.3``."""
    return ", ".join(f"{SYMBOLS.get(k, k)}={v}" for k, v in params.items())


def _zoo_rows(zoo: Zoo, work: Path, methods: Sequence[Method], merged: list[str], device: str,
              batch_size: int, log: Log, every_test: bool = False) -> list[Row]:
    """The rows of one zoo: base, every fine-tune, every method (parameters chosen on
    validation, first best wins)."""
    from mergekit_like.runtime import read_examples

    test = [e for t in zoo.tasks for e in read_examples(zoo.split(t, "test"))]
    validation = [e for t in merged for e in read_examples(zoo.split(t, "validation"))]
    rows = [Row("base", [_accuracy(zoo.base, test, device, batch_size)])]
    rows += [Row(f"fine-tune: {t}", [_accuracy(zoo.model(t), test, device, batch_size)])
             for t in zoo.tasks]
    for method in methods:
        accuracy = getattr(method, "accuracy", _accuracy)  # a bundle is scored its own way
        scored = []
        for i, params in enumerate(method.candidates()):
            folder = method.build(zoo, merged, params, work / _folder_name(method.label) / f"c{i}")
            score = mean(list(accuracy(folder, validation, device, batch_size).values()))
            log(f"quality {zoo.root.name}: {method.label} {param_text(params)}: "
                f"validation {score:.3f}")
            scored.append((params, score, folder))
        best_params, _, best_folder = max(scored, key=lambda s: s[1])
        every = [accuracy(f, test, device, batch_size) for _, _, f in scored] if every_test \
            else None
        best = every[scored.index(max(scored, key=lambda s: s[1]))] if every else \
            accuracy(best_folder, test, device, batch_size)
        rows.append(Row(method.label, [best], [best_params], [[(p, s) for p, s, _ in scored]],
                        [every] if every else None))
    return rows


def run_quality(zoos: Sequence[Zoo], work: Path, methods: Sequence[Method] = tuple(METHODS),
                merged_tasks: Sequence[str] | None = None, device: str = "auto",
                batch_size: int = 64, log: Log = lambda _msg: None,
                every_test: bool = False) -> QualityReport:
    """For every zoo: evaluate the base, every fine-tune and every method's merge of
    ``merged_tasks`` (default: the skill tasks) on every task's test split, each method with the
    candidate of best mean validation accuracy over the merged tasks. Rows hold one entry per
    zoo. Merged models go under ``work/<zoo folder name>/``."""
    merged = list(merged_tasks or zoos[0].tasks_of_kind("skill"))
    per_zoo = [_zoo_rows(z, Path(work) / z.root.name, methods, merged, device, batch_size, log,
                         every_test) for z in zoos]
    rows = [Row(r.label, [z[i].tests[0] for z in per_zoo],
                None if r.chosen is None else [z[i].chosen[0] for z in per_zoo],
                None if r.validation is None else [z[i].validation[0] for z in per_zoo],
                None if r.candidate_tests is None else [z[i].candidate_tests[0]
                                                        for z in per_zoo])
            for i, r in enumerate(per_zoo[0])]
    seeds = [z.manifest["settings"]["seed"] for z in zoos]
    return QualityReport(tasks=list(zoos[0].tasks), merged=merged, seeds=seeds, rows=rows)


def format_table(report: QualityReport) -> str:
    """Markdown table: one row per model, test accuracy per task (mean over the zoos), the mean
    over the merged tasks and over all tasks (and, for several zoos, the merged mean of each);
    then each method's validation sweep."""
    several = len(report.seeds) > 1
    head = ["model", *report.tasks, "avg merged", "avg all"]
    head += ["avg merged per seed"] if several else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report.rows:
        label = row.label
        if row.chosen and not several:
            label += f" ({param_text(row.chosen[0])})"
        test = row.test
        cells = [f"{test[t]:.2f}" for t in report.tasks]
        cells += [f"{mean([test[t] for t in report.merged]):.2f}",
                  f"{mean([test[t] for t in report.tasks]):.2f}"]
        if several:
            per_seed = [mean([s[t] for t in report.merged]) for s in row.tests]
            cells.append(" / ".join(f"{v:.2f}" for v in per_seed))
        lines.append("| " + " | ".join([label, *cells]) + " |")
    seeds = ", ".join(str(s) for s in report.seeds)
    lines += ["", f"Test accuracy (exact match, greedy){' averaged over' if several else ','} "
                  f"zoo seed{'s' if several else ''} {seeds}. avg merged: mean over the merged "
                  f"tasks ({', '.join(report.merged)}); avg all: mean over every task."]
    sweeps = [row for row in report.rows if row.validation]
    if sweeps:
        lines += ["", "Chosen on the validation split (mean accuracy over the merged tasks):", ""]
        for row in sweeps:
            for seed, tried, chosen in zip(report.seeds, row.validation, row.chosen):
                scores = ", ".join(f"{param_text(p) or '-'}: {s:.2f}" for p, s in tried)
                where = f" (seed {seed})" if several else ""
                lines.append(f"* {row.label}{where}: {scores} → {param_text(chosen) or '-'}")
    return "\n".join(lines)
