"""``rcp_approx``: an RCP-style data-free approximation — NOT RCP-Merging (docs/methods/rcp.md §8).

Same roles and base as ``rcp``, no data and no gradients. Per tensor, with mean(·) over the
tensor and 0/0 := 0::

    I_t = |δ_t| / mean|δ_t|            δ_t = θ_t − θ_pre
    I_r = |θ_r − θ_pre| / mean|θ_r − θ_pre|
    D̃   = L / mean(L)                  L = (θ_r − θ_t)²
    m   = [I_t ≥ λ'·I_r·D̃]             then, if density < 1, only the top ⌊density·numel⌋ of
                                       I_t among m = 1 (every copy of the k-th value kept)
    out = θ_r + s · m ⊙ δ_t

It protects coordinates where the reasoning model moved far from the base and the two models
disagree. A heuristic with no published result behind it; the card says so.
"""

from __future__ import annotations

import math

import torch

from mergekit_like.methods.base import REQUIRED, MethodSpec, ParamSpec, TensorTask
from mergekit_like.rcp.method import RoleMethod
from mergekit_like.rcp import roles as R


def normalized(x: torch.Tensor, mean: float) -> torch.Tensor:
    """x / mean, with 0/0 := 0 (x ≥ 0, so mean = 0 means x = 0)."""
    return x / mean if mean > 0 else torch.zeros_like(x)


def approx_mask(theta_r: torch.Tensor, theta_t: torch.Tensor, theta_pre: torch.Tensor,
                means: tuple[float, float, float], lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(m = [I_t ≥ λ'·I_r·D̃], I_t) for one block, given the tensor's means (|δ_t|, |θ_r − θ_pre|,
    L)."""
    i_t = normalized((theta_t - theta_pre).abs_(), means[0])
    i_r = normalized((theta_r - theta_pre).abs_(), means[1])
    d = normalized((theta_r - theta_t).square_(), means[2])
    return i_t >= i_r.mul_(d).mul_(lam), i_t


def top_threshold(values: torch.Tensor, k: int) -> float:
    """The k-th largest of ``values`` (1-d float32, k ≥ 1): keeping ≥ it keeps the top k and
    every tie of the k-th."""
    return float(torch.kthvalue(values, values.numel() - k + 1).values)


class RCPApprox(RoleMethod):
    spec = MethodSpec(
        name="rcp_approx",
        params=(
            ParamSpec("role", "choice", REQUIRED, per_model=True, choices=R.ROLES),
            ParamSpec("approx_lambda", "float", 1.0),
            ParamSpec("density", "density", 1.0),
            ParamSpec("domain_scale", "float", 1.0),
        ),
        needs_base=True,
        min_inputs=2,
    )
    card_title = "RCP-style data-free approximation (not RCP-Merging)"

    def merge_tensor(self, task: TensorTask) -> torch.Tensor:
        theta_r, theta_t = self.roles(task)
        lam = float(task.params.get("approx_lambda", 1.0))
        density = float(task.params.get("density", 1.0))
        sums = [0.0, 0.0, 0.0]
        for block in task.blocks():                      # pass 1: the three means
            r, t, pre = (task.load(x, block) for x in (theta_r, theta_t, task.base))
            for i, v in enumerate(((t - pre).abs_(), (r - pre).abs_(), (r - t).square_())):
                sums[i] += float(v.double().sum())
        n = max(task.numel, 1)
        means = (sums[0] / n, sums[1] / n, sums[2] / n)
        cutoff = None
        if density < 1.0:                                # pass 2: the top-k cutoff of I_t
            k = math.floor(density * task.numel)
            chosen = []
            for block in task.blocks():
                r, t, pre = (task.load(x, block) for x in (theta_r, theta_t, task.base))
                m, i_t = approx_mask(r, t, pre, means, lam)
                chosen.append(i_t[m].reshape(-1).float())
            pool = torch.cat(chosen) if chosen else torch.zeros(0)
            cutoff = math.inf if k == 0 else (top_threshold(pool, k) if k < pool.numel() else None)

        def mask(block, r, t, pre):
            m, i_t = approx_mask(r, t, pre, means, lam)
            return m if cutoff is None else m & (i_t >= cutoff)

        return self.merge_blocks(task, mask)

    def card_settings(self, plan):
        return {"note": "a data-free heuristic in the spirit of RCP-Merging; no published "
                        "result stands behind it"}

    def side_files(self, plan, reports):
        params = plan.recipe.resolved()["parameters"]
        header = {"method": "rcp_approx (RCP-style data-free approximation, not RCP-Merging)",
                  "approx_lambda": params.get("approx_lambda", 1.0),
                  "density": params.get("density", 1.0),
                  "domain_scale": params.get("domain_scale", 1.0)}
        return self.write_report(plan, reports, header)

