"""The importance stage of RCP-Merging (docs/methods/rcp.md §3): gradient passes over calibration texts.

* ``fisher_pass``: the reasoning model's Fisher prior F on reasoning texts;
* ``votes_pass``: the domain model's constraint votes v on domain texts, one folder per λ.

One text per forward/backward (``runtime.accumulate_gradients`` with batch size 1). Every
parameter's gradient is consumed in its post-accumulate-grad hook the moment it is complete
and then freed, so memory is the model, one text's activations, one parameter's gradient and
the host accumulators: 4 B/param for F; for votes 4 B/param of cached penalty p, 1 B/param of
"touched" flags, 1–2 B/param per λ and |S| at ≤ 8192 positions per tensor from the first 16
texts (for the medians). No per-text copy of any gradient is ever kept.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from mergekit_like.errors import MergeError
from mergekit_like.io.fs import check_output_apart
from mergekit_like.io.local import LocalSource
from mergekit_like.ops import rcp_votes as V
from mergekit_like.rcp.folder import (file_sha256, read_info, refuse_existing, votes_folder,
                                      write_importance)
from mergekit_like.runtime.calibration import (PassSettings, checkpoint_parameters,  # noqa: F401
                                               gradient_pass, load_for_pass, model_id,
                                               parse_dtype)

SAMPLE = 8192
"""Positions per tensor (evenly spaced, deterministic) sampled for the medians of §7..."""
SAMPLE_TEXTS = 16
"""... in the first SAMPLE_TEXTS texts only, so that memory does not grow with the texts."""
PENALTY_WARN = 1e-3
Log = Callable[[str], None]
Progress = Callable[[int, int], None]


def fisher_pass(model: Path, data: Path, out: Path, *, kind: str = "grad_x_weight_sq",
                settings: PassSettings, out_dtype: torch.dtype = torch.float32,
                progress: Progress | None = None) -> Path:
    """F of ``model`` on the texts of ``data`` (docs/methods/rcp.md §1) into the importance folder ``out``."""
    if kind not in V.FISHER_KINDS:
        raise MergeError(f"--kind {kind!r}: use one of {', '.join(V.FISHER_KINDS)}")
    check_output_apart(Path(out), [("--model", Path(model)), ("--data", Path(data))])
    refuse_existing(Path(out), settings.overwrite)
    loaded, examples = load_for_pass(model, settings, data)
    params = checkpoint_parameters(loaded, model)
    acc = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in params.items()}

    def on_grad(name: str, param: torch.Tensor, grad: torch.Tensor) -> None:
        acc[name].add_(V.fisher_term(grad, param.detach(), kind).cpu())

    k = gradient_pass(loaded, examples, params, on_grad, progress)
    tensors = {n: a.div_(k).to(out_dtype) for n, a in acc.items()}
    meta = {"kind": "rcp_fisher", "fisher_kind": kind, "n_examples": k,
            "max_length": settings.max_length, "dtype": str(out_dtype).replace("torch.", ""),
            "models": json.dumps({"reasoning": model_id(model)}),
            "data_sha256": file_sha256(Path(data))}
    return write_importance(Path(out), tensors, meta, {}, overwrite=settings.overwrite,
                            shard_size=settings.shard_size)


@dataclass
class VotesResult:
    folders: list[Path]
    warnings: list[str]


def votes_pass(model: Path, reasoning: Path, fisher: Path, data: Path, out: Path,
               lambdas: Sequence[float], *, zero_grad: str = "merge", settings: PassSettings,
               progress: Progress | None = None) -> VotesResult:
    """The domain model's votes v for every λ (docs/methods/rcp.md §1) into ``OUT_<λ>`` folders."""
    lambdas = _check_votes_request(model, reasoning, fisher, data, out, lambdas,
                                   zero_grad=zero_grad, overwrite=settings.overwrite)
    fisher_info = read_info(Path(fisher), f"--fisher {fisher}")
    if fisher_info["kind"] != "rcp_fisher":
        raise MergeError(f"--fisher {fisher}: a {fisher_info['kind']} folder, not a Fisher map")
    loaded, examples = load_for_pass(model, settings, data)
    params = checkpoint_parameters(loaded, model)
    votes = _VoteAccumulators.zeros(params, _penalties(params, Path(reasoning), Path(fisher)),
                                    lambdas, zero_grad, len(examples))
    k = gradient_pass(loaded, examples, params, votes.on_grad, progress)
    if k != len(examples):
        votes.counters = {lam: {n: c.to(V.votes_dtype(k)) for n, c in cs.items()}
                          for lam, cs in votes.counters.items()}
    base_meta = {"kind": "rcp_votes", "fisher_kind": fisher_info.get("fisher_kind"),
                 "zero_grad": zero_grad, "n_examples": k, "max_length": settings.max_length,
                 "dtype": str(V.votes_dtype(k)).replace("torch.", ""),
                 "models": json.dumps({"domain": model_id(model),
                                       "reasoning": model_id(reasoning)}),
                 "data_sha256": file_sha256(Path(data)),
                 "fisher_sha256": file_sha256(Path(fisher) / "importance.json")}
    all_s = torch.cat([torch.cat(v) for v in votes.s_samples.values() if v])
    folders, warnings = [], []
    for lam in lambdas:
        info = _votes_info(votes, params, lam, all_s)
        ratio = info["penalty_ratio"]
        if ratio is not None and ratio < PENALTY_WARN:
            warnings.append(f"penalty negligible at λ={lam:g} (median λ·p / median |S| = "
                            f"{ratio:.1e}); sweep penalty_lambda over decades (1e3…1e12)")
        meta = {**base_meta, "penalty_lambda": repr(lam)}
        folders.append(write_importance(votes_folder(out, lam), votes.counters[lam], meta, info,
                                        overwrite=settings.overwrite,
                                        shard_size=settings.shard_size))
    return VotesResult(folders, warnings)


