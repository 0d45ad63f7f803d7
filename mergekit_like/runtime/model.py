"""Loading a checkpoint folder (any transformers causal LM, a merge output included) for runtime use.

transformers is an optional dependency (the ``[runtime]`` extra): it is imported only when a
model is loaded, and its absence is a one-line ``MergeError``.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergekit_like.device import resolve_device
from mergekit_like.errors import MergeError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
"""A folder holding any of these has a tokenizer; one holding none is loaded without one."""
SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class LoadedModel:
    """A causal LM ready for inference.

    model: a transformers ``PreTrainedModel`` with a causal-LM head, in eval mode, on ``device``.
    tokenizer: the folder's tokenizer, or None when the folder has no tokenizer files.
    device: where the model's parameters live (inputs must be moved there).
    """

    model: Any
    tokenizer: Any | None
    device: torch.device


def require_transformers():
    """The transformers module, or a one-line MergeError saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise MergeError("the runtime needs transformers: pip install 'mergekit_like[runtime]'") from None
    return transformers


def load_model(path: str | Path, device: str = "auto", dtype: torch.dtype = torch.float32,
               allow_pickle: bool = False) -> LoadedModel:
    """Load the checkpoint folder ``path`` (config.json + safetensors, single or sharded with an
    index) with ``AutoModelForCausalLM.from_pretrained(path, dtype=dtype)``, local files only,
    then move it to ``device`` (``auto`` = CUDA when available, else CPU) in eval mode.

    A missing folder, a folder without config.json, or a checkpoint transformers refuses is a
    MergeError naming the path. Pickle weights are refused unless ``allow_pickle``, and even
    then loaded weights-only (``check_pickle``).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise MergeError(f"{folder}: no such model folder")
    if not (folder / "config.json").is_file():
        raise MergeError(f"{folder}: no config.json (not a transformers checkpoint folder)")
    pickled = check_pickle(folder, allow_pickle)
    target = resolve_device(device)
    transformers = require_transformers()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, local_files_only=True, weights_only=True,
            use_safetensors=None if pickled else True)
    except (pickle.UnpicklingError, EOFError) as exc:
        raise pickle_error(folder, pickled, exc) from None
    except (OSError, ValueError, KeyError) as exc:
        raise MergeError(f"{folder}: cannot load the model: {_first_line(exc)}") from None
    model.to(target).eval()
    return LoadedModel(model=model, tokenizer=_load_tokenizer(folder, transformers), device=target)


def check_pickle(folder: str | Path, allow_pickle: bool) -> str | None:
    """The merge's rule for eval: a folder whose only weights are pickle (``pytorch_model.bin``
    or its index) is refused unless ``allow_pickle``; returns that file's name (None when the
    folder has safetensors weights, which transformers then loads instead)."""
    folder = Path(folder)
    if any((folder / name).is_file() for name in SAFETENSORS_WEIGHTS):
        return None
    found = next((name for name in PICKLE_WEIGHTS if (folder / name).is_file()), None)
    if found and not allow_pickle:
        raise MergeError(f"{folder}: only pickle weights ({found}); pickle can run code when "
                         "loaded — convert to safetensors or pass --allow-pickle")
    return found


def pickle_error(folder: Path, name: str | None, exc: BaseException) -> MergeError:
    """One line for a pickle that weights-only loading refused (it holds more than tensors)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    detail = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln),
                  lines[0] if lines else type(exc).__name__)
    return MergeError(f"{folder}: cannot load {name or 'the pickle weights'} as a weights-only "
                      f"state dict ({detail})")


def _load_tokenizer(folder: Path, transformers) -> Any | None:
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise MergeError(f"{folder}: cannot load the tokenizer: {_first_line(exc)}") from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
