"""Hold or stream: the bytes a part keeps per frame, and the decision from a worker's memory."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from units.kmeans.memory import (
    MEMORY_MARGIN,
    RowsDecision,
    bytes_per_frame,
    decide,
    format_bytes,
    largest_share,
)
from units.kmeans.parts import ArraySource, Blocks, Part


def test_bytes_per_frame_is_float32_rows_plus_the_k_means_parallel_state():
    assert bytes_per_frame(39, hold=True) == 4 * 39 + 12 == 168
    assert bytes_per_frame(39, hold=False) == 12
    assert bytes_per_frame(768, hold=True, seeding=False) == 4 * 768
    assert bytes_per_frame(39, hold=False, seeding=False) == 0
    # A store read from a URL keeps its float16 files, held or streamed.
    assert bytes_per_frame(39, hold=True, url_source=True) == 168 + 2 * 39
    assert bytes_per_frame(39, hold=False, url_source=True) == 12 + 2 * 39


@pytest.mark.parametrize("hold", [True, False], ids=["hold", "stream"])
def test_the_formula_is_what_a_part_keeps_during_k_means_parallel(hold):
    """What the live numpy buffers of a part come to (tracemalloc sees numpy's), after a
    first pass and a k-means|| round: the peak that the decision budgets for."""
    dim, block_rows = 39, 4096
    x = np.random.default_rng(0).normal(size=(16 * block_rows, dim)).astype(np.float16)
    blocks = Blocks(len(x), block_rows)
    part = Part(ArraySource(x), blocks, 0, blocks.count, hold=hold)
    candidates = x[:8].astype(np.float32)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        part.check()
        part.seed_update(candidates, 0)
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept / len(x) == pytest.approx(bytes_per_frame(dim, hold=hold), abs=0.5)


def test_the_largest_share_is_the_largest_part_of_whole_blocks():
    assert largest_share(1000, 1, block_rows=256) == (1, 1000)
    # Blocks [0, 1) [1, 2) [2, 4): the last part has 1000 - 512 rows.
    assert largest_share(1000, 3, block_rows=256) == (3, 488)
    # Never more parts than blocks.
    assert largest_share(1000, 16, block_rows=256) == (4, 256)
    assert largest_share(0, 4) == (0, 0)


def test_rows_that_fit_are_held():
    d = decide(10_000_000, 39, 8, 4 * 2**30)
    assert (d.rows, d.requested, d.fits, d.hold) == ("hold", "auto", True, True)
    # 153 blocks of 65,536 rows; the last part has 20: 19 whole and the 38,528 rows left.
    assert d.share_frames == 19 * 65_536 + 38_528
    assert d.hold_bytes == 10_000_000 * 168
    assert d.hold_bytes_per_worker == d.share_frames * 168
    assert d.warning is None and "within 70%" in d.reason


def test_rows_that_do_not_fit_are_streamed():
    # The case: a 10% MFCC sample of Libri-light, 2.2e9 frames, 64 workers of 4 GiB.
    d = decide(2_200_000_000, 39, 64, 4 * 2**30, cluster_memory=256 * 2**30)
    assert (d.rows, d.fits, d.hold) == ("stream", False, False)
    assert d.hold_bytes == 2_200_000_000 * 168  # 370 GB across the cluster.
    assert d.stream_bytes_per_worker == d.share_frames * 12
    assert d.stream_fits and d.warning is None
    assert "more than 70% of the 4.0 GiB a worker can get" in d.reason
    assert d.cluster_memory == 256 * 2**30


def test_the_boundary_is_the_margin_of_a_worker_s_memory():
    held = 1000 * 168  # One worker, one part of 1000 frames.
    assert MEMORY_MARGIN == 0.7
    at = decide(1000, 39, 1, 240_000)  # 70% of 240,000 B is 168,000 B: just fits.
    assert (at.budget, at.hold_bytes_per_worker, at.rows) == (held, held, "hold")
    under = decide(1000, 39, 1, 239_999)
    assert under.budget == held - 1 and under.rows == "stream"
    # Memory enough for the rows alone is not enough: the margin is for the rest.
    assert decide(1000, 39, 1, 2 * held).rows == "hold"
    assert decide(1000, 39, 1, held + 1).rows == "stream"
    assert decide(1000, 39, 1, held + 1, margin=1.0).rows == "hold"


def test_hold_and_stream_are_obeyed_and_holding_what_does_not_fit_warns():
    forced = decide(1000, 39, 1, 1000, requested="hold")
    assert (forced.rows, forced.requested, forced.fits) == ("hold", "hold", False)
    assert "workers may be killed for memory" in forced.warning
    assert "--rows stream" in forced.warning
    streamed = decide(1000, 39, 1, 10**9, requested="stream")
    assert (streamed.rows, streamed.fits, streamed.warning) == ("stream", True, None)
    # Even streamed, k-means|| keeps 12 B per frame: too much is said, with what helps.
    starved = decide(10**6, 39, 1, 10**6, requested="stream")
    assert starved.stream_fits is False and "--init k-means++" in starved.warning
    assert decide(10**6, 39, 1, 10**6, requested="stream", seeding=False).warning is None


def test_unknown_memory_holds_as_before_and_says_so():
    d = decide(1000, 39, 2, None)
    assert (d.rows, d.fits, d.budget, d.stream_fits, d.warning) == ("hold", None, None, None, None)
    assert "Ray reports no memory" in d.reason


def test_the_decision_is_recorded_as_json():
    d = decide(1000, 39, 2, 10**9, block_rows=256)
    record = json.loads(json.dumps(d.to_json()))
    assert record["rows"] == "hold" and record["fits"] is True
    assert record["budget"] == int(0.7 * 10**9) and record["stream_fits"] is True
    assert set(record) == {f.name for f in RowsDecision.__dataclass_fields__.values()} | {
        "budget",
        "stream_fits",
    }


def test_a_request_that_is_not_a_choice_is_refused():
    with pytest.raises(ValueError, match="rows must be one of auto, hold, stream, got 'keep'"):
        decide(1000, 39, 1, 10**9, requested="keep")


def test_sizes_read_as_a_person_reads_them():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 2**40) == "3.0 TiB"
    assert format_bytes(None) == "unknown"
