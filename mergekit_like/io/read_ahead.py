"""Reading the next job's inputs in a background thread while the current one is merged."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def read_ahead(jobs: Iterator[T], read: Callable[[T], R], size: Callable[[T], int] | None = None,
               budget: int | None = None) -> Iterator[tuple[T, R]]:
    """Yield (job, read(job)) while the next job's read runs in a background thread.

    At most two jobs' inputs exist at once (the one yielded and the one being read; the
    consumer drops its reference before asking for the next). When the two together exceed
    ``budget`` bytes (``size(job)``), the next read waits until the consumer is done with the
    current job: huge tensors (embeddings) are not overlapped, which keeps peak memory at about
    one such tensor's inputs."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergekit-like-read") as pool:
        current = next(jobs, None)
        future = pool.submit(read, current) if current is not None else None
        while current is not None:
            result = future.result()
            nxt = next(jobs, None)
            overlap = nxt is not None and not (
                size and budget and size(current) + size(nxt) > budget)
            future = pool.submit(read, nxt) if overlap else None
            yield current, result
            del result
            if nxt is not None and future is None:
                future = pool.submit(read, nxt)
            current = nxt
