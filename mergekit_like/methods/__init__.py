"""Registry of merge methods: every module in this package that defines ``METHODS`` (a list of
``Method`` instances) contributes them, so adding a method is adding one file."""

from __future__ import annotations

import importlib
import pkgutil

from mergekit_like.methods.base import Method

# Methods mergekit or our specs name that are not implemented yet: recognised, refused clearly.
PLANNED = ("breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "rcp", "rcp_approx",
           "twin", "wemoe")

_REGISTRY: dict[str, Method] = {}


def _discover() -> dict[str, Method]:
    if not _REGISTRY:
        for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
            if info.name == "base":
                continue
            module = importlib.import_module(f"{__name__}.{info.name}")
            for method in getattr(module, "METHODS", ()):
                _REGISTRY[method.spec.name] = method
    return _REGISTRY


def get_method(name: str) -> Method | None:
    return _discover().get(name)


def method_names() -> list[str]:
    """Implemented methods, in registry order."""
    return list(_discover())


def known_names() -> list[str]:
    """Implemented plus recognised-but-planned names (for 'did you mean' and the known list)."""
    return method_names() + [n for n in PLANNED if n not in _discover()]
