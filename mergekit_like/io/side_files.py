"""Non-weight output files: config.json, tokenizer and processor files, the model card
(docs/output_format.md §8–§9, docs/hub.md §4)."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import torch
import yaml

from mergekit_like import __version__
from mergekit_like.dtypes import RECIPE_DTYPES, TORCH_TO_NAME
from mergekit_like.io.containment import UnsafeSideFile
from mergekit_like.io.source import CheckpointSource

TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)
CONFIG_DONOR_FILES: tuple[str, ...] = (
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
)
DTYPE_KEYS: tuple[str, ...] = ("torch_dtype", "dtype")
_NEVER_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf",
                   ".onnx", ".npz", ".pkl")
_NEVER_NAMES = ("README.md", ".gitattributes")


# ---- config.json ---------------------------------------------------------------------------

def _dtype_name(dtype: str | torch.dtype) -> str:
    if isinstance(dtype, torch.dtype):
        if dtype not in TORCH_TO_NAME:
            raise ValueError(f"not a floating output dtype: {dtype}")
        return TORCH_TO_NAME[dtype]
    name = dtype[len("torch."):] if dtype.startswith("torch.") else dtype
    if name not in RECIPE_DTYPES:
        raise ValueError(f"not a floating output dtype: {dtype!r}")
    return name


def _update_nested(node: Any, name: str) -> None:
    if isinstance(node, dict):
        for key in DTYPE_KEYS:
            if key in node and (node[key] is None or isinstance(node[key], str)):
                node[key] = name
        for value in node.values():
            _update_nested(value, name)


def updated_config(donor: dict, dtype_name: str | torch.dtype) -> str:
    """The donor's config.json text with its dtype key(s) set to ``dtype_name`` (§8).

    ``torch_dtype`` and/or ``dtype`` are updated where present (top level and nested
    sub-configs); if the top level has neither, ``torch_dtype`` is added. Key order and every
    other field are kept. indent=2 and a trailing newline."""
    name = _dtype_name(dtype_name)
    config = copy.deepcopy(donor)
    _update_nested(config, name)
    if not any(k in config for k in DTYPE_KEYS):
        config["torch_dtype"] = name
    return json.dumps(config, indent=2, ensure_ascii=False) + "\n"


def main_dtype_name(outputs: list[Any]) -> str:
    """Name of the floating dtype holding most output bytes (items with .shape and .dtype);
    float32 when nothing is floating."""
    totals: dict[torch.dtype, int] = {}
    for o in outputs:
        if o.dtype.is_floating_point and o.dtype in TORCH_TO_NAME:
            n = 1
            for s in o.shape:
                n *= s
            totals[o.dtype] = totals.get(o.dtype, 0) + n * o.dtype.itemsize
    if not totals:
        return "float32"
    return TORCH_TO_NAME[max(totals, key=totals.__getitem__)]


# ---- copied files ----------------------------------------------------------------------------

def _never_copy(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base in _NEVER_NAMES or name.lower().endswith(_NEVER_SUFFIXES)


def _auto_map_files(auto_map: Any) -> list[str]:
    """Python files named by an ``auto_map`` ("module.Class", lists for tokenizers; code from
    another repo, "org/repo--module.Class", is left out)."""
    refs: list[str] = []
    if isinstance(auto_map, dict):
        for value in auto_map.values():
            refs.extend(value if isinstance(value, (list, tuple)) else [value])
    files: list[str] = []
    for ref in refs:
        if not isinstance(ref, str) or "--" in ref or "." not in ref:
            continue
        module = ref.rsplit(".", 1)[0]
        fname = module.replace(".", "/") + ".py"
        if fname not in files:
            files.append(fname)
    return files


def _copy(folder: Any, donor: CheckpointSource, fname: str, warnings: list[str]) -> bytes | None:
    """Copy one file of ``donor`` into the output; its bytes, or None (and a warning naming it)
    when the source refuses it: a link out of the model's folder, or not a regular file."""
    try:
        data = donor.fetch_file(fname).read_bytes()
    except UnsafeSideFile as exc:
        warnings.append(exc.warning)
        return None
    folder.write_side_file(fname, data)
    return data


