"""RCP-Merging, "Reasoning Capability as Prior" (Yang et al., AAAI 2026; docs/methods/rcp.md), as
reconstructed from the official code.

The reasoning model θ_r is the anchor; the domain task vector δ_t = θ_t − θ_pre is added only
where the domain model's calibration votes v (``importance rcp-votes``, one votes folder per λ)
say its gain outweighs the Fisher-weighted penalty for leaving the reasoning solution::

    m   = [v > vote_threshold]                      a tie v = 0 is not merged
    out = θ_r + s · m ⊙ (θ_t − θ_pre)               s = domain_scale; float32, cast once

Unselected weights are exactly θ_r. The votes come from a folder keyed like the domain model
(``models[domain].parameters.importance``), read per tensor as a side input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mergekit_like.errors import MergeError
from mergekit_like.methods.base import Method, MethodSpec, ParamSpec, REQUIRED, TensorTask
from mergekit_like.rcp import roles as R
from mergekit_like.rcp.folder import read_info

VOTE_KINDS = ("rcp_votes",)


def selection(votes: torch.Tensor, threshold: float) -> torch.Tensor:
    """m = [v > threshold] (bool)."""
    return votes > threshold


def rcp_merge(theta_r: torch.Tensor, theta_t: torch.Tensor, theta_pre: torch.Tensor,
              m: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """θ_r + s·m⊙(θ_t − θ_pre); where m is false the result is θ_r bit for bit."""
    delta = torch.sub(theta_t, theta_pre)
    if scale != 1.0:
        delta.mul_(scale)
    return torch.where(m, theta_r + delta, theta_r)


class RoleMethod(Method):
    """The part of rcp and rcp_approx that is not their mask: roles, reference, reports."""
    takes_slices = False

    card_title: str

    def check_recipe(self, recipe) -> None:
        R.check_roles(recipe)

    def reference_input(self, recipe) -> int | None:
        return R.role_position(recipe, "reasoning")

    def roles(self, task: TensorTask) -> tuple[torch.Tensor, torch.Tensor]:
        """(θ_r, θ_t) of this tensor, in their stored dtype."""
        by_role = {mp["role"]: x for mp, x in zip(task.model_params, task.inputs)}
        if task.base is None or by_role.get("reasoning") is None or by_role.get("domain") is None:
            raise MergeError(f"{self.spec.name}: tensor '{task.name}' needs the base, the "
                             "reasoning and the domain model")
        return by_role["reasoning"], by_role["domain"]

    def merge_blocks(self, task: TensorTask, mask_of) -> torch.Tensor:
        """out = θ_r + s·m⊙δ_t block by block, ``mask_of(block, r, t, pre) -> bool`` giving m;
        sets the tensor's report (selected count, |δ| statistics)."""
        theta_r, theta_t = self.roles(task)
        scale = float(task.params.get("domain_scale", 1.0))
        out = task.empty_output()
        selected = 0
        sum_t = sum_r = sq_t = sq_pre = 0.0
        where = R.sample_positions(task.numel)
        sample_t, sample_r = [], []
        for block in task.blocks():
            r, t, pre = (task.load(x, block) for x in (theta_r, theta_t, task.base))
            m = mask_of(block, r, t, pre)
            selected += int(m.sum())
            d_t, d_r = (t - pre).abs_().view(-1), (r - pre).abs_().view(-1)
            sum_t += float(d_t.double().sum())
            sum_r += float(d_r.double().sum())
            sq_t += float(d_t.double().square().sum())
            sq_pre += float(pre.double().square().sum())
            lo = block.flat_offset
            inside = where[(where >= lo) & (where < lo + block.numel)] - lo
            sample_t.append(d_t[inside].cpu())
            sample_r.append(d_r[inside].cpu())
            task.store(out, block, rcp_merge(r, t, pre, m, scale))
        n = max(task.numel, 1)
        task.report = {"numel": task.numel, "selected": selected,
                       "selected_fraction": selected / n,
                       "abs_delta_domain": R.delta_stats(torch.cat(sample_t), sum_t / n),
                       "abs_reasoning_minus_base": R.delta_stats(torch.cat(sample_r), sum_r / n),
                       **({"sq_delta_domain": sq_t, "sq_base": sq_pre}
                          if len(task.shape) >= 2 else {})}  # norms (≈ 1 everywhere) would dilute
        return out

    def write_report(self, plan, reports: dict[str, dict], header: dict[str, Any]) -> dict[str, str]:
        data = R.report(plan, reports, header, warn=True)
        mods = ", ".join(f"{k} {v:.1%}" for k, v in data["selected_by_module"].items())
        plan.notes.append(f"{self.spec.name}: domain delta added to {data['selected_fraction']:.2%} "
                          f"of the weights ({mods}); per tensor and layer in {R.REPORT_FILE}")
        return {R.REPORT_FILE: R.report_text(data)}

    def card_extra(self, plan, reports):
        if not reports:
            return None
        return {**self.card_settings(plan), **R.card_summary(R.report(plan, reports, {}))}

    def card_settings(self, plan) -> dict[str, Any]:
        return {}


