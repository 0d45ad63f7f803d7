"""The one user-facing error type.

Every bad input (recipe, checkpoint, output path, disk) is raised as ``MergeError`` with a
one-line message. The CLI prints ``error: <message>`` on stderr, no traceback, and exits 2.
"""


class MergeError(Exception):
    """A user-facing error: one line, exit code 2, nothing written at the output path."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(" ".join(str(message).split("\n")))
        self.exit_code = exit_code


class AlreadyComplete(Exception):
    """Not an error: the output folder already holds the finished result of this very run (the
    same resume key in its manifest), so there is nothing to do."""

    def __init__(self, out):
        super().__init__(f"already complete: {out}")
        self.out = out
