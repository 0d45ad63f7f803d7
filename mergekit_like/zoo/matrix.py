"""The zoo's accuracy matrix: the base and every fine-tune on every task's test split.

``accuracy_matrix`` holds, per model ("base", then one row per fine-tune, named by its task), the
exact-match test accuracy on each task, averaged over the given zoos (one per seed); this is the
table of docs/quality.md §2 and of ``scripts/zoo.py --matrix``.
"""

from __future__ import annotations

from typing import Sequence

from mergekit_like.zoo.build import Zoo


def model_accuracy(zoo: Zoo, folder, device: str = "cpu",
                   batch_size: int = 128) -> dict[str, float]:
    """Per-task test accuracy of the model in ``folder`` on every task of ``zoo``."""
    from mergekit_like.runtime import evaluate_accuracy, load_model, read_examples

    test = [e for t in zoo.tasks for e in read_examples(zoo.split(t, "test"))]
    scores = evaluate_accuracy(load_model(folder, device=device), test, batch_size=batch_size)
    return {t: scores[t] for t in zoo.tasks}


def accuracy_matrix(zoos: Sequence[Zoo], device: str = "cpu") -> dict[str, dict[str, float]]:
    """{"base" or a fine-tune's task: {task: test accuracy averaged over ``zoos``}}."""
    rows: dict[str, list[dict[str, float]]] = {}
    for zoo in zoos:
        models = {"base": zoo.base, **{t: zoo.model(t) for t in zoo.tasks}}
        for name, folder in models.items():
            rows.setdefault(name, []).append(model_accuracy(zoo, folder, device))
    return {name: {t: sum(r[t] for r in runs) / len(runs) for t in runs[0]}
            for name, runs in rows.items()}


def format_matrix(matrix: dict[str, dict[str, float]], tasks: Sequence[str]) -> str:
    """Markdown: one row per model (the base, then ``fine-tune: <task>``), one column per task,
    and the mean over the tasks other than the row's own ("avg others"; all tasks for the
    base)."""
    head = ["model", *tasks, "avg others"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, scores in matrix.items():
        others = [scores[t] for t in tasks if t != name]
        label = name if name == "base" else f"fine-tune: {name}"
        cells = [f"{scores[t]:.2f}" for t in tasks] + [f"{sum(others) / len(others):.2f}"]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines)
