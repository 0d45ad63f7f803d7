"""Routed inference on a Twin bundle (docs/methods/twin.md §8): the shared model plus per-sample low-rank
corrections, mixed by the router.

``load_twin(bundle)`` loads the shared model and wraps every module that has exclusive parts:

* ``nn.Linear`` (lowrank weight): ``y = W_s x + b_s + Σ_t w[b,t] · A_t (B_t x)`` with the
  stacked factors A [T, out, r], B [T, r, in]; no per-sample weight is ever formed. With a dense
  bias part δ [T, out]: ``+ Σ_t w[b,t] δ_t``.
* ``nn.Embedding`` (lowrank weight, ``include_embeddings``): ``y[b,l] = E[id] + Σ_t w[b,t] ·
  A_t[id] B_t`` (rows of A gathered); a tied ``lm_head`` gets the same factors as a Linear.
* norms (LayerNorm/RMSNorm gains and biases, ``dense_small``): with n(x) the norm without its
  gain, ``y = n(x) ⊙ (g + Σ_t w[b,t] δ_t) (+ b + Σ_t w[b,t] β_t)``.

Any other exclusive tensor makes ``load_twin`` refuse the bundle, naming it (``twin materialize``
handles every kind). The returned model routes each prefill call itself (pass 1: shared model
only → features → router → w [B, T] = softmax(logits)), then runs pass 2 with the corrections;
decode steps (a non-empty KV cache) reuse the prefill's w. ``forward(..., twin_weights=w)`` or
``set_weights(w)`` skips the router.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from mergekit_like.errors import MergeError
from mergekit_like.runtime.cache import cache_keyword, cache_length, pop_cache
from mergekit_like.runtime.hooks import replace_modules
from mergekit_like.runtime.model import LoadedModel, load_model
from mergekit_like.twin.bundle import TwinBundle
from mergekit_like.twin.router import load_router, mean_features

Weights = torch.Tensor | Sequence[float] | Mapping[str, float]


class RoutingState:
    """The routing weights of the current forward, shared by every wrapped module:
    ``weights`` [B, T] (model dtype) during pass 2, None (corrections off) otherwise."""

    def __init__(self) -> None:
        self.weights: torch.Tensor | None = None

    @contextmanager
    def using(self, weights: torch.Tensor | None):
        prior, self.weights = self.weights, weights
        try:
            yield
        finally:
            self.weights = prior


def _per_sample(w: torch.Tensor, x: torch.Tensor, width: int) -> torch.Tensor:
    """w [B, width] viewed as [B, 1, …, 1, width] to broadcast over x [B, …, ·]."""
    if x.shape[0] != w.shape[0]:
        raise MergeError(f"routing weights are for {w.shape[0]} samples, the batch has {x.shape[0]}")
    return w.reshape(w.shape[0], *([1] * (x.ndim - 2)), width)


class TwinLinear(nn.Module):
    """A Linear plus routed corrections. up [out, T·r] = A stacked by task along columns,
    down [T·r, in] = B stacked along rows, so Σ_t w_t A_t (B_t x) = up ((down x) ⊙ w⊗1_r)."""

    def __init__(self, base: nn.Linear, state: RoutingState, A: torch.Tensor | None,
                 B: torch.Tensor | None, bias: torch.Tensor | None):
        super().__init__()
        self.base, self.state = base, state
        self.rank = 0 if A is None else A.shape[2]
        if A is not None:
            t, out, r = A.shape
            self.register_buffer("up", A.permute(1, 0, 2).reshape(out, t * r).contiguous())
            self.register_buffer("down", B.reshape(t * r, B.shape[2]).contiguous())
        self.register_buffer("bias_delta", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        w = self.state.weights
        if w is None:
            return y
        if self.rank:
            scale = _per_sample(w.repeat_interleave(self.rank, dim=1), x, self.down.shape[0])
            y = y + F.linear(F.linear(x, self.down) * scale, self.up)
        if self.bias_delta is not None:
            y = y + _per_sample(w @ self.bias_delta, x, self.bias_delta.shape[1])
        return y


class TwinEmbedding(nn.Module):
    """An Embedding plus routed corrections: A [T, vocab, r], B [T, r, d]."""

    def __init__(self, base: nn.Embedding, state: RoutingState, A: torch.Tensor, B: torch.Tensor):
        super().__init__()
        self.base, self.state = base, state
        self.register_buffer("A", A)
        self.register_buffer("B", B)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.base(ids)
        w = self.state.weights
        if w is None:
            return y
        rows = self.A[:, ids].movedim(0, -2)                    # [B, L, T, r]
        mixed = rows * _per_sample(w, rows[..., 0], w.shape[1])[..., None]
        return y + torch.einsum("b...tr,trd->b...d", mixed, self.B)


class TwinNorm(nn.Module):
    """A LayerNorm/RMSNorm plus routed gain (and bias) deltas, each [T, d]. The gain-free norm is
    n(x) = f(x; g=1) − f(x; g=0), which holds for y = g ⊙ n(x) + b and for Gemma's (1 + g) form."""

    def __init__(self, base: nn.Module, state: RoutingState, gain: torch.Tensor | None,
                 bias: torch.Tensor | None):
        super().__init__()
        self.base, self.state = base, state
        self.register_buffer("gain_delta", gain)
        self.register_buffer("bias_delta", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        w = self.state.weights
        if w is None:
            return y
        if self.gain_delta is not None:
            g = self.base.weight
            normed = (functional_call(self.base, {"weight": torch.ones_like(g)}, (x,))
                      - functional_call(self.base, {"weight": torch.zeros_like(g)}, (x,)))
            y = y + normed * _per_sample(w @ self.gain_delta, y, g.shape[0])
        if self.bias_delta is not None:
            y = y + _per_sample(w @ self.bias_delta, y, self.bias_delta.shape[1])
        return y


class TwinModel(nn.Module):
    """The shared causal LM with routed corrections, called like a transformers causal LM
    (``input_ids``, ``attention_mask``, ``position_ids``, ``cache`` (or its transformers-5.0 name
    ``past_key_values``), ``use_cache``, ``logits_to_keep``; returns the inner model's output);
    the cache reaches the inner model under the keyword that model takes. Not a
    ``GenerationMixin``: decode with your own loop (e.g. ``runtime.evaluate.greedy_continuations``).

    Per call, w [B, T] is, in this order: ``twin_weights``/``weights`` given to forward; the
    weights fixed by ``set_weights``; on a prefill (no or empty KV cache) the router's
    ``softmax(router(features))`` (pass 1, corrections off); on a decode step the last call's w.
    ``last_weights`` holds the w of the last call (float32).
    """

    def __init__(self, model: nn.Module, tasks: list[str], router: nn.Module | None,
                 state: RoutingState):
        super().__init__()
        self.model, self.router, self.tasks, self.state = model, router, list(tasks), state
        self.fixed: torch.Tensor | None = None
        self.last_weights: torch.Tensor | None = None

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.model.get_output_embeddings()

    def set_weights(self, weights: Weights | None) -> None:
        """Fix w for every later call ([T], [B, T] or {task: weight}); None: route again."""
        self.fixed = None if weights is None else self.as_weights(weights, None)

    def as_weights(self, weights: Weights, batch: int | None) -> torch.Tensor:
        """weights as float32 [B, T] on the model's device ([1, T] when batch is None); a
        mapping names tasks (the others get 0), a [T] vector applies to every sample."""
        if isinstance(weights, Mapping):
            unknown = [k for k in weights if k not in self.tasks]
            if unknown:
                raise MergeError(f"unknown task '{unknown[0]}' in the routing weights (the "
                                 f"bundle's tasks: {', '.join(self.tasks)})")
            weights = [float(weights.get(t, 0.0)) for t in self.tasks]
        w = torch.as_tensor(weights, dtype=torch.float32, device=self.device)
        if w.ndim == 1:
            w = w[None]
        rows = batch if batch is not None else w.shape[0]
        if w.ndim != 2 or w.shape[1] != len(self.tasks) or w.shape[0] not in (1, rows):
            raise MergeError(f"routing weights of shape {list(w.shape)}: expected "
                             f"[{len(self.tasks)}] or [batch, {len(self.tasks)}]")
        if not torch.isfinite(w).all():
            raise MergeError("routing weights must be finite")
        return w.expand(rows, -1)

    @torch.no_grad()
    def route(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Pass 1: w = softmax(router(mean_features(shared model))), [B, T] float32."""

        if self.router is None:
            raise MergeError("bundle has no router; run train-router or pass weights")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        with self.state.using(None):
            features = mean_features(self.model, input_ids, mask, position_ids)
        return self.router.weights(features)

    def forward(self, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache: Any = None, use_cache: bool | None = None, logits_to_keep: int = 0,
                twin_weights: Weights | None = None, weights: Weights | None = None, **kwargs):
        cache = pop_cache(kwargs, cache)
        given = twin_weights if twin_weights is not None else weights
        batch = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape[0]
        if given is not None or self.fixed is not None:
            w = self.as_weights(given if given is not None else self.fixed, batch)
        elif cache_length(cache) == 0:
            if input_ids is None:
                raise MergeError("routing needs input_ids (or pass weights)")
            w = self.route(input_ids, attention_mask, position_ids)
        elif self.last_weights is not None and self.last_weights.shape[0] == batch:
            w = self.last_weights
        else:
            raise MergeError("a decode step needs the routing weights of its prefill call")
        self.last_weights = w
        extra = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
        if cache is not None:
            extra[cache_keyword(self.model)] = cache
        with self.state.using(w.to(self.dtype)):
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids, use_cache=use_cache, **extra, **kwargs)


def load_twin(bundle: str | Path, device: str | None = "auto",
              dtype: torch.dtype | None = torch.float32) -> LoadedModel:
    """The bundle's shared model with every exclusive part wrapped in (factors in ``dtype`` on
    ``device``) and its router when ``twin/router.safetensors`` exists; a LoadedModel whose
    ``model`` is a ``TwinModel`` in eval mode. An exclusive tensor the runtime cannot apply is a
    MergeError naming it."""

    dtype = dtype or torch.float32
    with TwinBundle(bundle) as tb:
        loaded = load_model(tb.root, device or "auto", dtype)
        plan = _collect(tb, loaded.model, dtype, loaded.device)
        tasks, router_path = list(tb.tasks), tb.router_path
    state = RoutingState()
    replace_modules(loaded.model, lambda name, _: name in plan,
                    lambda name, module: _wrapper(module, plan[name], state))
    router = None
    if router_path.is_file():
        embed = loaded.model.get_input_embeddings()
        d = getattr(loaded.model.config, "hidden_size", None) or embed.embedding_dim
        router = load_router(router_path, tasks, d).to(loaded.device)
    twin = TwinModel(loaded.model, tasks, router, state).eval()
    return LoadedModel(model=twin, tokenizer=loaded.tokenizer, device=loaded.device)


def _is_norm(module: nn.Module | None) -> bool:
    weight = getattr(module, "weight", None)
    return (isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or "norm" in type(module).__name__.lower()) \
        and isinstance(weight, torch.Tensor) and weight.ndim == 1


def _slot(module: nn.Module | None, param: str, kind: str) -> str | None:
    """Which part of a wrapper carries the exclusive tensor ``<module>.<param>``, or None."""
    if kind == "lowrank" and param == "weight" and isinstance(module, (nn.Linear, nn.Embedding)):
        return "factors"
    if kind == "dense" and param == "bias" and (isinstance(module, nn.Linear) or _is_norm(module)):
        return "bias"
    if kind == "dense" and param == "weight" and _is_norm(module):
        return "gain"
    return None


def _collect(tb, model: nn.Module, dtype: torch.dtype, device: torch.device) -> dict[str, dict]:
    """module name → {"A": [T, out, r], "B": [T, r, in], "bias": [T, n], "gain": [T, n]} (the
    parts present), read from every task and stacked in task order."""
    modules = dict(model.named_modules())
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = out is not None and out.weight is inp.weight
    plan: dict[str, dict] = {}
    for name, entry in tb.entries.items():
        if entry.kind == "shared_only":
            continue
        mod_name, _, param = name.rpartition(".")
        module = modules.get(mod_name)
        slot = _slot(module, param, entry.kind)
        own = getattr(module, param, None) if slot else None
        if slot is None or not isinstance(own, torch.Tensor) or tuple(own.shape) != tuple(entry.shape):
            what = "no module of that name" if module is None else type(module).__name__
            raise MergeError(f"{tb.root}: the runtime cannot apply the {entry.kind} exclusive part "
                             f"of tensor '{name}' ({what}); use `mergekit-like twin materialize`")
        parts = [tb.exclusive(task, name) for task in tb.tasks]
        stack = [torch.stack([p[k] for p in parts]).to(device=device, dtype=dtype)
                 for k in range(len(parts[0]))]
        target = plan.setdefault(mod_name, {})
        if slot == "factors":
            target["A"], target["B"] = stack
        else:
            target[slot] = stack[0]
        if slot == "factors" and module is inp and tied:  # the lm_head shares E, so E's part
            out_name = next(n for n, m in modules.items() if m is out)
            if out_name + ".weight" not in tb.entries:
                plan.setdefault(out_name, {}).update(A=stack[0], B=stack[1])
    return plan


def _wrapper(module: nn.Module, parts: dict, state: RoutingState) -> nn.Module:
    if isinstance(module, nn.Embedding):
        return TwinEmbedding(module, state, parts["A"], parts["B"])
    if isinstance(module, nn.Linear):
        return TwinLinear(module, state, parts.get("A"), parts.get("B"), parts.get("bias"))
    return TwinNorm(module, state, parts.get("gain"), parts.get("bias"))
