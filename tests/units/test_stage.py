"""The stage engine's read-ahead (results in order, a bounded window, errors in place) and
the worker a pooled process keeps for one run's shards."""

import threading
import time

import pytest

import units.stage
from units.stage import read_ahead


class Counted:
    """Items 0..n-1 that count how many the reader has drawn."""

    def __init__(self, n):
        self.n, self.drawn = n, 0

    def __iter__(self):
        for i in range(self.n):
            self.drawn += 1
            yield i


@pytest.mark.parametrize("threads", [0, 1, 4])
def test_results_come_in_the_items_order(threads):
    assert list(read_ahead(range(50), lambda i: i * i, threads, window=3)) == [
        i * i for i in range(50)
    ]


def test_threads_run_at_most_the_window_ahead_of_the_caller():
    items = Counted(100)
    results = read_ahead(items, lambda i: i, threads=2, window=5)
    assert next(results) == 0
    assert items.drawn == 6  # The first five, then one more for the one taken.
    assert [next(results) for _ in range(3)] == [1, 2, 3]
    assert items.drawn == 9


def test_the_items_are_drawn_on_the_callers_thread_and_fn_runs_on_others():
    caller = threading.get_ident()
    drawn_on, ran_on = set(), set()

    def items():
        for i in range(20):
            drawn_on.add(threading.get_ident())
            yield i

    def fn(i):
        ran_on.add(threading.get_ident())
        return i

    assert list(read_ahead(items(), fn, threads=3, window=4)) == list(range(20))
    assert drawn_on == {caller} and caller not in ran_on


def test_an_error_reaches_the_caller_at_its_items_place():
    def fn(i):
        if i == 7:
            raise ValueError("bad item 7")
        return i

    got = []
    with pytest.raises(ValueError, match="bad item 7"):
        for value in read_ahead(range(20), fn, threads=2, window=4):
            got.append(value)
    assert got == list(range(7))


def test_a_caller_that_stops_early_leaves_no_thread_behind():
    before = threading.active_count()
    results = read_ahead(range(1000), lambda i: i, threads=3, window=6)
    assert [next(results) for _ in range(4)] == [0, 1, 2, 3]
    results.close()
    assert threading.active_count() == before


class Built:
    """Counts the stage workers built, as a pooled process builds them."""

    def __init__(self):
        self.count = 0

    def __call__(self):
        self.count += 1
        return f"worker {self.count}"


def test_a_pooled_process_builds_a_runs_worker_once_and_a_new_run_gets_its_own():
    kept, build = units.stage._Kept(), Built()
    for _ in range(3):  # Three shards of run a.
        assert kept.take("a", build) == "worker 1"
        kept.give_back()
    assert kept.take("b", build) == "worker 2"  # Another run's shard: a worker of its own.
    kept.give_back()
    assert kept.take("a", build) == "worker 3"  # Run a's worker was dropped for b's.
    kept.give_back()
    assert build.count == 3


def test_a_kept_worker_goes_once_idle_and_never_while_a_shard_uses_it(monkeypatch):
    monkeypatch.setattr(units.stage, "KEEP_SECONDS", 0.1)
    kept, build = units.stage._Kept(), Built()
    assert kept.take("a", build) == "worker 1"
    time.sleep(0.5)  # Busy all along: kept.
    kept.give_back()
    assert kept.take("a", build) == "worker 1"
    kept.give_back()
    time.sleep(0.5)  # Idle for longer than KEEP_SECONDS: dropped.
    assert kept.take("a", build) == "worker 2"
    kept.give_back()
