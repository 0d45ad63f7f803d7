"""Twin-Merging (Lu et al., NeurIPS 2024; docs/methods/twin.md): a shared model plus, per task, a truncated-SVD
exclusive part.

Per tensor, with b the base, x_t the fine-tune of task t (t = 1..T)::

    s   = shared_op(b, {x_t})                 task arithmetic λ = 0.3 by default, or TIES …
    v_t = x_t − s                             exclusive knowledge, relative to the SHARED model
    2-D:  U, σ, Vᵀ = svd_r(v_t)               r = max(1, ⌊rank·min(m, n)⌋), or an absolute rank
          A_t = U diag(σ) [m, r],  B_t = Vᵀ [r, n]        v_t ≈ A_t @ B_t
          energy_t = Σ_{i≤r} σ_i² / ‖v_t‖_F²              1 when v_t = 0
    1-D (dense_small):  δ_t = v_t stored whole

The shared model is the main output; factors go to ``twin/<task>/exclusive*.safetensors`` and
per-tensor kinds, ranks and energies to ``twin/twin.json`` (the bundle of twin/bundle.py).
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Any

import torch

from mergekit_like.errors import MergeError
from mergekit_like.recipe.params import NO_VALUE, evaluate, layer_index, parse_setting
from mergekit_like.twin.bundle import verify_bundle
from mergekit_like.twin.recipe import card_extra, check_twin_recipe, twin_json
from mergekit_like.methods.base import (REQUIRED, Method, MethodSpec, OutputSpec, ParamSpec,
                                        TensorTask, output_key)
from mergekit_like.ops.svd import factorize, rank_for, svd_seed
from mergekit_like.twin.bundle import (BUNDLE_DIR, FACTOR_STEM, INFO_FILE, SUFFIX_A, SUFFIX_B,
                                       SUFFIX_DELTA)

log = logging.getLogger(__name__)

DEFAULT_SHARED = {"merge_method": "task_arithmetic", "parameters": {"lambda": 0.3}}
VOCAB_MARKERS = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_out")


# ---- which tensors get exclusive parts (docs/methods/twin.md §3) ---------------------------------------------

def part_kind(name: str, shape: tuple[int, ...], params: dict[str, Any]) -> str:
    """lowrank | dense | shared_only for a floating tensor."""
    in_block = layer_index(name) is not None
    if in_block and len(shape) == 2:
        return "lowrank"
    if in_block and len(shape) == 1:
        return "dense" if params.get("dense_small") else "shared_only"
    if not in_block and len(shape) == 2 and any(m in name for m in VOCAB_MARKERS):
        return "lowrank" if params.get("include_embeddings") else "shared_only"
    return "shared_only"


def group_of(task: str) -> str:
    return f"{BUNDLE_DIR}/{task}/{FACTOR_STEM}"


# ---- engine adapter -----------------------------------------------------------------------------

class Twin(Method):
    takes_slices = False
    spec = MethodSpec(
        name="twin",
        params=(
            ParamSpec("weight", "float", 1.0, per_model=True),
            ParamSpec("density", "density", None, per_model=True),
            ParamSpec("shared", "structured", DEFAULT_SHARED),
            ParamSpec("rank", "rank", 0.1),
            ParamSpec("dense_small", "bool", False),
            ParamSpec("include_embeddings", "bool", False),
            ParamSpec("svd", "choice", "auto", choices=("auto", "exact", "lowrank")),
        ),
        needs_base=True,
        min_inputs=2,
    )
    entry_keys = ("name",)
    card_title = "Twin-Merging bundle"
    output_folders = (BUNDLE_DIR,)

    def check_output(self, folder, *, read_data=True, allow_nonfinite=False):
        from pathlib import Path

        if not (Path(folder) / BUNDLE_DIR).exists():
            return None
        return verify_bundle(folder, read_data=read_data, allow_nonfinite=allow_nonfinite)

    def __init__(self) -> None:
        self._operators: dict[str, Method] = {}
        """The shared sub-recipe's operators by name, from the method table each recipe using
        twin was validated with (the registry's; never imported here, it imports this)."""

    # -- phase A
    def check_recipe(self, recipe) -> None:
        check_twin_recipe(recipe)
        self._operators.update({name: m for name, m in recipe.methods.items()
                                if isinstance(m, Method)})

    # -- plan
    def plan_outputs(self, name, shape, dtype, *, params=None, inputs=None, warn=None):
        outputs = [OutputSpec(name, shape, dtype)]
        kind = part_kind(name, shape, params or {})
        for inp in inputs or []:
            task = inp.extra["name"]
            if kind == "lowrank":
                m, n = shape[0], math.prod(shape[1:])
                r = rank_for(params["rank"], m, n)
                outputs += [OutputSpec(name + SUFFIX_A, (m, r), dtype, group_of(task)),
                            OutputSpec(name + SUFFIX_B, (r, n), dtype, group_of(task))]
            elif kind == "dense":
                outputs.append(OutputSpec(name + SUFFIX_DELTA, shape, dtype, group_of(task)))
        if warn and kind == "lowrank":
            m, n = shape[0], math.prod(shape[1:])
            if isinstance(params["rank"], int) and params["rank"] > min(m, n):
                warn(f"twin: rank {params['rank']} exceeds the full rank min(m, n) of some "
                     "tensors; clamped to their full rank")
            r = rank_for(params["rank"], m, n)
            if r * (m + n) >= m * n:
                warn("twin: at this rank the factors of some tensors are larger than a dense "
                     "delta (r·(m + n) ≥ m·n)")
        return outputs

    # -- merge
    def merge(self, task: TensorTask) -> dict[str, torch.Tensor]:
        shared_method, sub = self._shared_task(task)
        s = shared_method.merge_tensor(sub)                     # float32 / float64, exact op
        stored = s.to(task.out_dtype)
        outputs = {task.name: stored}
        kind = part_kind(task.name, task.shape, task.params)
        report: dict[str, Any] = {"kind": kind, "shape": list(task.shape)}
        if kind != "shared_only":
            s_ref = stored.to(task.compute_dtype)               # materialize adds to THIS
            energies, hows = {}, set()
            m, n = task.shape[0], math.prod(task.shape[1:])
            r = rank_for(task.params["rank"], m, n) if kind == "lowrank" else None
            for x, extra in zip(task.inputs, task.input_extra):
                tname = extra["name"]
                v = x.to(task.compute_dtype) - s_ref
                group = group_of(tname)
                if kind == "dense":
                    outputs[output_key(task.name + SUFFIX_DELTA, group)] = v.to(task.out_dtype)
                    continue
                try:
                    a, b, energy, how = factorize(v.reshape(m, n), r, task.params["svd"],
                                                  svd_seed(task.seed, task.name, tname))
                except MergeError as exc:
                    raise MergeError(f"twin: tensor '{task.name}', task '{tname}': {exc}") from None
                if how not in ("exact", "lowrank"):
                    log.warning("twin: SVD of '%s' (task %s) fell back to %s", task.name, tname, how)
                outputs[output_key(task.name + SUFFIX_A, group)] = a.to(task.out_dtype)
                outputs[output_key(task.name + SUFFIX_B, group)] = b.to(task.out_dtype)
                energies[tname] = energy
                hows.add(how)
            if kind == "lowrank":
                report.update(rank=r, energy=energies, svd="+".join(sorted(hows)))
        task.report = report
        return outputs

    def _shared_task(self, task: TensorTask) -> tuple[Method, TensorTask]:
        """The shared operator and its TensorTask: the sub-recipe's parameters resolved for
        this tensor over that operator's defaults, per-model weight (and density) passed on."""
        doc = task.params["shared"]
        method = self._operators[doc.get("merge_method", "task_arithmetic")]
        params = {}
        for p in method.spec.params:
            if p.per_model:
                continue
            raw = (doc.get("parameters") or {}).get(p.name)
            value = evaluate(parse_setting(raw), task.name, task.t) if raw is not None \
                else NO_VALUE
            params[p.name] = value if value is not NO_VALUE else \
                (None if p.default is REQUIRED else p.default)
        model_params = []
        for mp in task.model_params:
            own = {k: v for k, v in mp.items() if v is not None and method.spec.param(k) is not None}
            for p in method.spec.params:
                if p.per_model and p.name not in own:
                    own[p.name] = None if p.default is REQUIRED else p.default
            model_params.append(own)
        sub = replace(task, out_dtype=task.compute_dtype, params=params,
                      model_params=model_params, report=None)
        return method, sub

    # -- side files
    def side_files(self, plan, reports: dict[str, dict]) -> dict[str, str]:
        return {f"{BUNDLE_DIR}/{INFO_FILE}": twin_json(plan, reports)}

    def card_extra(self, plan, reports: dict[str, dict]) -> dict[str, Any]:
        return card_extra(plan, reports)

