"""WEMoE-upscaled causal LM (docs/methods/wemoe.md §1, §3): the base architecture with every decoder MLP replaced
by a weight-ensembling MoE module.

This file is copied verbatim into every WEMoE output folder and loaded there as remote code, so
it imports only ``torch``, ``transformers`` and its sibling ``configuration_wemoe``.

Per decoder layer (T tasks, MLP input h [B, N, d], attention mask m [B, N], 1 = real token)::

    r_tok = fc2(ReLU(fc1(h)))                       [B, N, T], float32 (fc1: d→h_r, fc2: h_r→T)
    r     = Σ_n m[b,n]·r_tok[b,n] / Σ_n m[b,n]      [B, T], raw (no softmax)
    W_p(b) = W0_p + Σ_t r[b,t]·τ_t,p,  b_p(b) = b0_p + Σ_t r[b,t]·δb_t,p   for p in gate/up/down
    out   = down_b(act(gate_b(h)) * up_b(h))        with the per-sample weights, the base's act_fn

Forward paths per Linear (out×in): ``factored`` y = W0 x + b0 + Σ_t r_t (τ_t x + δb_t), used for
decode steps (N = 1) and when one sample's weight exceeds the budget; ``materialized``
W(b) = W0 + Σ_t r[b,t] τ_t in chunks of samples with chunk·out·in·bytes ≤ materialize_budget_mb,
then a batched matmul (N > 1); low-rank experts always y = W0 x + b0 + Σ_t r_t A_t (B_t x).
``config.wemoe["forward"]`` forces factored/materialized. Sparse experts are densified to
[T, out, in] on first use. At generation r comes from the prompt (prefill), is cached per sample
and reused while the KV cache is non-empty.

KV cache keyword: transformers 5.0 passes it as ``past_key_values``, later 5.x releases as ``cache``
(the old name a deprecated alias). ``forward`` accepts either and hands the cache to the base model
under the keyword the base model's forward declares, so ``generate()`` decodes with the prompt's
routing on every supported release.
"""

import inspect
import math
import shutil
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, GenerationMixin, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from .configuration_wemoe import WEMoEConfig

LINEARS = ("gate_proj", "up_proj", "down_proj")
STORAGES = ("dense", "sparse", "lowrank")
PATHS = ("auto", "factored", "materialized")


class WEMoEState:
    """Shared by every WEMoE MLP of one model, set by ``WEMoEForCausalLM.forward``: ``mask``
    [B, N_total] or None; ``reuse`` (decode step: use each layer's cached r); ``routing``
    [L, B, T] forced r or None; ``fixed`` [T]: one r for every sample and layer until unset
    (``WEMoEForCausalLM.fix_routing``); ``path``; ``budget_bytes``."""

    def __init__(self, path: str, budget_mb: float):
        self.mask, self.reuse, self.routing, self.fixed = None, False, None, None
        self.path, self.budget_bytes = path, int(budget_mb * 2 ** 20)


class WEMoERouter(nn.Module):
    """fc1: Linear(d, h_r) → ReLU → fc2: Linear(h_r, T), float32. h [..., d] → r_tok [..., T]."""

    def __init__(self, d: int, hidden: int, tasks: int):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden, dtype=torch.float32)
        self.fc2 = nn.Linear(hidden, tasks, dtype=torch.float32)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(h.to(self.fc1.weight.dtype))))


def _param(*shape) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape), requires_grad=False)


class WEMoEExperts(nn.Module):
    """The T task vectors of one Linear (out×in) in one of three storages:
    dense ``weight`` [T, out, in]; sparse ``weight_values`` / ``weight_indices`` [T, k] (flat
    row-major indices into out×in); lowrank ``weight_A`` [T, out, r] and ``weight_B`` [T, r, in].
    ``bias`` [T, out] (dense) when the base Linear has a bias."""

    def __init__(self, storage: str, tasks: int, out: int, inp: int, bias: bool, k: int = 0, rank: int = 0):
        super().__init__()
        self.storage, self.shape = storage, (tasks, out, inp)
        if storage == "dense":
            self.weight = _param(tasks, out, inp)
        elif storage == "sparse":
            self.weight_values = _param(tasks, k)
            index_dtype = torch.int64 if out * inp >= 2 ** 31 else torch.int32
            self.register_buffer("weight_indices", torch.zeros(tasks, k, dtype=index_dtype))
        else:
            self.weight_A, self.weight_B = _param(tasks, out, rank), _param(tasks, rank, inp)
        self.bias = _param(tasks, out) if bias else None
        self._cache = (None, None)

    def dense(self) -> torch.Tensor:
        """τ stacked, [T, out, in] (sparse: scattered once and cached; lowrank: A @ B)."""
        if self.storage == "dense":
            return self.weight
        if self.storage == "lowrank":
            return self.weight_A @ self.weight_B
        values, idx = self.weight_values, self.weight_indices
        key = (values.data_ptr(), values._version, values.dtype, idx.data_ptr(), idx._version)
        cached_key, cached = self._cache
        if cached_key != key or (cached.is_inference() and not torch.is_inference_mode_enabled()):
            flat = values.new_zeros(self.shape[0], self.shape[1] * self.shape[2])
            cached = flat.scatter_(1, idx.long(), values.detach()).view(self.shape)
            self._cache = (key, cached)
        return cached


