"""`train-router` for a WEMoE folder (docs/methods/wemoe.md §5): the routers trained on unlabeled
texts, by the confident-expert objective (default, wemoe/confident.py) or the paper's test-time
entropy minimisation (``objective="entropy"``):

Entropy objective, for a right-padded batch ids, mask [B, N] (mask 1 = real token) and logits
[B, N, V]:

    H[b, n] = -Σ_v p log p,   p = softmax(logits[b, n]) in float32
    L       = (1/B) Σ_b  Σ_n mask[b, n]·H[b, n] / Σ_n mask[b, n]

Only the router tensors (``…mlp.router.fc{1,2}.{weight,bias}``, float32) train; everything else is
frozen and the model stays in eval mode. Adam, no schedule, ``grad_accum`` micro-batches of
``batch_size`` texts per step. With held-out texts, perplexity is measured at step 0 (the loaded
routers) and every ``eval_every`` steps; ``keep="best"`` restores the lowest. The result replaces
``router.safetensors`` atomically (temporary sibling, fsync, ``os.replace``); no other file changes.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint

from mergekit_like.device import resolve_device
from mergekit_like.errors import MergeError
from mergekit_like.io.manifest import file_entry, update_manifest
from mergekit_like.runtime.data import Example, check_token_ids, pad_batch, read_examples
from mergekit_like.runtime.evaluate import evaluate_perplexity
from mergekit_like.runtime.hooks import enable_checkpointing
from mergekit_like.runtime.metrics import next_token_entropy
from mergekit_like.runtime.model import _load_tokenizer, require_transformers
from mergekit_like.wemoe.confident import confident_targets, routing_loss
from mergekit_like.wemoe.method import init_router
from mergekit_like.wemoe.runtime import is_wemoe, load_wemoe

ROUTER_FILE = "router.safetensors"
ENTROPY_CHUNK = 512
"""Positions whose [chunk, V] float32 softmax is alive at once (recomputed in backward)."""
PROBE_EXAMPLES = 256
"""The entropy reported at step 0 and at the end is the objective on the first this many texts."""
EVAL_BATCH = 8
OBJECTIVES = ("confident", "entropy")


@dataclass
class WemoeTrainSettings:
    """The command's options (docs/methods/wemoe.md §5); ``keep`` None = best with val data, else last."""

    lr: float = 1e-4
    steps: int = 500
    batch_size: int = 8
    max_length: int = 512
    seed: int = 0
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    reinit: bool = False
    eval_every: int = 50
    keep: str | None = None
    objective: str = "confident"
    """"confident" (wemoe/confident.py, the default) or "entropy" (the paper's)."""

    def resolved_keep(self, has_val: bool) -> str:
        """Check every option (one-line MergeError) and return the effective ``keep``."""
        for name, value, low in (("--steps", self.steps, 1), ("--batch-size", self.batch_size, 1),
                                 ("--max-length", self.max_length, 1),
                                 ("--grad-accum", self.grad_accum, 1),
                                 ("--eval-every", self.eval_every, 1)):
            if value < low:
                raise MergeError(f"{name} {value}: must be at least {low}")
        if not self.lr > 0:
            raise MergeError(f"--lr {self.lr}: must be positive")
        if self.objective not in OBJECTIVES:
            raise MergeError(f"--objective {self.objective!r}: use {' or '.join(OBJECTIVES)}")
        keep = self.keep or ("best" if has_val else "last")
        if keep not in ("best", "last"):
            raise MergeError(f"--keep {keep!r}: use best or last")
        if keep == "best" and not has_val:
            raise MergeError("--keep best needs --val-data (held-out texts to compare routers on)")
        return keep


@dataclass
class WemoeTrainResult:
    """entropy_*: the objective on the probe texts; kept_step 0 = the starting routers, whose
    state ("init" = task arithmetic, or "trained") is start_state; evals: (step, ppl, entropy)."""

    steps: int
    entropy_start: float
    entropy_end: float
    kept_step: int
    best_perplexity: float | None
    start_state: str = "init"
    evals: list[tuple[int, float, float]] = field(default_factory=list)
    objective: str = "confident"
    pseudo_labels: dict[str, int] = field(default_factory=dict)
    """confident objective: how many training texts each expert was most sure of."""


