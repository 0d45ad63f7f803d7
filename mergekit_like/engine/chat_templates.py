"""Chat templates for the output tokenizer (recipe key ``chat_template``; mergekit
``merge.py::_set_chat_template``; docs/tokenizer.md §5).

The value is, checked in this order: "auto" (the most common template among the merged
models); one of the built-in names (``TEMPLATES``: alpaca, chatml, llama3, mistral, exaone);
otherwise a literal Jinja template, which must be at least 20 characters long and contain "{"
(mergekit's test). The built-in templates are written for this project; they render the
standard formats (see docs/tokenizer.md §5 for where mergekit's own files render differently).

Templates are rendered by transformers with ``trim_blocks`` and ``lstrip_blocks``; these are
written with explicit ``{%- -%}`` so that does not matter.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from mergekit_like.errors import MergeError
from mergekit_like.io.source import CheckpointSource

CHATML = (
    r"{%- for m in messages -%}"
    r"{{- '<|im_start|>' ~ m['role'] ~ '\n' ~ m['content'] ~ '<|im_end|>\n' -}}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

LLAMA3 = (
    r"{%- for m in messages -%}"
    r"{%- if loop.first and bos_token -%}{{- bos_token -}}{%- endif -%}"
    r"{{- '<|start_header_id|>' ~ m['role'] ~ '<|end_header_id|>\n\n' -}}"
    r"{{- m['content'] | trim -}}{{- '<|eot_id|>\n' -}}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt -%}"
    r"{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}"
    r"{%- endif -%}"
)

MISTRAL = (
    r"{%- set turns = messages -%}{%- set ns = namespace(system=none) -%}"
    r"{%- if messages and messages[0]['role'] == 'system' -%}"
    r"{%- set ns.system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    r"{%- endif -%}"
    r"{%- if bos_token -%}{{- bos_token -}}{%- endif -%}"
    r"{%- for m in turns -%}"
    r"{%- set expect_user = loop.index0 is even -%}"
    r"{%- if (m['role'] == 'user') != expect_user -%}"
    r"{{- raise_exception('mistral: after an optional system message the roles must "
    r"alternate user, assistant, user, ...') -}}"
    r"{%- endif -%}"
    r"{%- if m['role'] == 'user' -%}"
    r"{%- set text = m['content'] -%}"
    r"{%- if loop.first and ns.system is not none -%}"
    r"{%- set text = ns.system ~ '\n\n' ~ text -%}{%- endif -%}"
    r"{{- ' [INST] ' ~ text ~ ' [/INST]' -}}"
    r"{%- elif m['role'] == 'assistant' -%}"
    r"{{- ' ' ~ m['content'] ~ eos_token -}}"
    r"{%- else -%}"
    r"{{- raise_exception('mistral: only user and assistant messages (and a first system "
    r"message) are supported') -}}"
    r"{%- endif -%}"
    r"{%- endfor -%}"
)

ALPACA = (
    r"{%- set heads = {'user': '### Instruction:', 'user_context': '### Input:', "
    r"'assistant': '### Response:'} -%}"
    r"{%- set ns = namespace(text='') -%}"
    r"{%- set systems = messages | selectattr('role', 'equalto', 'system') | list -%}"
    r"{%- if systems -%}{%- set ns.text = systems[-1]['content'] | trim -%}{%- endif -%}"
    r"{%- for m in messages if m['role'] in heads -%}"
    r"{%- set block = heads[m['role']] ~ '\n' ~ (m['content'] | trim) -%}"
    r"{%- set ns.text = (ns.text ~ '\n\n' ~ block) if ns.text else block -%}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt and messages and messages[-1]['role'] != 'assistant' -%}"
    r"{%- set ns.text = (ns.text ~ '\n\n### Response:\n') if ns.text else '### Response:\n' -%}"
    r"{%- endif -%}"
    r"{{- ns.text -}}"
)

EXAONE = (
    r"{%- for m in messages -%}"
    r"{%- if loop.first and m['role'] != 'system' -%}{{- '[|system|][|endofturn|]\n' -}}"
    r"{%- endif -%}"
    r"{{- '[|' ~ m['role'] ~ '|]' ~ m['content'] -}}"
    r"{{- '\n' if m['role'] == 'user' else '[|endofturn|]\n' -}}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{- '[|assistant|]' -}}{%- endif -%}"
)

TEMPLATES: dict[str, str] = {"alpaca": ALPACA, "chatml": CHATML, "llama3": LLAMA3,
                             "mistral": MISTRAL, "exaone": EXAONE}


def model_chat_template(source: CheckpointSource) -> str | None:
    """The chat template a model's tokenizer files give it, as transformers 5 loads it:
    chat_template.jinja, else tokenizer_config.json's "chat_template" (a string, or the
    "default" entry of a list of {name, template}). None when it has none or it is
    unreadable."""
    files = set(source.list_files())
    try:
        if "chat_template.jinja" in files:
            return source.fetch_file("chat_template.jinja").read_text(encoding="utf-8")
        if "tokenizer_config.json" not in files:
            return None
        cfg = json.loads(source.fetch_file("tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, MergeError):  # UnicodeDecodeError is a ValueError
        return None
    value = cfg.get("chat_template") if isinstance(cfg, dict) else None
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    elif isinstance(value, dict):
        value = value.get("default")
    return value if isinstance(value, str) else None


def resolve_chat_template(value: str, sources: dict[str, CheckpointSource]) -> str | None:
    """The template text for a recipe's ``chat_template`` value.

    "auto": the most common (whitespace-stripped) template among ``sources`` (ties: the one
    met first, in ``sources`` order); None when no model has one (the output then keeps the
    tokenizer's own template, as mergekit does). A built-in name: its template. Otherwise
    ``value`` itself if it looks like Jinja (≥ 20 characters and a "{"); else MergeError."""
    if value == "auto":
        found = [t.strip() for t in (model_chat_template(s) for s in sources.values()) if t]
        found = [t for t in found if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if value in TEMPLATES:
        return TEMPLATES[value]
    if len(value) < 20 or "{" not in value:
        raise MergeError(f"chat_template: {value!r} is neither a built-in template "
                         f"({', '.join(TEMPLATES)}), 'auto', nor a Jinja template")
    return value


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def set_chat_template(files: dict[str, bytes], template: str) -> dict[str, bytes]:
    """``files`` (output tokenizer file name -> bytes) with ``template`` as the chat template,
    the way transformers 5 saves one: the text in chat_template.jinja, and no "chat_template"
    key left in tokenizer_config.json. A chat_template.json (processors' legacy file, which
    transformers' processor loader reads before chat_template.jinja) is dropped. Other files,
    and tokenizer_config.json when it had no template key, keep their bytes."""
    out = dict(files)
    out["chat_template.jinja"] = template.encode("utf-8")
    out.pop("chat_template.json", None)
    raw = out.get("tokenizer_config.json")
    if raw is not None:
        try:
            cfg = json.loads(raw.decode("utf-8"))
        except ValueError:
            cfg = None
        if isinstance(cfg, dict) and "chat_template" in cfg:
            cfg.pop("chat_template")
            out["tokenizer_config.json"] = _json_bytes(cfg)
    return out
