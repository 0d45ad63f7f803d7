"""What ``rcp`` and ``rcp_approx`` share outside the equations: the roles of the two models
(docs/methods/rcp.md §2), the per-tensor statistics they report and ``rcp_report.json`` (§7)."""

from __future__ import annotations

import json
from typing import Any

import torch

from mergekit_like.recipe.params import Scalar, Structured, layer_index

ROLES = ("reasoning", "domain")
REPORT_FILE = "rcp_report.json"
QUANTILES = 101
"""Per-tensor percentiles of |δ| kept for the model-level p99 (a pooled, numel-weighted sketch)."""
SAMPLE = 1 << 16
RELATIVE_DELTA_WARN = 0.5
"""‖θ_domain − base‖ / ‖base‖ (pooled over tensors) above this: the base is probably not the
domain model's own. Fine-tunes move weights by a small fraction of their size (real LLM
fine-tunes: ~0.01–0.05; the zoo's: see docs/methods/rcp.md §6), while two unrelated models of
the same scale are √2 ≈ 1.41 apart."""
_KINDS = (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("o_proj", "o"),
          ("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down"),
          ("norm", "norm"), ("embed", "embeddings"), ("lm_head", "lm_head"))


def check_roles(recipe) -> dict[str, Any]:
    """Exactly one ``role: reasoning`` and one ``role: domain`` (plain strings on the model
    entries), a base, every tensor in every model; returns {role: InputModel}."""
    loc = recipe.locator
    if "role" in recipe.top_params:
        raise loc.error(("parameters", "role"), "'role' belongs on a model entry "
                        "(models[i].parameters.role: reasoning | domain)")
    found: dict[str, Any] = {}
    for inp in recipe.non_base_inputs:
        setting = inp.entry_params.get("role")
        path = ("models", inp.index, "parameters", "role")
        if setting is None:
            raise loc.error(("models", inp.index), f"{recipe.merge_method} needs 'role: "
                            "reasoning' or 'role: domain' on every model")
        if not isinstance(setting, Scalar):
            raise loc.error(path, "'role' must be a plain value, not per-tensor")
        role = setting.value
        if role in found:
            raise loc.error(path, f"two models have role '{role}' (also "
                            f"models[{found[role].index}]); exactly one each")
        found[role] = inp
    for role in ROLES:
        if role not in found:
            raise loc.error(("models",), f"{recipe.merge_method} needs one model with role "
                            f"'{role}'")
    if recipe.on_missing_tensor != "error":
        raise loc.error(("on_missing_tensor",), f"{recipe.merge_method} needs every tensor in "
                        "every model (on_missing_tensor: error)")
    return found


def role_position(recipe, role: str) -> int:
    """Position in ``recipe.inputs`` of the model with ``role``."""
    for pos, inp in enumerate(recipe.inputs):
        setting = inp.entry_params.get("role")
        if not inp.is_base and isinstance(setting, Scalar) and setting.value == role:
            return pos
    raise KeyError(role)


def structured_value(setting) -> Any:
    return setting.value if isinstance(setting, (Scalar, Structured)) else None


def module_kind(name: str) -> str:
    for key, kind in _KINDS:
        if key in name:
            return kind
    return "other"


def delta_stats(delta_abs_sample: torch.Tensor, mean_abs: float) -> dict[str, Any]:
    """Mean |δ| of the whole tensor and the percentiles 0…100 of a sample of |δ|."""
    q = torch.linspace(0, 1, QUANTILES, dtype=torch.float64)
    pct = torch.quantile(delta_abs_sample.double(), q) if delta_abs_sample.numel() else q * 0
    return {"mean": mean_abs, "percentiles": [float(x) for x in pct]}


def sample_positions(numel: int) -> torch.Tensor:
    return torch.linspace(0, max(numel - 1, 0), min(numel, SAMPLE)).round().long()


