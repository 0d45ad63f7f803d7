"""huggingface_hub exceptions as one-line ``MergeError`` messages (docs/hub.md §3).

Exit code 2 for what the user must fix, 1 for what a retry may fix (5xx, 429, transport).
Messages name the repo (and revision or file), never the token.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from huggingface_hub import errors as hf
from huggingface_hub.utils import httpx

from mergekit_like.errors import MergeError

NO_SAFETENSORS = "{repo} has no safetensors weights (pickle checkpoints are not loaded)"


def offline_message(repo: str, rev: str | None, cache_dir: object) -> str:
    return (f"{repo}@{rev or 'main'} is not in the local cache ({cache_dir}) and offline mode "
            "is on")


def hub_error(exc: BaseException, *, repo: str, endpoint: str, revision: str | None = None,
              filename: str | None = None, cache_dir: object = None) -> MergeError | None:
    """The user-facing error for a Hub exception, or None when ``exc`` is not one."""
    cause = exc.__cause__
    if isinstance(exc, hf.LocalEntryNotFoundError) and cause is not None and not isinstance(
            cause, (hf.OfflineModeIsEnabled, hf.LocalEntryNotFoundError)):
        # online, the library wraps the real failure (5xx after retries, no connection)
        mapped = hub_error(cause, repo=repo, endpoint=endpoint, revision=revision,
                           filename=filename, cache_dir=cache_dir)
        if mapped is not None:
            return mapped
    at = f"{repo}@{revision[:7]}" if revision else repo
    if isinstance(exc, hf.GatedRepoError):  # before its parent RepositoryNotFoundError
        return MergeError(f"{repo} is gated: accept its terms on the Hub, then set HF_TOKEN")
    if isinstance(exc, hf.DisabledRepoError):
        return MergeError(f"{repo} has been disabled on the Hub")
    if isinstance(exc, hf.RepositoryNotFoundError):
        return MergeError(f"{repo} not found on {endpoint} (if it is private, set HF_TOKEN)")
    if isinstance(exc, hf.RevisionNotFoundError):
        return MergeError(f"{repo} has no revision '{revision}'")
    if isinstance(exc, hf.RemoteEntryNotFoundError):
        return MergeError(f"{at} has no file '{filename}'")
    if isinstance(exc, (hf.LocalEntryNotFoundError, hf.IncompleteSnapshotError,
                        hf.OfflineModeIsEnabled)):
        return MergeError(offline_message(repo, revision, cache_dir))
    if isinstance(exc, hf.NotASafetensorsRepoError):
        return MergeError(NO_SAFETENSORS.format(repo=repo))
    if isinstance(exc, hf.HFValidationError):
        return MergeError(f"'{repo}' is neither an existing folder nor a valid Hub repo id")
    if isinstance(exc, hf.HfHubHTTPError):
        status = getattr(exc.response, "status_code", None) if exc.response is not None else None
        if status in (401, 403):
            return MergeError(f"not authorised for {repo} (check HF_TOKEN's permissions)")
        if status == 429 or (status is not None and status >= 500):
            return MergeError(f"Hub error {status} for {repo}; retry later", exit_code=1)
        return MergeError(f"Hub error {status} for {at}: {_first_line(exc)}", exit_code=1)
    if isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError)):
        return MergeError(f"cannot reach {endpoint}: {_first_line(exc) or type(exc).__name__}",
                          exit_code=1)
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


@contextmanager
def hub_call(*, repo: str, endpoint: str, revision: str | None = None,
             filename: str | None = None, cache_dir: object = None) -> Iterator[None]:
    """Run a huggingface_hub call; its errors leave as ``MergeError``."""
    try:
        yield
    except MergeError:
        raise
    except Exception as exc:  # noqa: BLE001 - mapped below or re-raised unchanged
        mapped = hub_error(exc, repo=repo, endpoint=endpoint, revision=revision,
                           filename=filename, cache_dir=cache_dir)
        if mapped is None:
            raise
        raise mapped from None
