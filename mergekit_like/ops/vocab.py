"""Embedding / LM-head rows aligned to a merged vocabulary (mergekit ``tokenizer/embed.py``
semantics; docs/tokenizer.md §3–§4).

Every model i has a weight E_i of shape [V_i, H] and a permutation p_i: for each output token
id t (0 ≤ t < n = len(vocab)), p_i[t] is the model's own row for that token, or -1 when the
model's vocabulary lacks it. The aligned weight A_i of shape [rows, H] (rows ≥ n) is::

    A_i[t] = E_i[p_i[t]]           when p_i[t] ≥ 0 and the token's rule is not ``force``
    A_i[t] = D[t]                  otherwise (the token's default row, shared by all models)
    A_i[n:] = mean_t A_i[t], t < n (padding rows; vocab-expansion trick, mergekit's choice)

The default row D[t] of a token with a rule in ``token_rules``:

    zero          0
    model m       E_m[p_m[t]]      (m must have the token)
    model_token   E_m[j]           (j = the rule's token_id, 0 ≤ j < V_m)

and of any other token, with c = the number of models that have it:

    c = 0                   0 (mergekit warns "not found in any model")
    base has it             E_base[p_base[t]]
    otherwise               (Σ_i E_i[p_i[t]]) / c over the models that have it, in model order

(c = 1 falls under the mean: 0 + x then ÷ 1 is x bit for bit, the single donor's row, as
mergekit's explicit donor rule gives.) Like mergekit, the zero start, the sum and the division
run in the first model's dtype and on its device; the base, when given, takes part like any
other model. Each result has its own input's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

RuleKind = Literal["zero", "model", "model_token"]


@dataclass(frozen=True)
class TokenRule:
    """Where one configured token's default row comes from (mergekit ``TokenEmbeddingConfig``).

    kind "zero": a zero row. kind "model": ``model``'s own row for this token. kind
    "model_token": row ``token_id`` of ``model``'s weight (``token`` is the source token's
    string, kept for messages; the engine resolves it to ``token_id`` before alignment).
    ``force``: every model gets the default row, even one that has the token itself."""

    kind: RuleKind
    model: str | None = None
    token: str | None = None
    token_id: int | None = None
    force: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("zero", "model", "model_token"):
            raise ValueError(f"unknown token rule kind {self.kind!r}")
        if self.kind != "zero" and self.model is None:
            raise ValueError(f"a {self.kind!r} token rule needs a model")


def _check_inputs(tensors: dict[str, torch.Tensor], permutations: dict[str, torch.Tensor],
                  n: int, rows: int, base: str | None) -> int:
    """Validate shapes; returns the hidden size H."""
    if not tensors:
        raise ValueError("align_rows needs at least one tensor")
    if rows < n:
        raise ValueError(f"rows={rows} is less than the vocabulary size {n}")
    if base is not None and base not in tensors:
        raise ValueError(f"the base model {base!r} has no tensor")
    hidden = {t.shape[1] for t in tensors.values() if t.dim() == 2}
    if len(hidden) != 1 or any(t.dim() != 2 for t in tensors.values()):
        raise ValueError("embedding tensors must be 2-D with one shared hidden size, got "
                         + ", ".join(f"{k}: {tuple(t.shape)}" for k, t in tensors.items()))
    for key, t in tensors.items():
        p = permutations.get(key)
        if p is None or p.shape != (n,):
            raise ValueError(f"{key}: permutation must have shape ({n},)")
        if n and int(p.max()) >= t.shape[0]:
            raise ValueError(f"{key}: permutation points at row {int(p.max())} but the tensor "
                             f"has {t.shape[0]} rows")
    return hidden.pop()


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` (int64 [k], -1 allowed: read as row 0, to be masked) of ``t``."""
    return t.index_select(0, idx.clamp(min=0).to(t.device))


