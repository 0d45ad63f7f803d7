"""Per-point evaluation of a grid (docs/grid.md §6): a user command, or the built-in perplexity."""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_like.errors import MergeError
from mergekit_like.grid.results import parse_metric


@dataclass
class Evaluation:
    metric: float | None
    fields: dict[str, float] | None
    error: str | None
    extra: dict[str, Any] | None = None     # more row fields (lm-eval: {"lm_eval": {...}})


def eval_command(template: str, out: Path, pid: str, label: str) -> str:
    """``template`` with {out} (absolute path), {id} and {label} substituted, shell-quoted."""
    return (template.replace("{out}", shlex.quote(str(Path(out).resolve())))
            .replace("{id}", shlex.quote(pid)).replace("{label}", shlex.quote(label)))


def run_eval_command(template: str, out: Path, pid: str, label: str, *, cwd: Path,
                     key: str | None = None, timeout: float | None = None) -> Evaluation:
    """Run the command through the shell; parse its last non-empty stdout line."""
    cmd = eval_command(template, out, pid, label)
    try:
        proc = subprocess.run(cmd, shell=True, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return Evaluation(None, None, f"the evaluation ran past {timeout:g} s")
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [""])[-1][:120]
        return Evaluation(None, None, f"the evaluation exited {proc.returncode}"
                          + (f": {tail}" if tail else ""))
    metric, fields, error = parse_metric(proc.stdout, key)
    return Evaluation(metric, fields, error)


def check_ppl_extra() -> None:
    """--eval-ppl needs transformers; checked before anything runs."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise MergeError("--eval-ppl needs transformers: pip install 'mergekit_like[runtime]'") from None


def perplexity_of(out: Path, text_file: Path, *, ctx: int | None, max_tokens: int,
                  device: str = "cpu", batch_size: int = 4) -> Evaluation:
    """ppl of a merged model on a local text (docs/grid.md §6): tokenised without special tokens,
    non-overlapping windows of ``ctx`` tokens (default min(1024, max positions)) up to
    ``max_tokens``, each prefixed with BOS when the tokenizer has one (BOS never scored)."""
    from mergekit_like.runtime import Example, evaluate_perplexity, load_model

    loaded = load_model(out, device=device)
    tok = loaded.tokenizer
    if tok is None:
        return Evaluation(None, None, f"{out} has no tokenizer: --eval-ppl needs one")
    ids = tok(Path(text_file).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    ids = ids[:max_tokens]
    limit = getattr(loaded.model.config, "max_position_embeddings", None) or 1024
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    window = min(ctx or 1024, limit - len(bos))
    examples = [Example(bos + ids[i:i + window], None, None) for i in range(0, len(ids), window)]
    if bos:  # the BOS token is context only: score windows as [BOS, w...] minus its own slot
        examples = [e for e in examples if len(e.input_ids) > 1]
    if not examples:
        return Evaluation(None, None, f"{text_file} holds no tokens")
    res = evaluate_perplexity(loaded, examples, batch_size=batch_size)
    return Evaluation(res.perplexity, {"ppl": res.perplexity, "loss": res.loss}, None)
