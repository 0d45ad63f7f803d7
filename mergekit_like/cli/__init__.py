"""The `mergekit-like` command (cli/app.py builds it)."""

from mergekit_like.cli.app import entrypoint, main

__all__ = ["entrypoint", "main"]
