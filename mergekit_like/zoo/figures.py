"""The quality figures of docs/quality.md (matplotlib, the ``dev`` extra): per-method accuracy
bars of the skill-task table, and the reasoning-kept / domain-recovered trade-off curves of the
reasoning + domain table (each method's Pareto front over its sweep)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("the figures need matplotlib: pip install -e '.[dev]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def accuracy_bars(labels: Sequence[str], merged: Sequence[float], every: Sequence[float],
                  out: Path) -> Path:
    """Horizontal bars: mean test accuracy over the merged tasks and over every task, one pair
    per model (base, fine-tunes, methods), written to ``out`` (PNG)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(labels) + 1.2))
    ys = range(len(labels))
    ax.barh([y + 0.2 for y in ys], merged, height=0.4, label="avg merged tasks")
    ax.barh([y - 0.2 for y in ys], every, height=0.4, label="avg all tasks")
    ax.set_yticks(list(ys), labels)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("test accuracy (exact match)")
    ax.legend(loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def trade_off_curves(curves: dict[str, list[tuple[float, float, Any]]],
                     fronts: dict[str, list[tuple[float, float, Any]]], out: Path) -> Path:
    """Every swept candidate (dots) and each method's Pareto front (line): reasoning kept (x)
    against domain gain recovered (y), with the 90 % kept line; written to ``out`` (PNG)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for label, points in curves.items():
        front = fronts[label]
        line, = ax.plot([p[0] for p in front], [p[1] for p in front], marker="o", label=label)
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=12, alpha=0.4,
                   color=line.get_color())
    ax.axvline(0.9, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("reasoning accuracy kept (share of the reasoning fine-tune's)")
    ax.set_ylabel("domain gain recovered (share of the domain fine-tune's)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
