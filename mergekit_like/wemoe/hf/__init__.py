"""WEMoE-upscaled checkpoints (docs/methods/wemoe.md §3): the HF config and modeling files that every WEMoE
output folder carries verbatim, plus helpers for the merge and the runtime.

Importing this package does not import transformers (an optional dependency): ``WEMoEConfig``
and ``WEMoEForCausalLM`` are loaded on first access.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
"""The folder holding the two files below."""
CODE_FILES = ("configuration_wemoe.py", "modeling_wemoe.py")
"""Copied byte for byte into every WEMoE output folder."""
AUTO_MAP = {"AutoConfig": "configuration_wemoe.WEMoEConfig",
            "AutoModelForCausalLM": "modeling_wemoe.WEMoEForCausalLM"}
"""config.json ``auto_map`` of a WEMoE output folder."""


def modeling_sha256() -> str:
    """sha256 hex digest of the installed modeling_wemoe.py (config ``wemoe.modeling_sha256``)."""
    return hashlib.sha256((SOURCE_DIR / "modeling_wemoe.py").read_bytes()).hexdigest()


def __getattr__(name: str):
    if name == "WEMoEConfig":
        from mergekit_like.wemoe.hf.configuration_wemoe import WEMoEConfig
        return WEMoEConfig
    if name == "WEMoEForCausalLM":
        from mergekit_like.wemoe.hf.modeling_wemoe import WEMoEForCausalLM
        return WEMoEForCausalLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AUTO_MAP", "CODE_FILES", "SOURCE_DIR", "WEMoEConfig", "WEMoEForCausalLM", "modeling_sha256"]
