"""RCP's importance folders (docs/methods/rcp.md §3): statistics folders
(``runtime/stats_folder.py``) of the kinds below, and the ``OUT_<λ>`` naming of votes folders."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mergekit_like.runtime.stats_folder import (INFO_FILE, file_sha256,  # noqa: F401 - re-exported
                                                read_stats_info, refuse_existing,
                                                write_stats_folder as write_importance)

KINDS = ("rcp_fisher", "rcp_votes", "rcp_raw_sensitivity", "rcp_critical_lambda")


def read_info(folder: Path, label: str | None = None) -> dict[str, Any]:
    """``importance.json`` of an RCP importance folder; MergeError if absent or not one."""
    return read_stats_info(folder, KINDS, label)


def lambda_text(lam: float) -> str:
    """λ as a folder suffix: 1000 → ``1e3``, 1e6 → ``1e6``, 2.5e4 → ``2.5e4``, 0 → ``0``,
    ∞ → ``inf``."""
    if lam == 0 or not math.isfinite(lam):
        return "0" if lam == 0 else str(lam)
    mantissa, _, exponent = f"{lam:.6e}".partition("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def votes_folder(out: Path, lam: float) -> Path:
    """``runs/rcp_votes`` + λ 1e6 → ``runs/rcp_votes_1e6``."""
    out = Path(out)
    return out.with_name(f"{out.name}_{lambda_text(lam)}")