def train_wemoe_router(root: Path, data: Path, settings: WemoeTrainSettings, *,
                       val_data: Path | None = None, device: str = "auto", quiet: bool = False,
                       console=None) -> WemoeTrainResult:
    """Train the routers of the WEMoE folder ``root`` on ``data`` and save them (see module doc).
    Options, folder and data files are all checked before the model is loaded."""

    root, keep = Path(root), settings.resolved_keep(val_data is not None)
    resolve_device(device)
    config = _wemoe_config(root)
    transformers = require_transformers()
    tokenizer = _load_tokenizer(root, transformers)
    train = _read(data, tokenizer, settings.max_length)
    val = _read(val_data, tokenizer, settings.max_length) if val_data is not None else None
    transformers.utils.logging.disable_progress_bar()
    loaded = load_wemoe(root, device=device, dtype=torch.float32)
    for examples in (train, val or []):
        check_token_ids(examples, loaded.model.get_input_embeddings().num_embeddings)
    routers = router_parameters(loaded.model, root)
    if settings.reinit:
        initial = initial_routers(root, config, {n: p.shape for n, p in routers.items()})
        _load_state(routers, initial)
    if settings.gradient_checkpointing:
        enable_checkpointing(loaded.model)
    result = _fit(loaded, routers, train, val, settings, keep, quiet, console)
    with safe_open(str(root / ROUTER_FILE), framework="pt") as f:
        old = dict(f.metadata() or {})
    result.start_state = "init" if settings.reinit else old.get("state", "init")
    save_routers(root, routers, {**old, **_metadata(data, settings, result)})
    return result


