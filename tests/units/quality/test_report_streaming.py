"""The report streams its inputs: per-batch aggregates that equal the whole-manifest numbers,
and nothing kept per utterance (issue 15, bounded driver memory).

The roots here are written directly (a manifest, label shards, rejects and ``meta.json``):
no audio and no Ray, so tens of thousands of utterances cost a second, and small batches
(``BATCH_ROWS`` patched) make every aggregate cross many batch boundaries.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from units.quality import phone_refs, report

K = 8
# Speakers repeat every 7 rows; None and "" both become "?" in the report.
SPEAKERS = ["19", "26", "103", "", None, "1034", "?"]


def _write_root(root: str, n: int, seed: int = 0) -> pa.Table:
    """A root with ``n`` utterances in two label shards; returns the manifest's columns."""
    rng = np.random.default_rng(seed)
    # Log-uniform durations over VAD segments' range, plus values outside the histogram's
    # edges (under 10 ms, over 100,000 s) that must still be counted once each.
    durations = np.exp(rng.uniform(np.log(0.3), np.log(40.0), n))
    durations[:2] = [0.001, 2e5]
    manifest = pa.table(
        {
            "key": [f"u{i:07d}" for i in range(n)],
            "duration": durations,
            "speaker": pa.array([SPEAKERS[i % len(SPEAKERS)] for i in range(n)], pa.string()),
        }
    )
    os.makedirs(os.path.join(root, "manifest"))
    pq.write_table(manifest, os.path.join(root, "manifest", "utterances.parquet"))
    rejects = pa.table(
        {
            "stage": ["probe"] * 5 + ["segment"] * 2 + ["probe"],
            "reason": ["unreadable"] * 3 + ["too_short"] * 2 + ["silent"] * 2 + ["empty"],
        }
    )
    pq.write_table(rejects, os.path.join(root, "manifest", "rejects.parquet"), row_group_size=3)
    labels = os.path.join(root, "labels", "km")
    os.makedirs(os.path.join(labels, "units"))
    os.makedirs(os.path.join(labels, "rejects"))
    units = rng.integers(0, K - 1, size=(n, 3)).astype(np.uint16)  # Unit K-1 stays dead.
    half = n // 2
    for shard, rows in (("000000", slice(0, half)), ("000001", slice(half, n))):
        table = pa.table(
            {
                "key": manifest.column("key")[rows],
                "units": pa.array(list(units[rows]), pa.list_(pa.uint16())),
            }
        )
        pq.write_table(table, os.path.join(labels, "units", f"{shard}.parquet"))
        reasons = pa.table({"reason": ["no_audio", "frames"] if shard == "000000" else ["frames"]})
        pq.write_table(reasons, os.path.join(labels, "rejects", f"{shard}.parquet"))
    meta = {"k": K, "kmeans": "km", "frame_rate": 100.0, "utterances": n, "hours": 1.0}
    with open(os.path.join(labels, "meta.json"), "w") as f:
        json.dump(meta, f)
    return manifest


def test_batch_aggregates_equal_the_numbers_of_the_whole_manifest(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "BATCH_ROWS", 1000)
    n = 5_500  # Six batches, the last one partial.
    manifest = _write_root(str(tmp_path), n)
    built = report.build(str(tmp_path), "km")

    durations = manifest.column("duration").to_numpy()
    assert built.durations.utterances == n
    clipped = np.clip(durations, report.DURATION_EDGES[0], report.DURATION_EDGES[-1])
    whole = np.histogram(clipped, report.DURATION_EDGES)[0]
    np.testing.assert_array_equal(built.durations.counts, whole)  # Counts add up exactly.

    seconds = collections.defaultdict(list)
    for row in manifest.to_pylist():
        seconds[row["speaker"] or "?"].append(row["duration"])
    assert built.hours_by_speaker.keys() == seconds.keys()
    for speaker, values in seconds.items():
        # Arrow sums each batch's durations, then the batches are added: another order than
        # an exact sum (fsum), so the two may differ by rounding, at most about
        # (rows - 1) * 2**-53 of the total: under 1e-12 relative for fewer than 9,000 rows.
        want = math.fsum(values) / 3600
        assert built.hours_by_speaker[speaker] == pytest.approx(want, rel=1e-12), speaker

    assert built.rejects == {
        "label: frames": 2,
        "label: no_audio": 1,
        "probe: empty": 1,
        "probe: too_short": 2,
        "probe: unreadable": 3,
        "segment: silent": 2,
    }
    assert built.metrics["rejects"] == built.rejects
    assert built.metrics["usage"]["frames"] == 3 * n and built.metrics["usage"]["dead"] == 1


