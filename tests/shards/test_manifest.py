"""Joining committed shards into the root's manifests: every file counted once, and a driver
whose memory does not grow with the utterances."""

from __future__ import annotations

import itertools
import json
import tracemalloc

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from shards.core.atomic import write_parquet_atomic
from shards.manifest import finalize, sources_listed_twice
from shards.root import RootLayout
from shards.schemas import REJECTS, UTTERANCES, Reason, Stage, reject_row


def _commit_shard(layout: RootLayout, index: int, utterances: list[tuple], rejects=()) -> None:
    """A committed shard whose part lists ``(key, source, speaker)`` utterances of 1 s."""
    name = layout.shard_name(index)
    rows = [
        {
            "key": key,
            "shard": name,
            "offset": 512 * (2 * i + 1),
            "size": 100,
            "num_samples": 16000,
            "sample_rate": 16000,
            "duration": 1.0,
            "source": source,
            "start": 0.0,
            "end": 1.0,
            "speaker": speaker,
            "group": None,
            "sha256": "0" * 64,
            "original_sample_rate": 16000,
            "original_channels": 1,
            "passthrough": True,
        }  # fmt: skip
        for i, (key, source, speaker) in enumerate(utterances)
    ]
    write_parquet_atomic(layout.utterances_part(index), rows, UTTERANCES)
    write_parquet_atomic(layout.rejects_part(index), list(rejects), REJECTS)
    size = 10240
    with open(layout.shard_path(index), "wb") as f:
        f.write(bytes(size))
    record = {
        "name": name, "samples": len(rows), "seconds": float(len(rows)), "bytes": size,
        "sha256": "0" * 64, "rejects": len(rejects),
    }  # fmt: skip
    with open(layout.commit_path(index), "w") as f:
        json.dump(record, f)


def _finalize(layout: RootLayout, shards: int, planned: pa.Array) -> dict:
    """Joins the shards; ``planned``: the plan's source column, as the stage passes it."""
    meta = {"layout": "list", "files": len(pc.unique(planned))}
    return finalize(layout, shards, [], meta, {}, planned)


def test_each_file_that_gave_utterances_counts_once_segments_and_twice_listed_alike(tmp_path):
    layout = RootLayout(str(tmp_path))
    layout.make_dirs()
    # a.flac gives two VAD segments; dup.flac is listed twice (two keys in a list file) and
    # lands in two shards; bad.flac gives none (its reject is the shard's).
    _commit_shard(layout, 0, [("a_000", "a.flac", "s1"), ("a_001", "a.flac", "s1")])
    _commit_shard(layout, 1, [("k1", "dup.flac", "s2"), ("b", "b.flac", "")])
    bad = reject_row("bad.flac", Stage.SHARD, Reason.IO_ERROR, "read failed", "bad")
    _commit_shard(layout, 2, [("k2", "dup.flac", None)], [bad])
    planned = ["a.flac", "dup.flac", "b.flac", "dup.flac", "bad.flac"]
    summary = _finalize(layout, 3, pa.array(planned))
    assert summary["files"] == 4 and summary["files_taken"] == 3  # a, dup, b.
    assert summary["segments"] == 5 and summary["rejects"] == 1
    assert summary["speakers"] == 3  # "s1", "s2" and "" (a speaker with no name); None is none.


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 100])
def test_values_listed_twice_are_found_across_chunk_edges(chunk):
    values = ["x", "y", "q", "x", "z", "y", "y", "w", "q"]
    assert sources_listed_twice(pa.array(values), chunk) == {"x", "y", "q"}
    chunked = pa.chunked_array([values[:4], values[4:]])
    assert sources_listed_twice(chunked, chunk) == {"x", "y", "q"}
    assert sources_listed_twice(pa.array(["only"]), chunk) == set()
    assert sources_listed_twice(pa.array([], pa.string()), chunk) == set()


def test_the_driver_holds_no_python_object_per_utterance(tmp_path):
    peaks = {}
    for shards in (4, 40):  # 500 utterances a shard, each from a file of its own.
        layout = RootLayout(str(tmp_path / str(shards)))
        layout.make_dirs()
        count = itertools.count()
        planned = []
        for i in range(shards):
            rows = [(f"u{n:07d}", f"/corpus/speaker/book/u{n:07d}.flac", "s") for n in
                    itertools.islice(count, 500)]  # fmt: skip
            planned += [source for _, source, _ in rows]
            _commit_shard(layout, i, rows)
        planned = pa.array(planned)  # The plan's column: Arrow's, as the stage holds it.
        _finalize(layout, shards, planned[:10])  # Lazy imports are not the corpus's cost.
        tracemalloc.start()
        summary = _finalize(layout, shards, planned)
        peaks[shards] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert summary["files_taken"] == summary["segments"] == 500 * shards
    # Ten times the utterances: a set of their paths alone would add about 2 MB; what grows
    # is a small dict per shard. tracemalloc sees Python objects, not Arrow's buffers (the
    # sort indices, 8 bytes a planned file; one shard's columns at a time).
    assert peaks[40] < peaks[4] * 1.2 + 256 * 1024, peaks