def _fit(loaded, routers: dict, examples: list[Example], val: list[Example] | None,
         settings: WemoeTrainSettings, keep: str, quiet: bool, console) -> WemoeTrainResult:
    """The training loop: Adam on ``routers``, seeded batch stream, evals, keep best/last."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    torch.manual_seed(settings.seed)
    model, dev = loaded.model, loaded.device
    train = [ex.sequence for ex in examples]
    answers = [ex.answer_ids or [] for ex in examples]
    probe = train[:PROBE_EXAMPLES]
    start = mean_entropy(model, dev, probe, settings.batch_size)
    best = (evaluate_perplexity(loaded, val, EVAL_BATCH), 0, _snapshot(routers)) if val else None
    evals = [(0, best[0].perplexity, best[0].entropy)] if val else []
    optimizer = torch.optim.Adam(list(routers.values()), lr=settings.lr)
    stream = batch_stream([ex.task for ex in examples], settings.batch_size, settings.seed)
    targets, counts = (None, {}) if settings.objective != "confident" else \
        confident_targets(model, dev, train, answers, settings.batch_size)
    with Progress(TextColumn("[bold]train-router"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("entropy {task.fields[loss]}"), console=console,
                  disable=quiet) as bar:
        job = bar.add_task("steps", total=settings.steps, loss=f"{start:.4f}")
        say = (lambda *_: None) if quiet else bar.console.print
        if val:
            say(_eval_line(*evals[0]))
        for step in range(1, settings.steps + 1):
            loss = _step(model, dev, train, stream, optimizer, settings.grad_accum, targets)
            bar.update(job, advance=1, loss=f"{loss:.4f}")
            if val and (step % settings.eval_every == 0 or step == settings.steps):
                res = evaluate_perplexity(loaded, val, EVAL_BATCH)
                evals.append((step, res.perplexity, res.entropy))
                say(_eval_line(*evals[-1]))
                if res.perplexity < best[0].perplexity:
                    best = (res, step, _snapshot(routers))
    kept = settings.steps
    if keep == "best":
        _load_state(routers, best[2])
        kept = best[1]
    end = start if kept == 0 else mean_entropy(model, dev, probe, settings.batch_size)
    return WemoeTrainResult(steps=settings.steps, entropy_start=start, entropy_end=end,
                            kept_step=kept, best_perplexity=best[0].perplexity if best else None,
                            evals=evals, objective=settings.objective, pseudo_labels=counts)


def _step(model, dev, train, stream, optimizer, grad_accum: int,
          targets: torch.Tensor | None = None) -> float:
    """One optimizer step over ``grad_accum`` micro-batches; returns the mean batch objective
    (the routing loss toward ``targets`` when given, else the entropy)."""
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for _ in range(grad_accum):
        batch = next(stream)
        ids, mask = (t.to(dev) for t in pad_batch([train[i] for i in batch], "right"))
        if targets is not None:
            loss = routing_loss(model, ids, mask, targets[batch]) / grad_accum
        else:
            loss = sample_entropy(model, ids, mask).mean() / grad_accum
        loss.backward()
        total += loss.item()
    optimizer.step()
    return total


def sample_entropy(model, ids: torch.Tensor, mask: torch.Tensor,
                   chunk: int = ENTROPY_CHUNK, routing: torch.Tensor | None = None,
                   score: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample mean next-token entropy [B] float32 over the real positions of ids, mask [B, N].

    Only real positions are gathered from the logits [B, N, V], ``chunk`` at a time; under
    autograd each chunk's softmax is checkpointed (recomputed in backward), so beyond the
    logits themselves the entropy keeps about chunk·V floats alive, not B·N·V.
    """
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False,
                   wemoe_routing=routing).logits  # [B, N, V]; routing [L, B, T] forces r
    flat = logits.reshape(-1, logits.shape[-1])
    score = mask if score is None else score                   # the positions averaged over
    rows = score.reshape(-1).nonzero().squeeze(1)              # flat indices of those positions
    sums = torch.zeros(ids.shape[0], dtype=torch.float32, device=logits.device)
    for k in range(0, len(rows), chunk):
        part = rows[k:k + chunk]
        if flat.requires_grad:
            h = checkpoint(_entropy_rows, flat, part, use_reentrant=False)
        else:
            h = _entropy_rows(flat, part)
        sums = sums.index_add(0, part // ids.shape[1], h)
    return sums / score.sum(dim=1).clamp(min=1).to(sums.dtype)


def _entropy_rows(flat: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """H of the selected rows of flat logits [P, V] → [len(rows)] float32."""
    return next_token_entropy(flat.index_select(0, rows)[None])[0]


@torch.no_grad()
def mean_entropy(model, dev, seqs: Sequence[list[int]], batch_size: int) -> float:
    """The objective L over all of ``seqs`` (each sample weighs the same), without gradients."""
    total = 0.0
    for k in range(0, len(seqs), batch_size):
        ids, mask = (t.to(dev) for t in pad_batch(seqs[k:k + batch_size], "right"))
        total += sample_entropy(model, ids, mask).double().sum().item()
    return total / len(seqs)


def batch_stream(tasks: Sequence[str | None], batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of example indices, seeded. Examples are grouped by task (first-appearance
    order; no task is a group of its own). Slot k of the stream (counted across batches) draws
    from group k mod G, and each group is drawn without replacement in a seeded order,
    reshuffled when used up, so batches stay balanced across tasks."""
    rng = random.Random(seed)
    groups: dict[str | None, list[int]] = {}
    for i, t in enumerate(tasks):
        groups.setdefault(t, []).append(i)
    queues: list[list[int]] = [[] for _ in groups]
    slot = 0
    while True:
        batch = []
        for _ in range(batch_size):
            g = slot % len(groups)
            if not queues[g]:
                queues[g] = list(list(groups.values())[g])
                rng.shuffle(queues[g])
            batch.append(queues[g].pop())
            slot += 1
        yield batch


def router_parameters(model, root: Path) -> dict[str, torch.nn.Parameter]:
    """{name: parameter} of every tensor in ROUTER_FILE, found in the model by name; everything
    else is frozen, the routers train (float32 required), the model is in eval mode."""
    with safe_open(str(root / ROUTER_FILE), framework="pt") as f:
        names = set(f.keys())
    model.eval().requires_grad_(False)
    owned = {id(p) for p in model.router_parameters()}
    routers = {n: p for n, p in model.named_parameters() if n in names}
    if not names or set(routers) != set(names) or {id(p) for p in routers.values()} != owned:
        raise MergeError(f"{root / ROUTER_FILE}: its tensors are not the model's router parameters")
    if any(p.dtype != torch.float32 for p in routers.values()):
        raise MergeError(f"{root}: router tensors must be float32")
    return {n: p.requires_grad_(True) for n, p in routers.items()}


def initial_routers(root: Path, config: dict,
                    shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The merge's router init (docs/methods/wemoe.md §1, ``methods.wemoe.init_router``): fc1.weight ~
    N(0, 0.01²) from a generator seeded by (seed, layer), fc1.bias 0, fc2.weight 0,
    fc2.bias λ·w_t, so the model equals task arithmetic again. λ comes from config.json; the
    recipe seed and the per-model weights from ``wemoe.seed``/``wemoe.weights`` when recorded,
    else from the recipe copy mergekit_config.yml (seed 0 and weight 1.0 when absent)."""

    block = config["wemoe"]
    seed, weights = _init_seed_weights(root, block)
    out = {}
    for prefix in sorted({n.rsplit(".router.", 1)[0] for n in shapes}):
        hidden, d = shapes[f"{prefix}.router.fc1.weight"]
        layer = int(prefix.split(".layers.")[1].split(".")[0])
        init = init_router(seed, layer, hidden, d, float(block["lambda"]), weights)
        out.update({f"{prefix}.router.{k}": v for k, v in init.items()})
    if {n: tuple(t.shape) for n, t in out.items()} != {n: tuple(s) for n, s in shapes.items()}:
        raise MergeError(f"{root}: --reinit: the initial routers do not match {ROUTER_FILE}")
    return out


def _init_seed_weights(root: Path, block: dict) -> tuple[int, list[float]]:
    """(recipe seed, [w_t] in task order) for --reinit; a weight that is not one number
    (a per-tensor schedule) cannot be rebuilt and is an error."""
    import yaml

    recipe_file = root / "mergekit_config.yml"
    recipe = yaml.safe_load(recipe_file.read_text()) if recipe_file.is_file() else None
    recipe = recipe if isinstance(recipe, dict) else {}
    seed = block.get("seed", recipe.get("seed") or 0)
    if block.get("weights") is not None:
        return int(seed), [float(w) for w in block["weights"]]
    default = (recipe.get("parameters") or {}).get("weight", 1.0)
    by_name = {m.get("name"): (m.get("parameters") or {}).get("weight", default)
               for m in recipe.get("models") or [] if isinstance(m, dict)}
    weights = []
    for task in block["tasks"]:
        w = by_name.get(task, 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise MergeError(f"--reinit: the weight of task '{task}' in {recipe_file} is not one "
                             "number; the initial routers cannot be rebuilt")
        weights.append(float(w))
    return int(seed), weights


def save_routers(root: Path, routers: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Replace ROUTER_FILE atomically with ``routers`` (float32, CPU): a temporary sibling,
    fsynced, renamed over the old file. ``router_parameters`` took the names (hence shapes) from
    that file, so the index and config.json stay valid; a kill leaves old or new routers."""
    path = root / ROUTER_FILE
    tensors = {n: p.detach().to("cpu", torch.float32).contiguous() for n, p in routers.items()}
    tmp = path.with_name(f".{ROUTER_FILE}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        folder = os.open(root, os.O_RDONLY)           # make the rename itself durable
        os.fsync(folder)
        os.close(folder)
    finally:
        tmp.unlink(missing_ok=True)
    update_manifest(Path(root), [ROUTER_FILE])


def _metadata(data: Path, s: WemoeTrainSettings, r: WemoeTrainResult) -> dict[str, str]:
    """This run's router-file metadata (strings): state, steps, lr, data sha256, entropies, best
    perplexity ("null" without held-out data). An unrecorded start state is "init"."""
    digest = file_entry(Path(data))["sha256"]
    best = "null" if r.best_perplexity is None else repr(r.best_perplexity)
    return {"format": "pt", "state": "trained" if r.kept_step else r.start_state,
            "steps": str(r.steps), "kept_step": str(r.kept_step), "lr": repr(s.lr),
            "batch_size": str(s.batch_size), "grad_accum": str(s.grad_accum),
            "max_length": str(s.max_length), "seed": str(s.seed), "data_sha256": digest,
            "initial_entropy": repr(r.entropy_start), "final_entropy": repr(r.entropy_end),
            "best_perplexity": best, "objective": r.objective}


def _wemoe_config(root: Path) -> dict:

    if not is_wemoe(root):
        raise MergeError(f"{root}: not a WEMoE folder (config.json model_type is not 'wemoe')")
    if not (root / ROUTER_FILE).is_file():
        raise MergeError(f"{root}: WEMoE folder without {ROUTER_FILE}")
    return json.loads((root / "config.json").read_text())


def _read(path: Path, tokenizer, max_length: int) -> list[Example]:
    """Examples of ``path`` with their scored tokens (input + answer) cut to ``max_length``."""
    examples = read_examples(path, tokenizer)
    out = []
    for ex in examples:   # the scored tokens cut to max_length; the answer's share kept
        seq = ex.sequence[:max_length]
        prompt = min(len(ex.input_ids), len(seq))
        out.append(Example(seq[:prompt], seq[prompt:] or None, ex.task))
    return out


def _eval_line(step: int, ppl: float, entropy: float) -> str:
    return f"step {step}: held-out perplexity {ppl:.4f}, mean entropy {entropy:.4f}"


def _snapshot(routers: dict) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True) for n, p in routers.items()}


def _load_state(routers: dict, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in routers.items():
            p.copy_(state[n].to(p.device, p.dtype))

