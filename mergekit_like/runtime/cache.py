"""The KV-cache keyword across the supported transformers releases (pyproject's ``runtime`` extra).

transformers 5.0 names the KV cache ``past_key_values`` (forward keyword and output field); later
5.x releases rename both to ``cache`` and keep the old name only as a deprecated alias (a
FutureWarning per call, a logged warning per output read). The runtime passes and reads the cache
under the name the model in hand uses, so neither name is hard-coded and no deprecation is hit:

* ``cache_keyword(model)``: ``"cache"`` or ``"past_key_values"``, from the model's forward
  signature; a forward taking neither by name (``**kwargs`` only) gets the library's own name.
* ``output_cache(out)``: the cache of a model output under whichever field it has (None if none).
* ``cache_length(cache)``: tokens held by a cache (0 for None or an empty cache).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

NAMES = ("cache", "past_key_values")
"""The current name first, then the name transformers 5.0 uses."""


@functools.lru_cache(maxsize=None)
def library_cache_keyword() -> str:
    """The installed transformers' name for the KV cache (its causal-LM output's field)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    names = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    return "cache" if "cache" in names else "past_key_values"


def cache_keyword(model: Any) -> str:
    """The keyword under which ``model.forward`` takes the KV cache."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    for name in NAMES:
        if name in params:
            return name
    return library_cache_keyword()


def output_cache(out: Any) -> Any:
    """The KV cache a forward returned (``out.cache`` or ``out.past_key_values``), or None."""
    if dataclasses.is_dataclass(out):
        names = {f.name for f in dataclasses.fields(out)}
        for name in NAMES:
            if name in names:
                return getattr(out, name)
        return None
    for name in NAMES:  # a plain mapping (a wrapper's own output)
        if isinstance(out, dict) and name in out:
            return out[name]
    return None


def cache_length(cache: Any) -> int:
    """How many tokens ``cache`` holds (``get_seq_length()``, or ``len`` of a legacy tuple)."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return len(cache)


def pop_cache(kwargs: dict, cache: Any = None) -> Any:
    """``cache``, or the one cache among ``kwargs``' ``cache``/``past_key_values`` entries
    (removed from kwargs); both given is a ValueError."""
    given = [kwargs.pop(name) for name in NAMES if name in kwargs]
    given = [c for c in [cache, *given] if c is not None]
    if len(given) > 1:
        raise ValueError("pass the KV cache once, as cache or past_key_values")
    return given[0] if given else None
