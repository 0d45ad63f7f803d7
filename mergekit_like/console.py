"""The consoles every command prints through: ``out_console`` (stdout: tables, URLs, results),
``err_console`` (stderr: progress, warnings, errors) and ``warn`` (each distinct warning once)."""

from __future__ import annotations

from rich.console import Console

out_console = Console(soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def warn(messages: list[str]) -> None:
    """Print each distinct message once as ``warning: …`` on stderr, in order."""
    for m in dict.fromkeys(messages):
        err_console.print(f"[yellow]warning:[/yellow] {m}", markup=True)
