"""The Twin router (docs/methods/twin.md §7): the network, its features, its training, and its file.

* ``TwinRouter(d, T)``: ``Linear(d, h) → BatchNorm1d → LeakyReLU → Dropout(0.5) → Linear(h, h)
  → BatchNorm1d → LeakyReLU → Dropout(0.5) → Linear(h, T)``, h = min(2d, 1024). Input: features
  [B, d] float32; output: logits [B, T] float32; routing weights w = softmax(logits) (T = 1).
* ``mean_features(model, ids, mask)``: the shared model's final hidden state (after the final
  norm) averaged over non-padding tokens, [B, d] float32. Training and the runtime both use it.
* ``fit_router``: AdamW + cross-entropy, seeded; keeps the epoch with the best validation
  accuracy, then the lowest validation cross-entropy among those.
* ``save_router`` / ``load_router``: ``twin/router.safetensors`` (float32 tensors, BatchNorm
  running statistics included) and twin.json's ``router`` section, each written atomically
  (temporary file, then ``os.replace``), the router file first.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mergekit_like.errors import MergeError
from mergekit_like.io.manifest import update_manifest
from mergekit_like.twin.bundle import BUNDLE_DIR, ROUTER_FILE, info_path

ARCHITECTURE = ("Linear(d,h) > BatchNorm1d > LeakyReLU > Dropout(0.5) > Linear(h,h) > "
                "BatchNorm1d > LeakyReLU > Dropout(0.5) > Linear(h,T); h = min(2d, 1024)")
FEATURES = {"source": "shared model, corrections off", "layer": "hidden_states[-1] (after the final norm)",
            "pooling": "mean over non-padding tokens", "dtype": "float32"}
ROUTER_FORMAT = "mergekit_like.twin.router"
MAX_WIDTH = 1024


def hidden_width(d: int) -> int:
    """h = min(2d, 1024): the anchor's width 2d, capped."""
    return min(2 * d, MAX_WIDTH)


class TwinRouter(nn.Module):
    """features [B, d] float32 → logits [B, T] float32 (keys ``net.0.weight`` … ``net.8.bias``)."""

    def __init__(self, d: int, n_tasks: int, hidden: int | None = None):
        super().__init__()
        h = hidden_width(d) if hidden is None else hidden
        self.d, self.n_tasks, self.hidden = d, n_tasks, h
        self.net = nn.Sequential(
            nn.Linear(d, h), nn.BatchNorm1d(h), nn.LeakyReLU(), nn.Dropout(0.5),
            nn.Linear(h, h), nn.BatchNorm1d(h), nn.LeakyReLU(), nn.Dropout(0.5),
            nn.Linear(h, n_tasks))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)

    def weights(self, features: torch.Tensor) -> torch.Tensor:
        """w = softmax(logits) at temperature 1: [B, T] float32, rows sum to 1."""
        return torch.softmax(self(features.float()), dim=-1)


def mean_features(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                  position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """f[b] = Σ_l mask[b,l] · h[b,l] / Σ_l mask[b,l], h = ``hidden_states[-1]`` of ``model`` (a
    transformers causal LM; the last entry is after the final norm). ids, mask: [B, L] int64.
    Positions count real tokens only (``cumsum(mask) - 1``), so padding on either side gives the
    same features. Returns [B, d] float32; padded positions never enter (not even as NaN)."""
    if position_ids is None:
        position_ids = (mask.cumsum(dim=-1) - 1).clamp(min=0)
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                output_hidden_states=True, **keep)
    hidden = out.hidden_states[-1].float()
    real = mask.bool()[..., None]
    total = torch.where(real, hidden, torch.zeros_like(hidden)).sum(dim=1)
    return total / real.sum(dim=1).clamp(min=1)


@dataclass
class FitResult:
    """router: the best epoch's router (eval mode); best_epoch: 1-based; val_accuracy: None when
    there is no validation example (then the last epoch is kept); confusion: [T, T] int64 counts
    on the validation split (row = true task, column = predicted); val_loss: the validation
    cross-entropy of the task label; right_weight: (mean, min) over validation examples of the
    routing weight softmax(router(x))[true task] — how sure the kept router is."""

    router: TwinRouter
    best_epoch: int
    val_accuracy: float | None
    confusion: torch.Tensor
    val_loss: float | None = None
    right_weight: tuple[float, float] | None = None


def stratified_split(labels: Sequence[int], n_tasks: int, val_fraction: float,
                     gen: torch.Generator) -> tuple[list[int], list[int]]:
    """Per task, a seeded shuffle, then round(val_fraction · n) examples to validation, at least
    one when the task has two or more examples (and val_fraction > 0), and never all of them.
    Returns (train indices, validation indices), each sorted."""
    train, val = [], []
    for task in range(n_tasks):
        idx = [i for i, y in enumerate(labels) if y == task]
        order = [idx[k] for k in torch.randperm(len(idx), generator=gen).tolist()]
        n_val = round(val_fraction * len(idx))
        if val_fraction > 0 and len(idx) >= 2:
            n_val = max(1, n_val)
        n_val = min(n_val, len(idx) - 1)
        val += order[:n_val]
        train += order[n_val:]
    return sorted(train), sorted(val)


