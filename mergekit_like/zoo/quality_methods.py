"""Rows of the quality table that a merge method contributes (see quality.py)."""

from __future__ import annotations

import contextlib
import io
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import yaml

from mergekit_like.zoo.build import Zoo

Log = Callable[[str], None]


class Method(Protocol):
    """One merge row: ``candidates()`` are the parameter sets tried on validation (in order; the
    first best wins), ``build`` writes the model of one of them into ``out`` and returns it."""

    label: str

    def candidates(self) -> list[dict[str, Any]]: ...

    def build(self, zoo: Zoo, merged_tasks: Sequence[str], params: dict[str, Any],
              out: Path) -> Path: ...


@dataclass(frozen=True)
class RecipeMethod:
    """A method the ``mergekit-like merge`` command runs: a recipe with ``base_model`` = the zoo
    base, one entry per merged fine-tune with ``per_model`` parameters, top-level
    ``parameters`` = ``fixed`` plus one point of the ``sweep`` grid (the product of its value
    lists), and ``seed``."""

    label: str
    merge_method: str
    per_model: Mapping[str, Any]
    sweep: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    fixed: Mapping[str, Any] = field(default_factory=dict)
    seed: int | None = None
    named: bool = False
    """Give each model entry its task as ``name`` (twin, wemoe)."""

    def candidates(self) -> list[dict[str, Any]]:
        keys = list(self.sweep)
        return [dict(zip(keys, values)) for values in itertools.product(*self.sweep.values())]

    def recipe(self, zoo: Zoo, merged_tasks: Sequence[str], params: Mapping[str, Any],
               out: Path | None = None) -> dict:
        """The recipe document (absolute model paths, float32 in and out) for the output
        folder ``out``."""
        doc: dict[str, Any] = {
            "merge_method": self.merge_method,
            "base_model": str(zoo.base.resolve()),
            "models": [{"model": str(zoo.model(t).resolve()), "parameters": dict(self.per_model)}
                       for t in merged_tasks],
            "parameters": {**self.fixed, **params},
            "dtype": "float32",
            "out_dtype": "float32",
        }
        if self.seed is not None:
            doc["seed"] = self.seed
        if self.named:
            for entry, task in zip(doc["models"], merged_tasks):
                entry["name"] = task
        return doc

    def build(self, zoo: Zoo, merged_tasks: Sequence[str], params: dict[str, Any],
              out: Path) -> Path:
        out.parent.mkdir(parents=True, exist_ok=True)
        recipe = out.with_name(out.name + ".yml")
        recipe.write_text(yaml.safe_dump(self.recipe(zoo, merged_tasks, params, out),
                                         sort_keys=False))
        run_merge_cli(["merge", recipe, out, "-q", "--overwrite"], f"merge of {recipe}")
        return out


def run_merge_cli(args: Sequence[Any], what: str) -> None:
    """Run ``mergekit-like ARGS`` in-process; its stderr is shown only if it fails."""
    from mergekit_like.cli import main

    messages = io.StringIO()
    with contextlib.redirect_stderr(messages), contextlib.redirect_stdout(messages):
        code = main([str(a) for a in args])
    if code != 0:
        raise RuntimeError(f"{what} failed with exit code {code}: {messages.getvalue().strip()}")


