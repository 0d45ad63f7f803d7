"""Vocabulary in the plan and the merge (docs/tokenizer.md): which tensors are embeddings or
heads, how each model's rows are aligned before the method sees them, and the output's
tokenizer files and chat template.

* ``tokenizer_source`` / ``tokenizer:`` set: the output tokenizer is built (engine/vocab.py)
  and every model's embedding/head rows are re-indexed to it by token (``ops.vocab``); when
  every model already has exactly the output's rows this is skipped and the donor's tokenizer
  files are copied as they are.
* neither set: embeddings whose row counts differ are merged on the rows every model has
  (mergekit's common-submatrix rule, warned), or refused with ``vocab_policy: error``.
"""

from __future__ import annotations

import copy
import re
from dataclasses import replace
from typing import Any

from mergekit_like.engine.jobs import MergePlan, TensorJob
from mergekit_like.engine.read import JobInputs
from mergekit_like.engine.vocab import VocabPlan, build_vocab, resolve_chat_template
from mergekit_like.errors import MergeError
from mergekit_like.io.source import CheckpointSource, TensorInfo
from mergekit_like.ops.vocab import TokenRule, align_rows

VOCAB_TENSOR_RE = re.compile(
    r"(^|\.)(embed_tokens|wte|word_embeddings|tok_embeddings|embed_in|lm_head|embed_out)"
    r"\.weight$")
"""Tensors with one row per token (mergekit's ``is_embed`` weights)."""


def is_vocab_tensor(name: str, info: TensorInfo) -> bool:
    return len(info.shape) == 2 and VOCAB_TENSOR_RE.search(name) is not None


def rows_may_differ(name: str, a: TensorInfo, b: TensorInfo) -> bool:
    """Two inputs' shapes of ``name`` that differ only in rows, for a per-token tensor: the
    vocabulary step aligns them, so the plan's shape check lets them pass."""
    return is_vocab_tensor(name, a) and len(b.shape) == 2 and a.shape[1:] == b.shape[1:]


def model_key(source: CheckpointSource) -> str:
    """The key ``build_vocab`` and ``align_rows`` know a model by (one per opened source)."""
    return f"{id(source)}:{source.ref}"


def plan_vocab(plan: MergePlan) -> None:
    """Phase B: the vocabulary plan, the reshaped per-token jobs, the output's vocab_size and
    chat template. Reads tokenizer files and configs only."""
    recipe = plan.recipe
    jobs = [j for j in plan.jobs if j.merge and is_vocab_tensor(j.name, j.info)]
    if recipe.chat_template is not None:
        plan.chat_template = _chat_template(plan)
    if recipe.vocab is None:
        _plan_common_rows(plan, jobs)
        return
    sources = {model_key(s): s for s in [*plan.sources, *plan.unused, plan.tokenizer]}
    base = next((model_key(s) for inp, s in zip(plan.inputs, plan.sources) if inp.is_base), None)
    if base is None and recipe.base is not None:
        base = next((model_key(s) for s in plan.unused if s.ref == recipe.base.display), None)
    spec = recipe.vocab
    if _rows_agree(plan, jobs) and not spec.tokens and not spec.pad_to_multiple_of and any(
            not _has_tokenizer(s) for s in sources.values()):
        plan.warnings.append(f"{recipe.where('tokenizer_source')}: not every model has "
                             "tokenizer files and their vocabularies are the same size; the "
                             "rows are merged as they are")
        return
    donor = model_key(plan.tokenizer) if spec.mode == "model" else None
    rules = {name: _rule(name, tok, plan) for name, tok in spec.tokens.items()}
    try:
        vocab = build_vocab(spec.mode, sources, base, donor, rules, spec.pad_to_multiple_of)
    except MergeError as exc:
        raise MergeError(f"{recipe.where('tokenizer' if spec.tokens else 'tokenizer_source')}: "
                         f"{exc}") from None
    if vocab.identity():
        return
    plan.vocab = vocab
    for job in jobs:
        _reshape(plan, job, vocab.rows, "vocab")
    _set_vocab_size(plan, vocab.rows)


def _rows_agree(plan: MergePlan, jobs: list[TensorJob]) -> bool:
    return all(len({plan.tensor_info(p, j.read_name(p)).shape[0] for p in j.read_positions()})
               == 1 for j in jobs)