def _check_votes_request(model: Path, reasoning: Path, fisher: Path, data: Path, out: Path,
                         lambdas: Sequence[float], *, zero_grad: str,
                         overwrite: bool) -> list[float]:
    """The distinct λs (1000 when none is given), after checking ``zero_grad``, that every λ is
    ≥ 0 and that each ``OUT_<λ>`` folder is apart from the inputs and may be written."""
    if zero_grad not in V.ZERO_GRAD:
        raise MergeError(f"--zero-grad {zero_grad!r}: use merge or keep")
    lambdas = list(dict.fromkeys(float(x) for x in lambdas)) or [1000.0]
    for lam in lambdas:
        if not lam >= 0:
            raise MergeError(f"--penalty-lambda {lam}: must be ≥ 0 (inf allowed)")
        check_output_apart(votes_folder(out, lam), [
            ("--model", Path(model)), ("--reasoning", Path(reasoning)),
            ("--fisher", Path(fisher)), ("--data", Path(data))])
        refuse_existing(votes_folder(out, lam), overwrite)
    return lambdas


@dataclass
class _VoteAccumulators:
    """What the votes pass gathers per parameter name: the vote counts per λ (``counters``),
    whether any text gave a nonzero sensitivity (``touched``), and |S| at the sampled positions
    ``where`` of the first SAMPLE_TEXTS texts (``s_samples``)."""

    penalties: dict[str, torch.Tensor]
    lambdas: list[float]
    zero_grad: str
    counters: dict[float, dict[str, torch.Tensor]]
    touched: dict[str, torch.Tensor]
    where: dict[str, torch.Tensor]
    s_samples: dict[str, list[torch.Tensor]]

    @classmethod
    def zeros(cls, params: dict[str, torch.nn.Parameter], penalties: dict[str, torch.Tensor],
              lambdas: list[float], zero_grad: str, n_texts: int) -> _VoteAccumulators:
        """Empty accumulators for ``params``, counters sized for ``n_texts`` votes."""
        count_dtype = V.votes_dtype(n_texts)
        counters = {lam: {n: torch.zeros(t.shape, dtype=count_dtype) for n, t in params.items()}
                    for lam in lambdas}
        touched = {n: torch.zeros(t.shape, dtype=torch.bool) for n, t in params.items()}
        where = {n: _sample_positions(t.numel()) for n, t in params.items()}
        return cls(penalties, lambdas, zero_grad, counters, touched, where,
                   {n: [] for n in params})

    def on_grad(self, name: str, param: torch.Tensor, grad: torch.Tensor) -> None:
        """Add one text's gradient of parameter ``name``: its votes for every λ, its touched
        flags and (for the first texts) its sampled |S|."""
        s = V.sensitivity(grad, param.detach()).cpu()
        for lam in self.lambdas:
            V.add_votes(self.counters[lam][name], s,
                        V.scaled_penalty(self.penalties[name], lam), self.zero_grad)
        self.touched[name] |= s != 0
        if len(self.s_samples[name]) < SAMPLE_TEXTS:
            self.s_samples[name].append(s.view(-1)[self.where[name]].abs())


