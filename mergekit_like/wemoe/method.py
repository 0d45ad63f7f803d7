"""WEMoE: weight-ensembling mixture-of-experts upscaling (Tang et al., ICML 2024; docs/methods/wemoe.md).

Every tensor outside the transformer-block MLPs is merged by task arithmetic,
θ0 + λ·Σ_t w_t·τ_t with τ_t = θ_t − θ0. Every block MLP becomes a module holding the pre-trained
MLP θ0, the per-task MLP task vectors τ_t (stacked [T, out, in]; optionally the top
``expert_density`` of |τ_t| or rank-r SVD factors) and a router::

    r_tok = fc2(ReLU(fc1(h)))       r = mean over real tokens          [B, T]
    W_p(b) = W0_p + Σ_t r[b, t]·τ_t,p

initialised with fc2.weight = 0, fc2.bias = λ·w_t, so the untrained model IS the task-arithmetic
merge with the same λ. This file writes the tensors; the module lives in ``wemoe_hf/``.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any

import torch

from mergekit_like.methods.base import (Method, MethodSpec, OutputSpec, ParamSpec, TensorTask, output_key)
from mergekit_like.methods.task_arithmetic import TaskArithmetic
from mergekit_like.recipe.params import leaves
from mergekit_like.ops.svd import factorize, rank_for, svd_seed
from mergekit_like.ops.trim import trim_count
from mergekit_like.twin.recipe import check_task_names
from mergekit_like.wemoe.files import (MLP_TENSOR, card_extra, check_layout, expert_storage, side_files)

ROUTER_GROUP = "router"
ROUTER_INIT_STD = 0.01
INDEX_DTYPE_LIMIT = 2 ** 31


# ---- the equations ----------------------------------------------------------------------------

def top_k_sparse(tau: torch.Tensor, density: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The k = trim_count(density, numel) entries of largest |τ| (no rescaling): (values [k],
    flat row-major indices [k] ascending, int64)."""
    flat = tau.reshape(-1)
    k = trim_count(density, flat.numel())
    idx = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
    return flat[idx], idx


def init_router(seed: int, layer: int, hidden: int, d: int, lam: float,
                weights: list[float]) -> dict[str, torch.Tensor]:
    """fc1.weight ~ N(0, 0.01²) from a CPU generator seeded by (seed, layer), fc1.bias = 0,
    fc2.weight = 0 [T, h_r], fc2.bias = λ·w_t [T]; all float32."""
    digest = hashlib.sha256(f"wemoe-router\0{seed}\0{layer}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return {
        "fc1.weight": torch.randn((hidden, d), generator=gen) * ROUTER_INIT_STD,
        "fc1.bias": torch.zeros(hidden),
        "fc2.weight": torch.zeros((len(weights), hidden)),
        "fc2.bias": torch.tensor([lam * w for w in weights], dtype=torch.float32),
    }


# ---- engine adapter -----------------------------------------------------------------------------

