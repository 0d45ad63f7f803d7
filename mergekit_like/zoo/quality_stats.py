"""RegMean and Fisher rows of the quality table (docs/methods/regmean.md §5): before the merge,
each merged fine-tune's statistics on unlabeled calibration texts of its own task, through the
real ``stats gram`` / ``stats fisher`` commands; then the merge recipe names each model's folder.

The texts are the prompts of the task's train split with the answers dropped; under
``calibration="self"`` each prompt is followed by the fine-tune's own greedy continuation (up to
its first EOS), so the statistics see the positions where answers are generated without using
a single reference answer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from mergekit_like.zoo.build import Zoo
from mergekit_like.zoo.quality_methods import RecipeMethod, run_merge_cli

CALIBRATION_TEXTS = 128
"""Prompts per task (the first ones of its train split)."""


@dataclass(frozen=True)
class StatsRow(RecipeMethod):
    """``stat``: the ``stats`` command (gram | fisher); its folder goes to
    ``models[i].parameters.<stat>``."""

    stat: str = "gram"
    calibration: str = "self"

    def build(self, zoo: Zoo, merged_tasks: Sequence[str], params: dict[str, Any],
              out: Path) -> Path:
        folders = {t: self._statistics(zoo, t, out.parent.parent / "stats") for t in merged_tasks}
        doc = self.recipe(zoo, merged_tasks, params, out)
        if "lambda" not in {**self.fixed, **params}:
            doc.pop("base_model")
        for entry, task in zip(doc["models"], merged_tasks):
            entry["parameters"] = {**entry["parameters"], self.stat: str(folders[task])}
        out.parent.mkdir(parents=True, exist_ok=True)
        recipe = out.with_name(out.name + ".yml")
        recipe.write_text(json.dumps(doc, indent=1))
        run_merge_cli(["merge", recipe, out, "-q", "--overwrite"], f"merge of {recipe}")
        return out

    def _statistics(self, zoo: Zoo, task: str, root: Path) -> Path:
        """The task's statistics folder, made once per zoo (kept beside the merges)."""
        folder = root / f"{self.stat}-{self.calibration}-{task}"
        if (folder / "importance.json").is_file():
            return folder
        root.mkdir(parents=True, exist_ok=True)
        data = root / f"calibration-{self.calibration}-{task}.jsonl"
        lines = zoo.split(task, "train").read_text().splitlines()[:CALIBRATION_TEXTS]
        prompts = [json.loads(ln)["input_ids"] for ln in lines]
        if self.calibration == "self":
            prompts = self_continued(zoo.model(task), prompts)
        data.write_text("".join(json.dumps({"input_ids": ids}) + "\n" for ids in prompts))
        run_merge_cli(["stats", self.stat, "--model", zoo.model(task), "--data", data,
                       "--out", folder, "--device", "cpu", "-q", "--overwrite"],
                      f"stats {self.stat} of {task}")
        return folder


STATS_ROWS = [
    StatsRow("regmean", "regmean", {}, sweep={"reduce_non_diagonal_ratio": (0.5, 0.9, 1.0)},
             stat="gram"),
    StatsRow("regmean + λ", "regmean", {}, sweep={"reduce_non_diagonal_ratio": (0.5, 0.7, 0.9),
                                                  "lambda": (0.3, 0.4, 0.5)}, stat="gram"),
    StatsRow("fisher", "fisher", {}, sweep={"normalize_fisher_weight": (True, False)},
             stat="fisher"),
]


def self_continued(model: Path, prompts: list[list[int]], steps: int = 8) -> list[list[int]]:
    """Each prompt followed by ``model``'s own greedy continuation, cut after its first EOS."""
    import torch

    from mergekit_like.runtime import load_model
    from mergekit_like.runtime.evaluate import greedy_continuations

    loaded = load_model(model, device="cpu")
    eos = loaded.model.config.eos_token_id
    out = []
    for start in range(0, len(prompts), 64):
        batch = prompts[start:start + 64]
        new = greedy_continuations(loaded.model, batch, steps, torch.device("cpu")).tolist()
        for p, cont in zip(batch, new):
            cut = cont.index(eos) + 1 if eos in cont else len(cont)
            out.append(p + cont[:cut])
    return out
