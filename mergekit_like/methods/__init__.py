"""Registry of merge methods: every module in this package that defines ``METHODS`` (a list of
``Method`` instances) contributes them, so adding a method is adding one file."""

from __future__ import annotations

import importlib
import pkgutil

from mergekit_like.methods.base import Method

# Methods mergekit or our specs name that are not implemented yet: recognised, refused clearly.
PLANNED = ("breadcrumbs", "breadcrumbs_ties", "della", "della_linear")
# Display order of method lists (recipe.md); methods not named here follow alphabetically.
DISPLAY_ORDER = ("linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear", "twin",
                 "wemoe", "rcp", "rcp_approx") + PLANNED

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


def _display_key(name: str) -> tuple[int, str]:
    return (DISPLAY_ORDER.index(name) if name in DISPLAY_ORDER else len(DISPLAY_ORDER), name)


def method_names() -> list[str]:
    """Implemented methods, in display order."""
    return sorted(_discover(), key=_display_key)


def known_names() -> list[str]:
    """Implemented plus recognised-but-planned names (for 'did you mean' and the known list)."""
    return sorted({*_discover(), *PLANNED}, key=_display_key)
