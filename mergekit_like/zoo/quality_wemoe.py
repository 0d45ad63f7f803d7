"""WEMoE rows of the quality table (docs/methods/wemoe.md): the upscaled merge of the merged fine-tunes with
untrained routers (exactly task arithmetic at λ), and after ``train-router`` on the merged
tasks' validation texts without their labels (entropy minimisation)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from mergekit_like.zoo.build import Zoo
from mergekit_like.zoo.quality_methods import RecipeMethod, run_merge_cli

ROUTER_STEPS = (100, 300, 600)
ROUTER_LR = 1e-2
LAMBDAS = (0.3, 0.7)


@dataclass(frozen=True)
class WEMoERow(RecipeMethod):
    """``trained``: train the routers in ``build`` on the validation texts (prompt and answer,
    the task label dropped), ``router_steps`` steps at ``ROUTER_LR``."""

    trained: bool = False
    oracle: bool = False
    """Route every example one-hot to its own task (``fix_routing``): the ceiling a router can
    reach; tasks outside the merge keep the untrained routing."""

    def recipe(self, zoo: Zoo, merged_tasks: Sequence[str], params: dict[str, Any],
               out: Path | None = None) -> dict:
        """The wemoe recipe; ``router_steps`` is train-router's, not the merge's."""
        merge = {k: v for k, v in params.items() if k != "router_steps"}
        return super().recipe(zoo, merged_tasks, merge, out)

    def build(self, zoo: Zoo, merged_tasks: Sequence[str], params: dict[str, Any],
              out: Path) -> Path:
        super().build(zoo, merged_tasks, params, out)
        if self.trained:
            data = out.with_name(out.name + "-texts.jsonl")
            lines = []
            for t in merged_tasks:
                for line in zoo.split(t, "validation").read_text().splitlines():
                    rec = json.loads(line)
                    lines.append(json.dumps({"input_ids": rec["input_ids"],
                                             "answer": rec["answer"]}))  # no task label
            data.write_text("\n".join(lines) + "\n")
            steps = params.get("router_steps", ROUTER_STEPS[0])
            run_merge_cli(["train-router", out, "--data", data, "--steps", steps, "--lr",
                           ROUTER_LR, "-q"], f"train-router on {out}")
        return out

    def accuracy(self, folder: Path, examples: list, device: str,
                 batch_size: int) -> dict[str, float]:
        from mergekit_like.runtime import evaluate_accuracy
        from mergekit_like.wemoe.runtime import load_wemoe

        loaded = load_wemoe(folder, device=device)
        if not self.oracle:
            scores = evaluate_accuracy(loaded, examples, batch_size=batch_size)
            return {t: v for t, v in scores.items() if t != "average"}
        tasks = list(loaded.model.config.wemoe["tasks"])
        scores = {}
        for task in dict.fromkeys(ex.task for ex in examples):
            subset = [ex for ex in examples if ex.task == task]
            routing = torch.nn.functional.one_hot(torch.tensor(tasks.index(task)),
                                                  len(tasks)).float() if task in tasks else None
            loaded.model.fix_routing(routing)
            scores[task] = evaluate_accuracy(loaded, subset, batch_size=batch_size)[task]
        loaded.model.fix_routing(None)
        return scores


WEMOE_ROWS = [
    WEMoERow("wemoe (untrained)", "wemoe", {}, sweep={"lambda": LAMBDAS}, named=True),
    WEMoERow("wemoe (oracle routing)", "wemoe", {}, sweep={"lambda": LAMBDAS}, named=True,
             oracle=True),
    WEMoERow("wemoe (train-router)", "wemoe", {},
             sweep={"lambda": LAMBDAS, "router_steps": ROUTER_STEPS}, named=True, trained=True),
]
