"""Compiled loop modules loaded on first use (the one copy of that boilerplate).

Each fast path keeps its numba loops in a module of its own (``fused_loops``, ``della_loops``,
…) that only ``LazyLoops`` imports: importing the package never imports numba, and numba's
import and its loading (or, on a fresh machine, compiling) of the loops are paid only by merges
that take that path. One tiny ``smoke`` call runs the loops once, so a numba that cannot import,
compile or write its cache fails at load time, not in the middle of a merge: ``get`` then warns
once and returns None, and the callers take their torch path. ``enabled`` is the one switch
(``MERGEKIT_LIKE_FUSED=0``) that sends every fast path to its torch path.
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from types import ModuleType
from typing import Callable


def enabled() -> bool:
    """False when ``MERGEKIT_LIKE_FUSED=0``: every compiled fast path steps aside for its
    torch path (the loops are still importable, e.g. by tests)."""
    return os.environ.get("MERGEKIT_LIKE_FUSED", "1") != "0"


class LazyLoops:
    """The loop module ``module`` (dotted name), imported and smoke-tested on the first ``get``;
    ``label`` names it in the warning and the warm-up thread."""

    def __init__(self, module: str, smoke: Callable[[ModuleType], object], label: str,
                 fallback: str = "the torch path runs"):
        self.module, self.smoke, self.label, self.fallback = module, smoke, label, fallback
        self._lock = threading.Lock()
        self._done = False
        self._loops: ModuleType | None = None

    def get(self) -> ModuleType | None:
        """The compiled loops, or None when numba cannot provide them here."""
        if self._done:
            return self._loops
        with self._lock:
            if not self._done:
                self._loops = self._load()
                self._done = True
        return self._loops

    def warm_up(self) -> None:
        """Load the loops on a background thread (about 0.5–1 s from numba's disk cache), so
        that a merge pays it while its first tensors are being read (``Method.warm_up``)."""
        threading.Thread(target=self.get, name=f"{self.label}-warm-up", daemon=True).start()

    def _load(self) -> ModuleType | None:
        try:
            loops = importlib.import_module(self.module)
            self.smoke(loops)
        except Exception as exc:  # pragma: no cover - numba is a dependency; a broken one
            warnings.warn(f"{self.label} unavailable ({type(exc).__name__}: {exc}); "
                          f"{self.fallback}", RuntimeWarning, stacklevel=3)
            return None
        return loops