class RCP(RoleMethod):
    spec = MethodSpec(
        name="rcp",
        params=(
            ParamSpec("role", "choice", REQUIRED, per_model=True, choices=R.ROLES),
            ParamSpec("importance", "structured", None, per_model=True),
            ParamSpec("penalty_lambda", "penalty", 1000.0),
            ParamSpec("vote_threshold", "float", 0.0),
            ParamSpec("domain_scale", "float", 1.0),
            ParamSpec("zero_grad", "choice", "merge", choices=("merge", "keep")),
        ),
        needs_base=True,
        min_inputs=2,
    )
    card_title = "RCP-Merging (reconstructed from the official code; docs/methods/rcp.md)"

    def check_recipe(self, recipe) -> None:

        found = R.check_roles(recipe)
        loc = recipe.locator
        if "importance" in recipe.top_params:
            raise loc.error(("parameters", "importance"), "'importance' belongs on the domain "
                            "model's entry")
        reasoning, domain = found["reasoning"], found["domain"]
        if "importance" in reasoning.entry_params:
            raise loc.error(("models", reasoning.index, "parameters", "importance"),
                            "'importance' belongs on the domain model, not the reasoning one")
        path = ("models", domain.index, "parameters", "importance")
        folder = R.structured_value(domain.entry_params.get("importance"))
        if folder is None:
            raise loc.error(("models", domain.index, "parameters"), "the domain model needs "
                            "'importance: FOLDER' (a votes folder from `mergekit-like importance "
                            "rcp-votes`)")
        if not isinstance(folder, str):
            raise loc.error(path, "'importance' must be a folder path")
        try:
            info = read_info(Path(folder))
        except MergeError as exc:
            raise loc.error(path, str(exc)) from None
        if info["kind"] not in VOTE_KINDS:
            raise loc.error(path, f"{folder} is a {info['kind']} folder; rcp needs a votes "
                            "folder (importance rcp-votes)")
        lam = _top_value(recipe, "penalty_lambda", 1000.0)
        if float(info["penalty_lambda"]) != lam:
            raise loc.error(("parameters", "penalty_lambda") if "penalty_lambda" in
                            recipe.top_params else path,
                            f"penalty_lambda {lam:g} differs from the λ {float(info['penalty_lambda']):g} "
                            f"the votes in {folder} were counted with")
        zero_grad = _top_value(recipe, "zero_grad", "merge")
        if info.get("zero_grad") != zero_grad:
            raise loc.error(("parameters", "zero_grad") if "zero_grad" in recipe.top_params
                            else path, f"zero_grad {zero_grad} differs from the policy "
                            f"{info.get('zero_grad')} the votes in {folder} were counted with")
        ratio = info.get("penalty_ratio")
        if isinstance(ratio, (int, float)) and ratio < 1e-3:
            recipe.warnings.append(f"rcp: penalty negligible at λ={lam:g} (median λ·p / median "
                                   f"|S| = {ratio:.1e} in {folder}); sweep penalty_lambda over "
                                   "decades (1e3…1e12)")

    def side_inputs(self, plan) -> dict[str, Any]:
        return {_folder(plan): Path(_folder(plan))}

    def check_plan(self, plan) -> None:
        votes = plan.side[_folder(plan)]
        header = votes.tensors()
        for job in plan.jobs:
            if not job.merge:
                continue
            info = header.get(job.name)
            if info is None:
                raise MergeError(f"{votes.ref}: no votes for tensor '{job.name}' of the domain "
                                 "model (an importance folder of another model?)")
            if tuple(info.shape) != tuple(job.info.shape):
                raise MergeError(f"{votes.ref}: votes for '{job.name}' have shape "
                                 f"{list(info.shape)}, the models have {list(job.info.shape)}")

    def merge_tensor(self, task: TensorTask) -> torch.Tensor:
        votes = next(iter(task.side.values()))
        threshold = float(task.params.get("vote_threshold", 0.0))

        def mask(block, r, t, pre):
            part = votes if len(task.shape) == 0 else votes[block.rows]
            return selection(part, threshold).reshape(r.shape)

        return self.merge_blocks(task, mask)

    def card_settings(self, plan) -> dict[str, Any]:

        info = read_info(Path(_folder(plan)))
        return {"votes": _folder(plan), "texts (K_t)": info.get("n_examples"),
                "fisher kind": info.get("fisher_kind"),
                "zero-evidence weights (merged under zero_grad merge)":
                    f"{info.get('zero_evidence_fraction', 0):.2%}"}

    def side_files(self, plan, reports):

        info = read_info(Path(_folder(plan)))
        params = plan.recipe.resolved()["parameters"]
        header = {"method": "rcp (RCP-Merging, reconstructed from the official code)",
                  "penalty_lambda": params.get("penalty_lambda", 1000.0),
                  "vote_threshold": params.get("vote_threshold", 0.0),
                  "domain_scale": params.get("domain_scale", 1.0),
                  "zero_grad": params.get("zero_grad", "merge"),
                  "n_examples": int(info.get("n_examples", 0)), "importance_folder": _folder(plan),
                  "importance": {k: v for k, v in info.items() if k != "tensors"}}
        return self.write_report(plan, reports, header)


def _folder(plan) -> str:
    pos = R.role_position(plan.recipe, "domain")
    return str(R.structured_value(plan.inputs[pos].entry_params["importance"]))


def _top_value(recipe, name: str, default: Any) -> Any:
    setting = recipe.top_params.get(name)
    return R.structured_value(setting) if setting is not None else default

