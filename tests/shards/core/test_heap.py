"""A worker hands freed memory back only when it has grown past its bound, or when told to."""

from __future__ import annotations

import pytest

from shards.core import heap

MB = 1 << 20


class FakeProcess:
    """A process whose resident size the test sets, and which counts its trims; a trim frees
    ``freed`` bytes of it."""

    def __init__(self, monkeypatch, size: int, freed: int = 20 * MB):
        self.size, self.freed, self.trims = size, freed, 0
        monkeypatch.setattr(heap, "_malloc_trim", lambda: self.trim)
        monkeypatch.setattr(heap, "resident_bytes", lambda: self.size)
        monkeypatch.setattr(heap, "_limit", [0])

    def trim(self, pad: int) -> int:
        assert pad == 0
        self.trims += 1
        self.size -= self.freed
        return 1


def test_batches_within_the_bound_are_not_trimmed(monkeypatch):
    process = FakeProcess(monkeypatch, 500 * MB)
    heap.release_free_memory()  # The first call sets the bound: its size + the slack.
    for grown in (10, 30, heap.TRIM_SLACK_BYTES // MB):
        process.size = 500 * MB + grown * MB
        heap.release_free_memory()
    assert process.trims == 0


def test_a_process_past_its_bound_trims_back_and_keeps_its_bound(monkeypatch):
    slack = heap.TRIM_SLACK_BYTES
    process = FakeProcess(monkeypatch, 500 * MB, freed=slack + MB)
    heap.release_free_memory()
    process.size = 500 * MB + slack + MB  # Free pages it holds past the bound: trimmed away.
    heap.release_free_memory()
    assert process.trims == 1 and process.size == 500 * MB
    assert heap._limit[0] == 500 * MB + slack  # The same bound.


def test_a_process_that_grew_for_good_takes_its_new_size_as_the_bound(monkeypatch):
    process = FakeProcess(monkeypatch, 500 * MB, freed=MB)
    heap.release_free_memory()
    process.size = 900 * MB  # A model was loaded: a trim frees next to nothing.
    heap.release_free_memory()
    assert process.trims == 1
    assert heap._limit[0] == 899 * MB + heap.TRIM_SLACK_BYTES
    heap.release_free_memory()  # Not trimmed again at that size.
    assert process.trims == 1


@pytest.mark.parametrize("size", [100 * MB, 600 * MB])
def test_force_always_trims(monkeypatch, size):
    process = FakeProcess(monkeypatch, 500 * MB)
    heap.release_free_memory()
    process.size = size
    heap.release_free_memory(force=True)
    assert process.trims == 1


def test_the_resident_size_is_this_process_s():
    assert 10 * MB < heap.resident_bytes() < 64 * 1024 * MB