def _has_tokenizer(source: CheckpointSource) -> bool:
    files = set(source.list_files())
    return "tokenizer.json" in files or "tokenizer.model" in files


def _rule(name: str, tok: Any, plan: MergePlan) -> TokenRule:
    """A parsed recipe token as an ``ops.vocab`` rule, its model named by its source's key."""
    source = None
    if tok.model is not None:
        source = next(s for inp, s in zip([*plan.inputs], plan.sources)
                      if inp.ref.key == tok.model.key)
    return TokenRule(kind=tok.kind, model=model_key(source) if source else None,
                     token=tok.token, token_id=tok.token_id, force=tok.force)


def _chat_template(plan: MergePlan) -> str | None:
    sources = {model_key(s): s for s in plan.sources}
    try:
        return resolve_chat_template(plan.recipe.chat_template, sources)
    except MergeError as exc:
        message = str(exc).removeprefix("chat_template: ")
        raise MergeError(f"{plan.recipe.where('chat_template')}: {message}") from None


def _plan_common_rows(plan: MergePlan, jobs: list[TensorJob]) -> None:
    """No tokenizer settings: a per-token tensor whose inputs' row counts differ keeps the
    rows all of them have (the first min(V_i)), as mergekit does, or is refused."""
    for job in jobs:
        rows = {plan.tensor_info(p, job.read_name(p)).shape[0] for p in job.read_positions()}
        if len(rows) == 1:
            continue
        if plan.recipe.vocab_policy == "error":
            raise MergeError(f"{plan.recipe.where('vocab_policy')}: '{job.name}' has "
                             f"{sorted(rows)} rows across the models; set tokenizer_source to "
                             "align them by token, or drop vocab_policy: error to keep the "
                             "common rows")
        keep = min(rows)
        plan.warnings.append(f"'{job.name}': the models have {sorted(rows)} rows; merging the "
                             f"first {keep}, which every model has (mergekit's rule); set "
                             "tokenizer_source to align the rows by token instead")
        _reshape(plan, job, keep, "common")
        if "embed" in job.name or "wte" in job.name:
            _set_vocab_size(plan, keep)


def _reshape(plan: MergePlan, job: TensorJob, rows: int, how: str) -> None:
    if len(job.outputs) != 1 or tuple(job.outputs[0].shape) != tuple(job.info.shape):
        raise MergeError(f"{plan.recipe.display}: merge_method '{plan.recipe.merge_method}' "
                         f"cannot merge models whose vocabularies differ ('{job.name}')")
    shape = (rows,) + tuple(job.info.shape[1:])
    job.info = replace(job.info, shape=shape)
    job.outputs = [replace(job.outputs[0], shape=shape)]
    job.align = how


def _set_vocab_size(plan: MergePlan, rows: int) -> None:
    config = plan.config if plan.config is not None else plan.reference.config()
    if config is None:
        return
    config = copy.deepcopy(config)
    node = config.get("text_config") if "vocab_size" not in config and isinstance(
        config.get("text_config"), dict) else config
    node["vocab_size"] = rows
    plan.config = config


def align_inputs(plan: MergePlan, job: TensorJob, inputs: JobInputs) -> JobInputs:
    """A per-token job's inputs with every model's rows aligned to the output's (``job.align``
    "vocab": by token, ``ops.vocab.align_rows``; "common": the first rows)."""
    rows = job.info.shape[0]
    if job.align == "common":
        cut = [t[:rows] for t in inputs.inputs]
        return JobInputs(None if inputs.base is None else inputs.base[:rows], cut, inputs.side)
    vocab: VocabPlan = plan.vocab
    keyed = [(job.base, inputs.base)] if job.base is not None else []
    keyed += list(zip(job.participants, inputs.inputs))
    tensors = {model_key(plan.sources[pos]): t for pos, t in keyed}
    base = vocab.base if vocab.base in tensors else None
    rules = {k: r for k, r in vocab.token_rules.items() if r.model is None or r.model in tensors}
    try:
        aligned = align_rows(tensors, vocab.permutations, vocab.vocab, vocab.rows, rules, base)
    except ValueError as exc:
        raise MergeError(f"'{job.name}': {exc}") from None
    out = [aligned[model_key(plan.sources[pos])] for pos in job.participants]
    new_base = aligned[model_key(plan.sources[job.base])] if job.base is not None else None
    return JobInputs(new_base, out, inputs.side)
