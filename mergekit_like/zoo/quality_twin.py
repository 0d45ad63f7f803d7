"""Twin-Merging rows of the quality table (docs/methods/twin.md): the bundle of the merged fine-tunes at rank
0.1, scored with the oracle task id (each task's examples on ``twin materialize --task``), and
routed (a router trained on the merged tasks' validation prompts, applied per example)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from mergekit_like.zoo.build import Zoo
from mergekit_like.zoo.quality_methods import RecipeMethod, run_merge_cli

TWIN_RANK = 0.1


@dataclass(frozen=True)
class TwinRow(RecipeMethod):
    """``routed``: score the bundle through the router (trained in ``build``); otherwise give
    every example its own task's materialized model (tasks outside the bundle: the shared one)."""

    routed: bool = False

    def build(self, zoo: Zoo, merged_tasks: Sequence[str], params: dict[str, Any],
              out: Path) -> Path:
        super().build(zoo, merged_tasks, params, out)
        if self.routed:
            data = out.with_name(out.name + "-router.jsonl")
            lines = [line for t in merged_tasks
                     for line in zoo.split(t, "validation").read_text().splitlines()]
            data.write_text("\n".join(lines) + "\n")   # {"input_ids", "answer", "task"} each
            run_merge_cli(["train-router", out, "--data", data, "-q"], f"train-router on {out}")
        return out

    def accuracy(self, folder: Path, examples: list, device: str,
                 batch_size: int) -> dict[str, float]:
        from mergekit_like.runtime import evaluate_accuracy, load_model
        from mergekit_like.twin.runtime import load_twin

        if self.routed:
            scores = evaluate_accuracy(load_twin(folder, device=device), examples,
                                       batch_size=batch_size)
            return {t: v for t, v in scores.items() if t != "average"}
        tasks = json.loads((folder / "twin" / "twin.json").read_text())["tasks"]
        scores = {}
        for task in dict.fromkeys(ex.task for ex in examples):
            model = folder
            if task in tasks:
                model = folder.with_name(f"{folder.name}-{task}")
                if not model.is_dir():
                    run_merge_cli(["twin", "materialize", folder, model, "--task", task, "-q"],
                                  f"twin materialize {folder} --task {task}")
            subset = [ex for ex in examples if ex.task == task]
            scores[task] = evaluate_accuracy(load_model(model, device=device), subset,
                                             batch_size=batch_size)[task]
        return scores


TWIN_ROWS = [
    TwinRow("twin (oracle task id)", "twin", {}, fixed={"rank": TWIN_RANK, "svd": "exact"},
           named=True),
    TwinRow("twin (routed)", "twin", {}, fixed={"rank": TWIN_RANK, "svd": "exact"},
            named=True, routed=True),
]
