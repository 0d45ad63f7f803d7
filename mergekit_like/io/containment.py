"""Which model files may be read into an output: only regular files whose real path lies inside
the model's folder (for a Hub model, inside that repo's cache folder). A side file linked to
anything else (a token file, a FIFO, a device) is never opened; the merge says which one it
skipped and why."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from mergekit_like.errors import MergeError


class UnsafeSideFile(MergeError):
    """A model file that is never read: its real path is outside the folder it must live in,
    or it is not a regular file (a FIFO, a device, a broken link). ``warning`` says so."""

    def __init__(self, ref: str, name: str, reason: str):
        super().__init__(f"{ref}: {name} refused: {reason}")
        self.ref, self.name, self.reason = ref, name, reason

    @property
    def warning(self) -> str:
        return f"{self.ref}: {self.name} not copied: {self.reason}"


def containment_root(folder: Path) -> tuple[Path, str]:
    """The real folder a model's files must resolve into, and how messages name it: the model
    folder itself, or for a Hub cache snapshot (``models--org--name/snapshots/<sha>``, whose
    files are links into ``../../blobs``) that repo's cache folder."""
    folder = Path(folder)
    repo = folder.parent.parent
    if folder.parent.name == "snapshots" and repo.name.startswith("models--") \
            and (repo / "blobs").is_dir():
        return Path(os.path.realpath(repo)), "the model's Hub cache folder"
    return Path(os.path.realpath(folder)), "the model folder"


def contained_file(path: Path, root: Path, where: str, ref: str, name: str) -> Path:
    """The real path of ``path`` if it lies inside ``root`` (already a real path) and is a
    regular file; else ``UnsafeSideFile``. Nothing is opened (a FIFO would block)."""
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(root):
        raise UnsafeSideFile(ref, name, f"its real path is outside {where}")
    try:
        mode = os.stat(real).st_mode
    except OSError:
        raise UnsafeSideFile(ref, name, "it cannot be read (a broken link?)") from None
    if not stat.S_ISREG(mode):
        raise UnsafeSideFile(ref, name, "it is not a regular file")
    return real
