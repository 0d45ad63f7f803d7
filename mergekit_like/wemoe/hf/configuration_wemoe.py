"""Configuration of a WEMoE-upscaled causal LM (docs/methods/wemoe.md §3).

This file is copied verbatim into every WEMoE output folder and loaded there as remote code, so
it imports only ``transformers``.

A WEMoE ``config.json`` holds every field of the base model's config flattened at top level
(``hidden_size``, ``num_hidden_layers``, ``vocab_size``, ``mlp_bias``, …) plus:

* ``model_type: "wemoe"``, ``architectures: ["WEMoEForCausalLM"]``, ``auto_map``;
* ``base_model_type`` (e.g. ``"llama"``) and ``base_architectures`` (e.g. ``["LlamaForCausalLM"]``);
* ``wemoe``: ``{format_version, tasks, lambda, router_hidden, expert_storage, expert_density,
  expert_rank, routing, forward, materialize_budget_mb, modeling_sha256}``.

Unknown keyword arguments become attributes (transformers' config behaviour), so every field
survives ``save_pretrained`` → ``from_pretrained``.
"""

from transformers import PretrainedConfig

WEMOE_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path",
              "wemoe", "base_model_type", "base_architectures", "output_attentions")
"""Top-level keys that belong to the WEMoE wrapper, not to the base model's config."""


class WEMoEConfig(PretrainedConfig):
    """The flattened base config plus ``base_model_type``, ``base_architectures`` and ``wemoe``."""

    model_type = "wemoe"

    def base_config_kwargs(self) -> dict:
        """The base model's config fields: every serialised field but the wrapper's own."""
        fields = {k: v for k, v in self.to_dict().items() if k not in WEMOE_KEYS}
        fields["architectures"] = list(getattr(self, "base_architectures", None) or [])
        return fields