class WEMoEMLP(nn.Module):
    """A decoder MLP upscaled per docs/methods/wemoe.md §1: ``base`` (the pre-trained MLP θ0, whose act_fn is
    reused), ``experts`` (one WEMoEExperts per Linear) and ``router``. h [B, N, d] → [B, N, d]."""

    def __init__(self, base: nn.Module, state: WEMoEState, layer_index: int, tasks: int, hidden: int,
                 storage: str, density, rank):
        super().__init__()
        self.base, self.layer_index, self._state = base, layer_index, state
        experts = {}
        for name in LINEARS:
            lin = getattr(base, name)
            out, inp = lin.weight.shape
            k = max(1, math.floor(density * (out * inp))) if storage == "sparse" else 0
            r = _rank(rank, min(out, inp)) if storage == "lowrank" else 0
            experts[name] = WEMoEExperts(storage, tasks, out, inp, lin.bias is not None, k, r)
        self.experts = nn.ModuleDict(experts)
        self.router = WEMoERouter(base.gate_proj.weight.shape[1], hidden, tasks)
        self.cached_r = self.live_r = None

    def route(self, h: torch.Tensor) -> torch.Tensor:
        """r [B, T] float32: the masked mean over real tokens of the per-token router outputs
        (or the prefill's r on decode steps; or the forced routing)."""
        state = self._state
        if state.fixed is not None:
            r = state.fixed.to(h.device, torch.float32).expand(h.shape[0], -1)
        elif state.routing is not None:
            r = state.routing[self.layer_index].to(torch.float32)
        elif state.reuse and self.cached_r is not None:
            r = self.cached_r
        else:
            r_tok = self.router(h)
            n = h.shape[1]
            m = torch.ones(h.shape[:2], device=h.device) if state.mask is None else state.mask[:, -n:]
            m = (m > 0)[..., None]
            r = torch.where(m, r_tok, 0.0).sum(1) / m.sum(1).clamp(min=1).to(r_tok.dtype)
        if r.shape[0] != h.shape[0]:
            raise ValueError(f"WEMoE routing has {r.shape[0]} samples, the batch has {h.shape[0]}")
        self.cached_r = r.detach()
        self.live_r = r  # with its graph, for train-router's routing objective
        return r

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        r = self.route(h).to(h.dtype)
        path = self._state.path
        if path == "auto":
            path = "factored" if h.shape[1] == 1 else "materialized"
        gate = self._linear("gate_proj", h, r, path)
        up = self._linear("up_proj", h, r, path)
        return self._linear("down_proj", self.base.act_fn(gate) * up, r, path)

    def _linear(self, name: str, x: torch.Tensor, r: torch.Tensor, path: str) -> torch.Tensor:
        """x [B, N, in], r [B, T] → [B, N, out] with W(b) = W0 + Σ_t r[b,t] τ_t (+ bias likewise)."""
        lin, experts = getattr(self.base, name), self.experts[name]
        w0, b0 = lin.weight, lin.bias
        if experts.storage == "lowrank":
            y = F.linear(x, w0, b0)
            u = torch.einsum("bni,tri->bntr", x, experts.weight_B) * r[:, None, :, None]
            y = y + torch.einsum("bntr,tor->bno", u, experts.weight_A)
        else:
            tau = experts.dense()
            chunk = self._state.budget_bytes // max(1, w0.numel() * w0.element_size())
            if path == "factored" or chunk < 1:
                y = F.linear(x, w0, b0)
                for t in range(tau.shape[0]):
                    y = y + r[:, t, None, None] * F.linear(x, tau[t])
            else:
                parts = []
                for s in range(0, x.shape[0], chunk):
                    w = w0 + torch.einsum("bt,toi->boi", r[s:s + chunk], tau)
                    parts.append(torch.bmm(x[s:s + chunk], w.transpose(1, 2)))
                y = torch.cat(parts) if len(parts) > 1 else parts[0]
                if b0 is not None:
                    y = y + b0
        if experts.bias is not None:
            y = y + (r @ experts.bias)[:, None, :]
        return y


