"""The `mergekit-like` command: its commands (one module per group) put together, and ``main``,
which turns every user error into one line and an exit code.

Every user error is a ``MergeError``: printed as one line ``error: …`` on stderr, exit code 2,
no traceback.
"""

from __future__ import annotations

import signal
import sys

import typer

from mergekit_like import __version__
from mergekit_like.cli.grid import grid
from mergekit_like.cli.merge import merge, publish
from mergekit_like.cli.models import eval_model, inspect, verify
from mergekit_like.cli.stats import stats_app
from mergekit_like.cli.train_router import train_router
from mergekit_like.console import err_console, out_console
from mergekit_like.errors import MergeError
from mergekit_like.rcp.cli import importance_app
from mergekit_like.twin.cli import twin_app

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Streaming, memory-bounded model merging (mergekit-compatible recipes).")




def version() -> None:
    """Print the version."""
    out_console.print(__version__)


for command in (merge, publish, inspect, verify):
    app.command()(command)
app.command(name="eval")(eval_model)
app.command()(grid)
app.command()(version)
app.add_typer(twin_app, name="twin")
app.add_typer(importance_app, name="importance")
app.add_typer(stats_app, name="stats")
app.command(name="train-router")(train_router)


def main(argv: list[str] | None = None) -> int:
    global _signal_name
    _signal_name = "interrupted"
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (an embedding host): leave SIGTERM alone
        previous = None
    try:
        code = app(args=argv, standalone_mode=False)
        if code == 130:  # typer turns a KeyboardInterrupt into Exit(130), silently
            return _interrupted()
        if isinstance(code, int) and code:
            return code  # a command that ends with typer.Exit(code) (grid: 3)
    except MergeError as exc:
        err_console.print(f"error: {exc}", markup=False)
        return exc.exit_code
    except KeyboardInterrupt:
        return _interrupted()
    except SystemExit as exc:  # typer/click exits (--help, usage errors)
        return exc.code if isinstance(exc.code, int) else 0
    except Exception as exc:
        # click usage errors (typer vendors its own click, so match by shape, not by class)
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            return exc.exit_code
        if type(exc).__name__ == "Abort":  # click's wrapping of a KeyboardInterrupt
            return _interrupted() if isinstance(exc.__context__, KeyboardInterrupt) else 1
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _on_sigterm(signum, frame) -> None:
    global _signal_name
    _signal_name = "terminated"
    raise KeyboardInterrupt


_signal_name = "interrupted"


def _interrupted() -> int:
    """Ctrl-C or SIGTERM: say whether a partial output was kept for a resume; 130 / 143."""
    from mergekit_like.io.output import KEPT_PARTIALS

    kept = [p for p in KEPT_PARTIALS if p.exists()]
    what = ("run the same command again to resume" if kept else "nothing written")
    err_console.print(f"{_signal_name}; {what}", markup=False)
    return 143 if _signal_name == "terminated" else 130


def entrypoint() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