def _default_rows(tensors: dict[str, torch.Tensor], perms: dict[str, torch.Tensor],
                  n: int, hidden: int, base: str | None) -> torch.Tensor:
    """D [n, H] by the unconfigured-token rule (base row, else the mean over holders)."""
    first = next(iter(tensors.values()))
    dtype, device = first.dtype, first.device
    acc = torch.zeros((n, hidden), dtype=dtype, device=device)
    count = torch.zeros(n, dtype=torch.int64, device=device)
    for key, t in tensors.items():
        present = (perms[key] >= 0).to(device)
        idx = torch.nonzero(present).squeeze(1)
        rows = _gather(t, perms[key].to(device)[idx]).to(dtype)
        acc.index_put_((idx,), acc.index_select(0, idx) + rows)
        count += present
    have = count > 0
    acc[have] = acc[have] / count[have].to(dtype).unsqueeze(1)
    if base is not None:
        bp = perms[base].to(device)
        bidx = torch.nonzero(bp >= 0).squeeze(1)
        acc[bidx] = _gather(tensors[base], bp[bidx]).to(dtype)
    return acc


def _rule_row(rule: TokenRule, token: str, tid: int, tensors: dict[str, torch.Tensor],
              perms: dict[str, torch.Tensor], hidden: int, like: torch.Tensor) -> torch.Tensor:
    """The default row [H] of one configured token."""
    if rule.kind == "zero":
        return torch.zeros(hidden, dtype=like.dtype, device=like.device)
    if rule.model not in tensors:
        raise ValueError(f"token {token!r}: model {rule.model!r} is not part of the merge")
    src = tensors[rule.model]
    if rule.kind == "model":
        old = int(perms[rule.model][tid])
        if old < 0:
            raise ValueError(f"token {token!r} is not in the vocabulary of {rule.model!r}")
        return src[old].to(like.dtype)
    if rule.token_id is None:
        raise ValueError(f"token {token!r}: the model_token rule has no resolved token_id")
    if not 0 <= rule.token_id < src.shape[0]:
        raise ValueError(f"token {token!r}: token id {rule.token_id} is out of range for "
                         f"{rule.model!r} ({src.shape[0]} rows)")
    return src[rule.token_id].to(like.dtype)


def align_rows(tensors: dict[str, torch.Tensor], permutations: dict[str, torch.Tensor],
               vocab: dict[str, int], rows: int, token_rules: dict[str, TokenRule],
               base: str | None) -> dict[str, torch.Tensor]:
    """Each model's [V_i, H] weight re-indexed to the output vocabulary: model key -> [rows, H].

    tensors: model key -> [V_i, H] float tensor (embedding or LM head; any float dtype).
    permutations: model key -> int64 [len(vocab)], the model's old row per output id or -1.
    vocab: output token string -> id, ids exactly 0..len(vocab)-1. rows ≥ len(vocab).
    token_rules: configured tokens (each must be in ``vocab``). base: a key of ``tensors`` or
    None. The rules are in the module docstring. Raises ValueError on inconsistent input."""
    n = len(vocab)
    hidden = _check_inputs(tensors, permutations, n, rows, base)
    first = next(iter(tensors.values()))
    perms = {k: permutations[k].to(torch.int64) for k in tensors}
    default = _default_rows(tensors, perms, n, hidden, base)

    forced = torch.zeros(n, dtype=torch.bool, device=first.device)
    for token, rule in token_rules.items():
        if token not in vocab:
            raise ValueError(f"configured token {token!r} is not in the output vocabulary")
        tid = vocab[token]
        default[tid] = _rule_row(rule, token, tid, tensors, perms, hidden, first)
        if rule.force:
            forced[tid] = True

    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        p = perms[key].to(first.device)
        own = ((p >= 0) & ~forced).unsqueeze(1)
        aligned = torch.empty((rows, hidden), dtype=t.dtype, device=first.device)
        aligned[:n] = torch.where(own, _gather(t, p).to(first.device).to(t.dtype),
                                  default.to(t.dtype))
        if rows > n:
            aligned[n:] = torch.mean(aligned[:n], dim=0) if n else 0
        out[key] = aligned
    return out