def _rank(rank, full: int) -> int:
    """Twin's rank grammar: a float is a fraction of min(out, in), an int an absolute rank."""
    return max(1, math.floor(rank * full)) if isinstance(rank, float) else min(int(rank), full)


def _cache_keyword(module: nn.Module) -> str:
    """The keyword under which ``module``'s forward takes the KV cache: ``cache`` (transformers
    after 5.0) or ``past_key_values`` (5.0)."""
    params = inspect.signature(type(module).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_length(cache) -> int:
    """Tokens held by a KV cache (0 for None or an empty one)."""
    if cache is None:
        return 0
    length = getattr(cache, "get_seq_length", None)
    return int(length()) if callable(length) else len(cache)


def _check_mlp(mlp, model_type: str) -> None:
    names = {n for n, _ in mlp.named_children()} if isinstance(mlp, nn.Module) else set()
    linear = all(isinstance(getattr(mlp, n, None), nn.Linear) for n in LINEARS)
    if not (linear and callable(getattr(mlp, "act_fn", None)) and names <= {*LINEARS, "act_fn"}):
        raise ValueError(f"WEMoE supports decoder MLPs made of gate_proj/up_proj/down_proj Linear "
                         f"layers and act_fn (Llama family); model type {model_type!r} has "
                         f"{type(mlp).__name__} with {sorted(names)}")


def _read_wemoe(config) -> dict:
    w = getattr(config, "wemoe", None)
    if not isinstance(w, dict):
        raise ValueError("WEMoE config has no 'wemoe' block")
    if w.get("format_version") != 1:
        raise ValueError(f"unsupported WEMoE format_version {w.get('format_version')!r} (expected 1)")
    if not isinstance(w.get("tasks"), list) or len(w["tasks"]) < 2:
        raise ValueError("WEMoE config needs at least 2 tasks in wemoe.tasks")
    if w.get("expert_storage", "dense") not in STORAGES:
        raise ValueError(f"WEMoE expert_storage must be one of {STORAGES}, got {w.get('expert_storage')!r}")
    density, rank = w.get("expert_density"), w.get("expert_rank")
    if w.get("expert_storage") == "sparse" and not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise ValueError(f"WEMoE sparse experts need expert_density in (0, 1], got {density!r}")
    if w.get("expert_storage") == "lowrank" and (isinstance(rank, bool) or not isinstance(rank, (int, float))
                                                 or rank <= 0):
        raise ValueError(f"WEMoE low-rank experts need a positive expert_rank, got {rank!r}")
    if w.get("forward", "auto") not in PATHS:
        raise ValueError(f"WEMoE forward must be one of {PATHS}, got {w.get('forward')!r}")
    if w.get("routing", "sample") != "sample":
        raise ValueError(f"WEMoE routing {w.get('routing')!r} is not supported (only 'sample')")
    return w


class WEMoEForCausalLM(PreTrainedModel, GenerationMixin):
    """The base causal LM (built from ``base_model_type`` + the flattened fields) whose top-level
    children (``model``, ``lm_head``) are registered here, so parameter names equal the
    checkpoint's, with every ``<layers>.<l>.mlp`` replaced by a WEMoEMLP. The base model's forward
    runs the computation; this forward only hands the attention mask and the decode flag to the
    MLPs. ``forward(..., wemoe_routing=r)`` with r [L, B, T] forces the routing."""

    config_class = WEMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = _supports_flash_attn = _supports_flex_attn = True
    _keep_in_fp32_modules_strict = ["router"]

    def __init__(self, config: WEMoEConfig):
        super().__init__(config)
        w = _read_wemoe(config)
        model_type = getattr(config, "base_model_type", None)
        base_cfg = AutoConfig.for_model(model_type, **config.base_config_kwargs())
        base_cfg._attn_implementation = config._attn_implementation
        inner = MODEL_FOR_CAUSAL_LM_MAPPING[type(base_cfg)](base_cfg)
        self.__dict__["_inner"] = inner
        self._cache_keyword = _cache_keyword(inner)
        self._tied_weights_keys = dict(type(inner)._tied_weights_keys or {})
        config.tie_word_embeddings = bool(getattr(base_cfg, "tie_word_embeddings", False))
        self.wemoe_state = WEMoEState(w.get("forward", "auto"), w.get("materialize_budget_mb", 1024))
        layers = getattr(inner.get_decoder(), "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(f"WEMoE cannot find the decoder layers of model type {model_type!r}")
        storage, tasks = w.get("expert_storage", "dense"), len(w["tasks"])
        hidden = int(w.get("router_hidden") or base_cfg.hidden_size)
        self._wemoe_mlps = []
        for index, layer in enumerate(layers):
            _check_mlp(getattr(layer, "mlp", None), model_type)
            layer.mlp = WEMoEMLP(layer.mlp, self.wemoe_state, index, tasks, hidden, storage,
                                 w.get("expert_density"), w.get("expert_rank"))
            self._wemoe_mlps.append(layer.mlp)
        for name, child in list(inner.named_children()):
            self.add_module(name, child)
        self.post_init()

    def wemoe_mlps(self) -> list:
        """The WEMoEMLP of every decoder layer, in layer order."""
        return list(self._wemoe_mlps)

    def router_parameters(self) -> list:
        """Every router parameter (fc1/fc2 weights and biases of every layer), for training."""
        return [p for mlp in self._wemoe_mlps for p in mlp.router.parameters()]

    def routing_weights(self) -> torch.Tensor:
        """The r of the last forward, [L, B, T] float32 (detached)."""
        return torch.stack([mlp.cached_r for mlp in self._wemoe_mlps])

    def fix_routing(self, weights: torch.Tensor | None) -> None:
        """Route every sample of every later forward (generation included) with ``weights``
        [T] in every layer — e.g. one-hot to a task, the oracle routing — until called with
        None."""
        self.wemoe_state.fixed = None if weights is None else weights.detach().to(torch.float32)

    def set_forward_path(self, path: str, budget_mb: float | None = None) -> None:
        """Force ``auto``/``factored``/``materialized`` (and optionally the budget in MB)."""
        if path not in PATHS:
            raise ValueError(f"WEMoE forward must be one of {PATHS}, got {path!r}")
        self.wemoe_state.path = path
        if budget_mb is not None:
            self.wemoe_state.budget_bytes = int(budget_mb * 2 ** 20)

    def get_input_embeddings(self):
        return self._inner.get_input_embeddings()

    def set_input_embeddings(self, value):
        self._inner.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self._inner.get_output_embeddings()

    def set_output_embeddings(self, value):
        self._inner.set_output_embeddings(value)

    def train(self, mode: bool = True):
        self._inner.training = mode
        return super().train(mode)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0,
                wemoe_routing=None, **kwargs):
        """The base model's forward. attention_mask [B, past + N] (2-D, or None = every token
        counts); a non-empty KV cache (``cache``, or ``past_key_values`` as transformers 5.0
        names it) makes this a decode step (cached r reused)."""
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("WEMoE needs a 2-D attention mask [batch, length] (1 = real token)")
        legacy = kwargs.pop("past_key_values", None)
        if legacy is not None:
            if cache is not None:
                raise ValueError("pass the KV cache once, as cache or past_key_values")
            cache = legacy
        state = self.wemoe_state
        state.mask, state.routing = attention_mask, wemoe_routing
        state.reuse = _cache_length(cache) > 0
        if cache is not None:
            kwargs[self._cache_keyword] = cache
        try:
            return self._inner(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, inputs_embeds=inputs_embeds,
                               labels=labels, use_cache=use_cache,
                               logits_to_keep=logits_to_keep, **kwargs)
        finally:
            state.routing = None

    def generate(self, *args, **kwargs):
        """GenerationMixin.generate; beam search (num_beams > 1) is refused in v1."""
        gen_config = kwargs.get("generation_config") or self.generation_config
        if (kwargs.get("num_beams") or getattr(gen_config, "num_beams", 1) or 1) > 1:
            raise ValueError("WEMoE does not support beam search (num_beams > 1)")
        return super().generate(*args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save_pretrained, plus a copy of the two WEMoE code files (auto_map)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        for module in (sys.modules[WEMoEConfig.__module__], sys.modules[__name__]):
            source = Path(module.__file__)
            target = Path(save_directory) / source.name
            if not target.exists() or target.read_bytes() != source.read_bytes():
                shutil.copyfile(source, target)