def fit_router(features: torch.Tensor, labels: torch.Tensor, n_tasks: int, *, lr: float,
               epochs: int, batch_size: int, seed: int, val_fraction: float) -> FitResult:
    """Train ``TwinRouter(d, T)`` on features [N, d] float32 and labels [N] int64 (task indices):
    AdamW(lr), mean cross-entropy, shuffled mini-batches (a last batch of one example joins the
    one before, as BatchNorm needs two). Everything random (split, init, shuffles, dropout) is
    seeded from ``seed``. Keeps the epoch with the best validation accuracy and, among equally
    accurate ones, the lowest validation cross-entropy: accuracy saturates early while the
    routing weights are still soft, and the merged model is only as good as those weights."""
    gen = torch.Generator().manual_seed(seed)
    train, val = stratified_split(labels.tolist(), n_tasks, val_fraction, gen)
    x_tr, y_tr, x_val, y_val = features[train], labels[train], features[val], labels[val]
    devices = [features.device] if features.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        router = TwinRouter(features.shape[1], n_tasks).to(features.device)
        opt = torch.optim.AdamW(router.parameters(), lr=lr)
        best, best_epoch, best_state = None, epochs, None
        for epoch in range(1, epochs + 1):
            router.train()
            for batch in _batches(torch.randperm(len(train), generator=gen), batch_size):
                loss = F.cross_entropy(router(x_tr[batch]), y_tr[batch])
                opt.zero_grad()
                loss.backward()
                opt.step()
            if len(val):
                acc, val_loss, _ = _validate(router, x_val, y_val)
                if best is None or (acc, -val_loss) > best:
                    best, best_epoch = (acc, -val_loss), epoch
                    best_state = copy.deepcopy(router.state_dict())
    if best_state is not None:
        router.load_state_dict(best_state)
    router.eval()
    confusion = torch.zeros(n_tasks, n_tasks, dtype=torch.long)
    if not len(val):
        return FitResult(router, best_epoch, None, confusion)
    acc, val_loss, right = _validate(router, x_val, y_val)
    pred = _predict(router, x_val).cpu()
    for t, p in zip(y_val.cpu().tolist(), pred.tolist()):
        confusion[t, p] += 1
    return FitResult(router, best_epoch, acc, confusion, val_loss,
                     (float(right.mean()), float(right.min())))


@torch.no_grad()
def _validate(router: TwinRouter, x: torch.Tensor, y: torch.Tensor
              ) -> tuple[float, float, torch.Tensor]:
    """(accuracy, mean cross-entropy, each example's weight on its true task [N])."""
    router.eval()
    logits = router(x)
    right = logits.softmax(dim=-1).gather(1, y.view(-1, 1)).view(-1)
    acc = float((logits.argmax(dim=-1) == y).float().mean())
    return acc, float(F.cross_entropy(logits, y)), right


def _batches(perm: torch.Tensor, size: int) -> list[torch.Tensor]:
    chunks = list(perm.split(size))
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2:] = [torch.cat(chunks[-2:])]
    return chunks


@torch.no_grad()
def _predict(router: TwinRouter, x: torch.Tensor) -> torch.Tensor:
    router.eval()
    return router(x).argmax(dim=-1)


def save_router(root: Path, router: TwinRouter, tasks: list[str], section: dict[str, Any]) -> None:
    """Write ``twin/router.safetensors`` (float32; ``num_batches_tracked`` left out), then set
    twin.json's ``router`` to ``section`` (plus file name and shapes). Both atomic, router first."""
    folder = Path(root) / BUNDLE_DIR
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in router.state_dict().items()
               if not k.endswith("num_batches_tracked")}
    meta = {"format": "pt", "mergekit_like": ROUTER_FORMAT, "tasks": json.dumps(tasks),
            "input_dim": str(router.d), "hidden_width": str(router.hidden), "temperature": "1.0"}
    tmp = folder / f".{ROUTER_FILE}.tmp"
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, folder / ROUTER_FILE)
    path = info_path(root)
    info = json.loads(path.read_text(encoding="utf-8"))
    info["router"] = {"file": ROUTER_FILE, "architecture": ARCHITECTURE, "input_dim": router.d,
                      "hidden_width": router.hidden, "tasks": list(tasks), "features": FEATURES,
                      "temperature": 1.0, **section}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    update_manifest(Path(root), [f"{BUNDLE_DIR}/{ROUTER_FILE}", f"{BUNDLE_DIR}/{path.name}"])


def load_router(path: Path, tasks: list[str], d: int) -> TwinRouter:
    """The router saved at ``path`` (eval mode, CPU, float32), checked against the bundle's tasks
    and the model's hidden size ``d``; any mismatch is a MergeError naming the file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        saved_tasks = json.loads(meta["tasks"])
        in_dim, width = int(meta["input_dim"]), int(meta["hidden_width"])
    except (OSError, KeyError, ValueError, TypeError, SafetensorError) as exc:
        raise MergeError(f"{path}: not a router file ({type(exc).__name__}: {exc})") from None
    if saved_tasks != list(tasks):
        raise MergeError(f"{path}: trained for tasks {saved_tasks}, the bundle has {list(tasks)} "
                         "(run train-router again)")
    if in_dim != d:
        raise MergeError(f"{path}: trained on {in_dim}-dim features, the model's are {d}-dim")
    router = TwinRouter(d, len(tasks), width)
    try:
        missing, unexpected = router.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise MergeError(f"{path}: tensors do not fit the router ({str(exc).splitlines()[0]})") from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise MergeError(f"{path}: tensor '{(missing or unexpected)[0]}' is "
                         f"{'missing' if missing else 'unexpected'}")
    return router.eval()
