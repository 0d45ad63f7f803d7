"""Hub settings resolved when a command runs (docs/hub.md §1), never at import.

huggingface_hub freezes ``HF_ENDPOINT`` at import time, so every call the project makes
passes ``endpoint=``, ``token=`` and ``cache_dir=`` explicitly from a ``HubSettings``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class HubSettings:
    endpoint: str
    token: str | None
    offline: bool
    cache_dir: Path
    low_disk: bool = False

    def __repr__(self) -> str:  # the token never appears in a repr, a log or an error
        return (f"HubSettings(endpoint={self.endpoint!r}, token={'set' if self.token else None}, "
                f"offline={self.offline}, cache_dir={str(self.cache_dir)!r}, low_disk={self.low_disk})")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def resolve_settings(*, endpoint: str | None = None, cache_dir: Path | str | None = None,
                     offline: bool = False, low_disk: bool = False) -> HubSettings:
    """``--endpoint`` > HF_ENDPOINT > huggingface.co; HF_TOKEN > HUGGING_FACE_HUB_TOKEN > the
    stored login; ``--offline`` or HF_HUB_OFFLINE; ``--cache-dir`` > HF_HUB_CACHE >
    $HF_HOME/hub > ~/.cache/huggingface/hub."""
    env = os.environ
    url = (endpoint or env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    token = env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN") or None
    if token is None:
        from huggingface_hub import get_token

        token = get_token() or None
    if cache_dir is not None:
        cache = Path(cache_dir)
    elif env.get("HF_HUB_CACHE"):
        cache = Path(env["HF_HUB_CACHE"])
    elif env.get("HF_HOME"):
        cache = Path(env["HF_HOME"]) / "hub"
    else:
        cache = Path.home() / ".cache" / "huggingface" / "hub"
    return HubSettings(endpoint=url, token=token, offline=offline or _truthy(env.get("HF_HUB_OFFLINE")),
                       cache_dir=cache.expanduser(), low_disk=low_disk)


def quiet_hub() -> None:
    """The library's tqdm bars and retry warnings off: the project shows its own progress, and
    an error is the one line the CLI prints."""
    from huggingface_hub.utils import disable_progress_bars, logging

    disable_progress_bars()
    logging.set_verbosity_error()
