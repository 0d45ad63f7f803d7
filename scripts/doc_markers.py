"""Rewrite the part of a markdown page between two marker comments (the generated tables of
docs/parity.md and docs/quality.md); shared by the scripts that write them."""

from __future__ import annotations

from pathlib import Path


def replace_between(doc: Path, start: str, end: str, body: str, *, new_page: str = "",
                    heading: str = "") -> None:
    """``doc`` with ``start\\nbody\\nend`` in place of what its markers enclose; when the page
    has no markers the block is appended (after ``heading``, if given). A missing page starts
    as ``new_page``."""
    old = doc.read_text() if doc.exists() else new_page
    block = f"{start}\n{body}\n{end}"
    if start in old and end in old:
        new = old[:old.index(start)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + (f"{heading}\n\n" if heading else "") + block + "\n"
    doc.write_text(new)