class WEMoE(Method):
    takes_slices = False
    spec = MethodSpec(
        name="wemoe",
        params=(
            ParamSpec("weight", "float", 1.0, per_model=True),
            ParamSpec("lambda", "float", 0.3),
            ParamSpec("router_hidden", "int", None),
            ParamSpec("expert_density", "density", None),
            ParamSpec("expert_rank", "rank", None),
        ),
        needs_base=True,
        min_inputs=2,
    )
    entry_keys = ("name",)
    indexed_groups = (ROUTER_GROUP,)
    card_title = "WEMoE upscaled model"

    def check_recipe(self, recipe) -> None:

        check_task_names(recipe)
        density, rank = (recipe.top_params.get(k) for k in ("expert_density", "expert_rank"))
        if density is not None and rank is not None \
                and any(v is not None for _, v in leaves(density)) \
                and any(v is not None for _, v in leaves(rank)):
            raise recipe.locator.error(("parameters", "expert_rank"), "expert_density and "
                                       "expert_rank are mutually exclusive (choose one storage)")

    def check_plan(self, plan) -> None:
        check_layout(plan)

    def plan_outputs(self, name, shape, dtype, *, params=None, inputs=None, warn=None):
        m = MLP_TENSOR.match(name)
        if m is None:
            return [OutputSpec(name, shape, dtype)]
        prefix, linear, kind = m["prefix"], m["linear"], m["kind"]
        n_tasks = len(inputs or [])
        experts = f"{prefix}.experts.{linear}"
        outputs = [OutputSpec(f"{prefix}.base.{linear}.{kind}", shape, dtype)]
        if kind == "bias":
            outputs.append(OutputSpec(f"{experts}.bias", (n_tasks, *shape), dtype))
        else:
            out_f, in_f = shape
            storage = expert_storage(params)
            if storage == "dense":
                outputs.append(OutputSpec(f"{experts}.weight", (n_tasks, out_f, in_f), dtype))
            elif storage == "sparse":
                k = trim_count(params["expert_density"], out_f * in_f)
                idx_dtype = torch.int64 if out_f * in_f >= INDEX_DTYPE_LIMIT else torch.int32
                outputs += [OutputSpec(f"{experts}.weight_values", (n_tasks, k), dtype),
                            OutputSpec(f"{experts}.weight_indices", (n_tasks, k), idx_dtype)]
            else:
                r = rank_for(params["expert_rank"], out_f, in_f)
                outputs += [OutputSpec(f"{experts}.weight_A", (n_tasks, out_f, r), dtype),
                            OutputSpec(f"{experts}.weight_B", (n_tasks, r, in_f), dtype)]
            if linear == "down_proj":       # one router per layer, planned with its down_proj
                d = out_f
                h = params.get("router_hidden") or d
                for key, rshape in (("fc1.weight", (h, d)), ("fc1.bias", (h,)),
                                    ("fc2.weight", (n_tasks, h)), ("fc2.bias", (n_tasks,))):
                    outputs.append(OutputSpec(f"{prefix}.router.{key}", rshape, torch.float32,
                                              ROUTER_GROUP))
        return outputs

    def merge(self, task: TensorTask) -> dict[str, torch.Tensor]:
        m = MLP_TENSOR.match(task.name)
        if m is None:                        # the static part: exactly the TA operator
            return {task.name: TaskArithmetic().merge_tensor(self._ta_task(task))}
        prefix, linear, kind = m["prefix"], m["linear"], m["kind"]
        experts = f"{prefix}.experts.{linear}"
        base = task.base.to(task.compute_dtype)
        taus = [x.to(task.compute_dtype) - base for x in task.inputs]
        out = {f"{prefix}.base.{linear}.{kind}": task.base.to(task.out_dtype)}
        storage = expert_storage(task.params)
        if kind == "bias" or storage == "dense":
            out[f"{experts}.{kind}"] = torch.stack(taus).to(task.out_dtype)
        elif storage == "sparse":
            pairs = [top_k_sparse(t, task.params["expert_density"]) for t in taus]
            idx_dtype = torch.int64 if base.numel() >= INDEX_DTYPE_LIMIT else torch.int32
            out[f"{experts}.weight_values"] = torch.stack([v for v, _ in pairs]).to(task.out_dtype)
            out[f"{experts}.weight_indices"] = torch.stack([i for _, i in pairs]).to(idx_dtype)
        else:
            r = rank_for(task.params["expert_rank"], *base.shape)
            factors = [factorize(t, r, "auto", svd_seed(task.seed, task.name, e["name"]))
                       for t, e in zip(taus, task.input_extra)]
            out[f"{experts}.weight_A"] = torch.stack([f[0] for f in factors]).to(task.out_dtype)
            out[f"{experts}.weight_B"] = torch.stack([f[1] for f in factors]).to(task.out_dtype)
        if linear == "down_proj" and kind == "weight":
            d = base.shape[0]
            router = init_router(task.seed, int(m["layer"]), task.params.get("router_hidden") or d,
                                 d, float(task.params["lambda"]),
                                 [float(mp["weight"]) for mp in task.model_params])
            out.update({f"{prefix}.router.{k}": v.to(task.device) for k, v in router.items()})
        return self._keyed(out)

    @staticmethod
    def _keyed(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Router tensors live in their own group (engine keys ``router:<name>``)."""
        return {output_key(k, ROUTER_GROUP) if ".router." in k else k: v for k, v in out.items()}

    def _ta_task(self, task: TensorTask) -> TensorTask:
        params = {"lambda": float(task.params["lambda"]), "normalize": False, "rescale": False,
                  "int8_mask": False}
        model_params = [{"weight": mp["weight"], "density": 1.0} for mp in task.model_params]
        return replace(task, params=params, model_params=model_params)

    def side_files(self, plan, reports: dict[str, dict]) -> dict[str, str]:
        return side_files(plan)

    def card_extra(self, plan, reports: dict[str, dict]) -> dict[str, Any]:
        return card_extra(plan)