def _copy_code(folder: Any, donor: CheckpointSource, auto_map: Any, available: set[str],
               what: str, warnings: list[str]) -> None:
    wanted = _auto_map_files(auto_map)
    if not wanted:
        return
    copied = []
    for fname in wanted:
        if fname in available and not _never_copy(fname):
            if _copy(folder, donor, fname, warnings) is not None:
                copied.append(fname)
        else:
            warnings.append(f"{donor.ref}: {what} auto_map names {fname}, which the model "
                            "does not have; it was not copied")
    if copied:
        warnings.append(f"{donor.ref}: {what} uses custom code ({', '.join(copied)} copied); "
                        "loading the merged model needs trust_remote_code=True")


def copy_side_files(folder: Any, tokenizer_donor: CheckpointSource | None,
                    config_donor: CheckpointSource | None) -> list[str]:
    """Copy the tokenizer files present in ``tokenizer_donor``, and the generation/processor
    configs plus ``auto_map`` code of ``config_donor``, into the output folder (§9).
    config.json itself is written by the caller (``updated_config``). A file whose real path
    is outside its model's folder (a Hub model: its repo cache), or that is not a regular file,
    is not copied, with a warning naming it. Returns warnings."""
    warnings: list[str] = []
    if tokenizer_donor is not None:
        available = set(tokenizer_donor.list_files())
        copied = {fname: _copy(folder, tokenizer_donor, fname, warnings)
                  for fname in TOKENIZER_FILES if fname in available}
        if copied.get("tokenizer_config.json") is not None:
            try:
                tok_cfg = json.loads(copied["tokenizer_config.json"].decode("utf-8"))
            except ValueError:  # UnicodeDecodeError included
                tok_cfg = None
            if isinstance(tok_cfg, dict):
                _copy_code(folder, tokenizer_donor, tok_cfg.get("auto_map"), available,
                           "tokenizer", warnings)
    if config_donor is not None:
        available = set(config_donor.list_files())
        for fname in CONFIG_DONOR_FILES:
            if fname in available:
                _copy(folder, config_donor, fname, warnings)
        config = config_donor.config()
        if isinstance(config, dict):
            _copy_code(folder, config_donor, config.get("auto_map"), available, "config",
                       warnings)
    return warnings


# ---- model card ------------------------------------------------------------------------------

_TOKEN_RE = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")


def _redact(text: str) -> str:
    return _TOKEN_RE.sub("hf_***", text)


def _dedupe(items: list[str]) -> list[str]:
    out: list[str] = []
    for item in items:
        if item not in out:
            out.append(item)
    return out


def model_card(*, method: str, base_models: list[str], models: list[str], recipe_text: str,
               extra: dict | None = None, title: str | None = None) -> str:
    """README.md: YAML front matter (base_model, base_model_relation: merge, tags,
    library_name) and a body with the method, the models and the recipe verbatim.

    ``base_models`` go to the front matter as given (deduplicated, order kept); the caller
    filters them (docs/hub.md §4: Hub ids only, no @revision). ``extra`` entries are listed as
    settings under the method. Anything that looks like an hf_ token is redacted."""
    front: dict[str, Any] = {}
    bases = _dedupe([str(b) for b in base_models])
    if bases:
        front["base_model"] = bases
    front["base_model_relation"] = "merge"
    front["library_name"] = "transformers"
    front["tags"] = _dedupe(["merge", "mergekit_like", str(method)])
    yaml_text = yaml.safe_dump(front, sort_keys=False, allow_unicode=True, default_flow_style=False)

    lines = [f"# {title or 'Merged model'}", "",
             f"This model was merged with mergekit_like {__version__}"
             f" using the **{method}** merge method.", "",
             "## Merge method", "", f"`{method}`"]
    if extra:
        lines.append("")
        for key, value in extra.items():
            if isinstance(value, (list, tuple)):
                value = ", ".join(str(v) for v in value) if value else "(none)"
            lines.append(f"- {key}: {value}")
    lines += ["", "## Models", ""]
    lines += [f"- {m}" for m in models] or ["(none)"]
    recipe = recipe_text if recipe_text.endswith("\n") else recipe_text + "\n"
    longest = max((len(m) for m in re.findall(r"`+", recipe)), default=0)
    fence = "`" * max(3, longest + 1)
    lines += ["", "## Recipe", "", f"{fence}yaml"]
    body = "\n".join(lines) + "\n" + recipe + fence + "\n"
    return _redact("---\n" + yaml_text + "---\n\n" + body)
