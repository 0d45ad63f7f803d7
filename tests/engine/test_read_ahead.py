"""engine.read.read_ahead: which reads may run ahead of the consumer under the byte budget, in
what order the jobs come back, and how errors and an early stop behave."""

from __future__ import annotations

import threading
import time

import pytest

from mergekit_like.engine.read import read_ahead


class Log:
    """Reads that have started, in order (the fake read returns the job's name twice)."""

    def __init__(self, fail: str | None = None):
        self.started: list[str] = []
        self.lock = threading.Lock()
        self.fail = fail

    def read(self, job: str) -> str:
        with self.lock:
            self.started.append(job)
        if job == self.fail:
            raise OSError(f"cannot read {job}")
        return job * 2

    def settle(self, expected: list[str]) -> list[str]:
        """The started reads once ``expected`` have all started (and a grace period passed,
        so a read the rules forbid would have had time to start too)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.started) >= len(expected):
                    break
            time.sleep(0.005)
        time.sleep(0.1)
        with self.lock:
            return list(self.started)


SIZES = {"a": 10, "b": 10, "c": 10, "H": 80, "d": 10, "H2": 80, "H3": 80, "e": 10}


def test_budget_reads_small_jobs_ahead_and_never_holds_two_huge_ones():
    """Budget 100: a read starts when held + its size ≤ 100 or held ≤ 50 (held: the bytes of
    the reads started and not yet released; a job is released when the next is asked for)."""
    log = Log()
    reads = read_ahead(iter(SIZES), log.read, size=SIZES.__getitem__, budget=100)
    # after each job is handed out, the reads that have started (worked out by hand)
    expected = {"a": ["a", "b", "c", "H"],          # 30 held: H may start (30 ≤ 50)
                "b": ["a", "b", "c", "H"],          # held 100: d waits
                "c": ["a", "b", "c", "H", "d"],     # held 90: d fits (100)
                "H": ["a", "b", "c", "H", "d"],     # held 90: H2 waits
                "d": ["a", "b", "c", "H", "d", "H2"],   # H released: held 10, H2 fits
                "H2": ["a", "b", "c", "H", "d", "H2"],  # held 80: never two huge together
                "H3": list(SIZES),                  # H2 released: H3 alone, then e fits
                "e": list(SIZES)}
    got = []
    for job, result in reads:
        assert result == job * 2
        got.append(job)
        assert log.settle(expected[job]) == expected[job], job
    assert got == list(SIZES)


def test_without_budget_the_reader_stays_one_job_ahead():
    log = Log()
    reads = read_ahead(iter("abcd"), log.read)
    for k, (job, _) in enumerate(reads):
        want = list("abcd")[:k + 2]
        assert log.settle(want) == want


def test_read_error_comes_at_its_turn_and_stops_the_reader():
    log = Log(fail="c")
    reads = read_ahead(iter("abcdef"), log.read, size=lambda j: 1, budget=100)
    assert [next(reads)[0], next(reads)[0]] == ["a", "b"]
    with pytest.raises(OSError, match="cannot read c"):
        next(reads)
    assert log.settle(list("abc")) == list("abc")   # nothing read after the failed one


def test_closing_early_stops_the_reader():
    log = Log()
    sizes = {j: 30 for j in "abcdef"}                # three ahead at most (held ≤ 90)
    reads = read_ahead(iter(sizes), log.read, size=sizes.__getitem__, budget=100)
    assert next(reads)[0] == "a"
    assert log.settle(["a", "b", "c"]) == ["a", "b", "c"]
    before = threading.active_count()
    reads.close()
    assert log.settle(["a", "b", "c"]) == ["a", "b", "c"]
    assert not any(t.name == "mergekit-like-read" for t in threading.enumerate())
    assert threading.active_count() < before


def test_iterator_error_is_raised_in_order():
    def jobs():
        yield "a"
        raise ValueError("bad plan")

    log = Log()
    reads = read_ahead(jobs(), log.read, size=lambda j: 1, budget=10)
    assert next(reads)[0] == "a"
    with pytest.raises(ValueError, match="bad plan"):
        next(reads)