def pooled(reports: dict[str, dict], key: str) -> dict[str, float | None]:
    """Model-level mean and p99 of |δ| from the per-tensor stats (numel-weighted)."""
    items = [(r["numel"], r[key]) for r in reports.values() if key in r]
    total = sum(n for n, _ in items)
    if not total:
        return {"mean": None, "p99": None}
    mean = sum(n * s["mean"] for n, s in items) / total
    values = torch.tensor([v for _, s in items for v in s["percentiles"]], dtype=torch.float64)
    weights = torch.tensor([n / QUANTILES for n, s in items for _ in s["percentiles"]],
                           dtype=torch.float64)
    order = values.argsort()
    cum = weights[order].cumsum(0) / weights.sum()
    at = int(torch.searchsorted(cum, torch.tensor(0.99, dtype=torch.float64)))
    p99 = float(values[order][min(at, len(values) - 1)])
    return {"mean": mean, "p99": p99}


def relative_delta(reports: dict[str, dict]) -> float | None:
    """‖θ_domain − base‖₂ / ‖base‖₂ over the matrices (sums of squares pooled; 1-D norms and
    biases, near-constant in every model, are left out); None when no tensor reported them."""
    sq_t = sum(r.get("sq_delta_domain", 0.0) for r in reports.values())
    sq_b = sum(r.get("sq_base", 0.0) for r in reports.values())
    return (sq_t / sq_b) ** 0.5 if sq_b > 0 else None


def grouped_fractions(reports: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Selected fraction by module kind and by layer (numel-weighted), and overall."""
    kinds: dict[str, list[float]] = {}
    layers: dict[str, list[float]] = {}
    for name, r in reports.items():
        for table, key in ((kinds, module_kind(name)),
                           (layers, str(layer_index(name)[1]) if layer_index(name) else "none")):
            acc = table.setdefault(key, [0.0, 0.0])
            acc[0] += r["selected"]
            acc[1] += r["numel"]
    total = sum(r["numel"] for r in reports.values())
    return {"by_module": {k: v[0] / v[1] for k, v in kinds.items() if v[1]},
            "by_layer": {k: v[0] / v[1] for k, v in sorted(layers.items(),
                                                           key=lambda kv: _layer_key(kv[0]))},
            "overall": sum(r["selected"] for r in reports.values()) / max(total, 1)}


def _layer_key(k: str) -> tuple[int, int]:
    return (1, 0) if k == "none" else (0, int(k))


def report(plan, reports: dict[str, dict], header: dict[str, Any],
           warn: bool = False) -> dict[str, Any]:
    """The content of rcp_report.json; ``warn``: append the base-mismatch warning (docs/methods/rcp.md
    §5.3) to the plan's warnings."""
    groups = grouped_fractions(reports)
    delta_t = pooled(reports, "abs_delta_domain")
    delta_r = pooled(reports, "abs_reasoning_minus_base")
    rel = relative_delta(reports)
    if warn and rel is not None and rel > RELATIVE_DELTA_WARN:
        plan.warnings.append(f"{plan.recipe.merge_method}: ‖θ_domain − base‖ / ‖base‖ = "
                             f"{rel:.3g} > {RELATIVE_DELTA_WARN}: farther than a fine-tune moves "
                             "a model; is base_model the domain model's own base?")
    return {**header, "selected_fraction": groups["overall"],
            "relative_delta_domain": rel,
            "selected_by_module": groups["by_module"], "selected_by_layer": groups["by_layer"],
            "abs_delta_domain": delta_t, "abs_reasoning_minus_base": delta_r,
            "tensors": {n: {k: v for k, v in r.items() if not k.startswith(("abs_", "sq_"))}
                        | {"abs_delta_domain_mean": r["abs_delta_domain"]["mean"],
                           "abs_delta_domain_p99": r["abs_delta_domain"]["percentiles"][99]}
                        for n, r in reports.items()}}


def report_text(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, default=str) + "\n"


def card_summary(data: dict[str, Any]) -> dict[str, Any]:
    mods = ", ".join(f"{k} {v:.1%}" for k, v in data["selected_by_module"].items())
    return {"selected fraction (overall)": f"{data['selected_fraction']:.2%}",
            "selected by module": mods, "report": REPORT_FILE}

