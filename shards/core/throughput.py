"""A run's throughput, recorded the same way by every stage, and its live progress bar.

Each stage's summary carries one record: the audio hours this run covered (under a name the
stage chooses: ``hours_labelled``, ``hours_clustered``, ...), its wall time, audio hours per
second overall and per worker, and the bytes it read and wrote. On the driver, the stages
that stream shards show their progress in audio hours.

Example:
    >>> record("hours_labelled", 2.0, wall_seconds=10.0, workers=4, bytes_read=7,
    ...        bytes_written=3)["audio_hours_per_second_per_worker"]
    0.05
"""

from __future__ import annotations


def record(
    hours_field: str,
    hours: float,
    *,
    wall_seconds: float,
    workers: int,
    bytes_read: int,
    bytes_written: int,
) -> dict:
    """The throughput record of one run.

    Args:
        hours_field: Name of the audio-hours field (``hours_labelled``, ...).
        hours: Audio hours this run covered.
        wall_seconds: Wall time of the run.
        workers: Workers that shared the work (at least 1 is counted).
        bytes_read: Bytes the run read from its inputs.
        bytes_written: Bytes of the files the run wrote.
    """
    workers = max(1, int(workers))
    rate = hours / wall_seconds if wall_seconds > 0 else 0.0
    return {
        "wall_seconds": wall_seconds,
        hours_field: hours,
        "audio_hours_per_second": rate,
        "audio_hours_per_second_per_worker": rate / workers,
        "workers": workers,
        "bytes_read": int(bytes_read),
        "bytes_written": int(bytes_written),
    }


def hours_bar(total_hours: float, desc: str, enabled: bool = True):
    """A tqdm bar on stderr counting audio hours (``bar.update(hours)``) out of
    ``total_hours``; a no-op bar when not ``enabled``."""
    from tqdm import tqdm

    class HoursBar(tqdm):
        def update(self, n=1):
            # Shards finish in any order, and their hours summed in another order than the
            # total's can pass it by a rounding error: the bar stops at its total.
            return super().update(max(0.0, min(n, self.total - self.n)))

    return HoursBar(
        total=total_hours,
        unit="h",
        desc=desc,
        disable=not enabled,
        bar_format="{l_bar}{bar}| {n:.3f}/{total:.3f} audio-h [{elapsed}<{remaining}]{postfix}",
    )
