"""WEMoE's plan checks (supported layouts, docs/methods/wemoe.md §2) and its side files (§4): the config with
its own architecture name and ``auto_map``, and the modeling code copied into the output."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from mergekit_like.errors import MergeError
from mergekit_like.io.side_files import main_dtype_name, updated_config

MLP_TENSOR = re.compile(r"^(?P<prefix>.*\.layers\.(?P<layer>\d+)\.mlp)\.(?P<linear>[A-Za-z0-9_]+)"
                        r"\.(?P<kind>weight|bias)$")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")


def expert_storage(params: dict[str, Any]) -> str:
    if params.get("expert_density") is not None:
        return "sparse"
    return "lowrank" if params.get("expert_rank") is not None else "dense"


HF_DIR = Path(__file__).resolve().parent / "hf"
CODE_FILES = ("configuration_wemoe.py", "modeling_wemoe.py")
FORMAT_VERSION = 1
MATERIALIZE_BUDGET_MB = 1024


def check_layout(plan) -> None:
    """v1 upscales decoder layers whose ``mlp`` is gate/up/down ``Linear`` layers (Llama,
    Mistral, Qwen2/3, Gemma); any other model type or MLP tensor is refused by name."""
    config = plan.reference.config() or {}
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        raise MergeError(f"wemoe: model type {model_type!r} is not supported (v1 upscales the "
                         f"Linear gate/up/down MLPs of {', '.join(SUPPORTED_TYPES)})")
    layers: dict[str, set[str]] = {}
    for job in plan.jobs:
        if ".mlp." not in job.name:
            continue
        m = MLP_TENSOR.match(job.name)
        if m is None or m["linear"] not in MLP_LINEARS or len(job.info.shape) != \
                (2 if m["kind"] == "weight" else 1):
            raise MergeError(f"wemoe: MLP tensor '{job.name}' is not a gate/up/down Linear "
                             f"weight or bias ({model_type}); this MLP layout is not supported")
        layers.setdefault(m["prefix"], set()).add(m["linear"])
    missing = [p for p, linears in layers.items() if "down_proj" not in linears]
    if not layers or missing:
        raise MergeError(f"wemoe: {'no MLP tensors found' if not layers else missing[0]} "
                         "(every decoder layer needs mlp.down_proj)")


def _down_proj_job(plan):
    return next(j for j in plan.jobs if j.name.endswith("mlp.down_proj.weight"))


def _resolved(plan) -> dict[str, Any]:
    """λ, router width and expert settings as resolved for the first down_proj."""
    job = _down_proj_job(plan)
    params = dict(job.params)
    params["router_hidden"] = params.get("router_hidden") or job.info.shape[0]
    return params


def wemoe_config(plan) -> dict[str, Any]:
    base = plan.reference.config() or {}
    dtype = plan.recipe.out_dtype or None
    config = json.loads(updated_config(base, dtype or main_dtype_name(
        [o for o in plan.outputs if not o.group])))
    params = _resolved(plan)
    code = (HF_DIR / "modeling_wemoe.py").read_bytes()
    config.update({
        "base_model_type": base.get("model_type"),
        "base_architectures": base.get("architectures"),
        "model_type": "wemoe",
        "architectures": ["WEMoEForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_wemoe.WEMoEConfig",
                     "AutoModelForCausalLM": "modeling_wemoe.WEMoEForCausalLM"},
        "wemoe": {
            "format_version": FORMAT_VERSION,
            "tasks": [inp.extra["name"] for inp in plan.inputs if not inp.is_base],
            "lambda": float(params["lambda"]),
            "router_hidden": int(params["router_hidden"]),
            "expert_storage": expert_storage(params),
            "expert_density": params.get("expert_density"),
            "expert_rank": params.get("expert_rank"),
            "routing": "sample",
            "forward": "auto",
            "materialize_budget_mb": MATERIALIZE_BUDGET_MB,
            "modeling_sha256": hashlib.sha256(code).hexdigest(),
            "seed": plan.recipe.seed,                       # router init (train-router --reinit)
            "weights": [float(mp["weight"]) for mp in _down_proj_job(plan).model_params],
        },
    })
    return config


def side_files(plan) -> dict[str, str]:
    files = {"config.json": json.dumps(wemoe_config(plan), indent=2) + "\n"}
    for name in CODE_FILES:
        files[name] = (HF_DIR / name).read_text(encoding="utf-8")
    return files


def card_extra(plan) -> dict[str, Any]:
    info = wemoe_config(plan)["wemoe"]
    return {
        "tasks": info["tasks"],
        "lambda": info["lambda"],
        "experts": info["expert_storage"],
        "router hidden width": info["router_hidden"],
        "state": ("routers untrained: the model computes exactly the task_arithmetic merge "
                  f"with λ={info['lambda']}, at about {1 + len(info['tasks'])}× the MLP "
                  "storage; next: mergekit-like train-router THIS_FOLDER --data unlabeled.jsonl"),
        "load": "AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True), or "
                "mergekit_like.wemoe.runtime.load_wemoe(folder)",
    }