def _sizes(value) -> object:
    """The length of every container in a report, field by field (recursing into
    dataclasses), so two reports can be compared for what grows with the corpus."""
    if dataclasses.is_dataclass(value):
        return {f.name: _sizes(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return (len(value), {k: _sizes(v) for k, v in value.items()})
    if isinstance(value, (list, tuple, np.ndarray)):
        return len(value)
    return None


def test_the_report_holds_nothing_per_utterance(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "BATCH_ROWS", 1000)
    reports, peaks = {}, {}
    for n in (2_000, 20_000):
        root = str(tmp_path / str(n))
        _write_root(root, n)
        report.build(root, "km")  # Lazy imports and caches are not the corpus's cost.
        tracemalloc.start()
        reports[n] = report.build(root, "km")
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    # Ten times the utterances, the same sizes everywhere: per speaker, unit, reason, bin.
    assert _sizes(reports[2_000]) == _sizes(reports[20_000])
    assert reports[20_000].durations.utterances == 20_000
    # Python's heap at its peak does not grow with the corpus either (a list of every
    # duration alone would add 18,000 floats, 576 KB; the manifest as rows, about 7 MB).
    # tracemalloc sees Python objects and NumPy arrays, not Arrow's buffers, which the batch
    # size bounds; the whole process's peak RSS is a benchmark's measure, not a test's.
    assert peaks[20_000] < peaks[2_000] * 1.2 + 256 * 1024, peaks


def test_reference_durations_are_read_only_for_reference_utterances(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "BATCH_ROWS", 1000)
    manifest = _write_root(str(tmp_path), 4_000)
    rows = manifest.slice(2).to_pylist()[::97]  # Every 97th utterance, across batches.
    refs = tmp_path / "phones.tsv"
    with open(refs, "w") as f:
        for row in rows:  # One phone per 10 ms frame: references at 100 Hz.
            f.write(f"{row['key']}\t{','.join(['a'] * round(row['duration'] * 100))}\n")
        f.write("ghost\tsil,sil\n")  # A reference without audio: no duration to read.
    seen = {}
    check_rate = phone_refs.check_rate

    def spy(refs, durations, path, *args, **kwargs):
        seen.update(durations)
        return check_rate(refs, durations, path, *args, **kwargs)

    monkeypatch.setattr(phone_refs, "check_rate", spy)
    built = report.build(str(tmp_path), "km", str(refs))
    assert seen == {row["key"]: row["duration"] for row in rows}
    assert built.metrics["phones"]["utterances"] == len(rows)
    assert built.metrics["phones"]["missing_utterances"] == 1


def test_the_duration_histogram_counts_every_utterance_once_and_draws_40_bars():
    histogram = report.DurationHistogram()
    assert len(histogram.counts) == len(report.DURATION_EDGES) - 1  # Fixed by the edges.
    rng = np.random.default_rng(1)
    for _ in range(3):
        histogram.add(np.exp(rng.uniform(np.log(0.5), np.log(30.0), 1_000)))
    histogram.add(np.array([0.0, 1e-9, 1e9]))  # Outside the edges: the first or last bin.
    assert histogram.utterances == 3_003
    assert histogram.counts[0] == 2 and histogram.counts[-1] == 1
    counts, edges = histogram.shown(bars=40)
    assert len(counts) <= 40 and len(edges) == len(counts) + 1 and counts.sum() == 3_003
    assert edges[0] == report.DURATION_EDGES[0] and edges[-1] == report.DURATION_EDGES[-1]
    assert np.all(np.diff(edges) > 0)
    empty = report.DurationHistogram().shown()
    assert len(empty[0]) == 0 and len(empty[1]) == 0