def _votes_info(votes: _VoteAccumulators, params: dict[str, torch.nn.Parameter], lam: float,
                all_s: torch.Tensor) -> dict:
    """The ``importance.json`` info of the λ folder: per-tensor statistics, their
    numel-weighted fractions and the penalty ratio median λ·p / median |S| (None when
    undefined)."""
    stats, lam_p = {}, []
    for n in params:
        p = votes.penalties[n].view(-1)[votes.where[n]]
        positive = V.scaled_penalty(p, lam)[p > 0]
        lam_p.append(positive)
        samples = votes.s_samples[n]
        stats[n] = {"numel": params[n].numel(),
                    "selected_fraction": float((votes.counters[lam][n] > 0).float().mean()),
                    "zero_evidence_fraction": float((~votes.touched[n]).float().mean()),
                    "median_abs_s": _median(torch.cat(samples) if samples else None),
                    "median_lambda_p": _median(positive)}
    return {"penalty_ratio": _ratio(_median(torch.cat(lam_p)), _median(all_s)), "tensors": stats,
            "selected_fraction": _weighted(stats, "selected_fraction"),
            "zero_evidence_fraction": _weighted(stats, "zero_evidence_fraction")}


def _penalties(params: dict, reasoning: Path, fisher: Path) -> dict[str, torch.Tensor]:
    """p = F·(θ_r − θ_t)² per parameter, float32 on the host, checked against both folders."""
    r_src, f_src = LocalSource(reasoning, str(reasoning)), LocalSource(fisher, str(fisher))
    try:
        out = {}
        for name, param in params.items():
            for src, what in ((r_src, "--reasoning"), (f_src, "--fisher")):
                info = src.tensors().get(name)
                if info is None or tuple(info.shape) != tuple(param.shape):
                    got = "lacks it" if info is None else f"has shape {list(info.shape)}"
                    raise MergeError(f"{what} {src.ref}: tensor '{name}' of the domain model "
                                     f"(shape {list(param.shape)}) {got}")
            out[name] = V.penalty(f_src.read_tensor(name), r_src.read_tensor(name),
                                  param.detach().cpu())
        return out
    finally:
        r_src.close()
        f_src.close()


def _sample_positions(numel: int) -> torch.Tensor:
    return torch.linspace(0, max(numel - 1, 0), min(numel, SAMPLE)).round().long()


def _median(values: torch.Tensor | None) -> float | None:
    if values is None or values.numel() == 0:
        return None
    return float(values.float().median())


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isinf(a):
        return None
    return a / b


def _weighted(stats: dict[str, dict], key: str) -> float:
    total = sum(s["numel"] for s in stats.values())
    return sum(s[key] * s["numel"] for s in stats.values()) / max(total, 1)
