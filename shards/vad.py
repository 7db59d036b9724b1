"""Voice-activity segmentation with Libri-light's semantics.

Libri-light's ``cut_by_vad.py`` walks the ``voice_activity`` intervals of a file in order
and joins them greedily: an interval is added to the current segment unless that would take
the segment's voiced length past the target and the segment already holds something. An
interval is never cut, so one longer than the target becomes a segment of its own. The
segment's audio is the voiced intervals joined end to end (the silences between them are
left out), exactly as ``cut_by_vad.py`` stitches them.

Files without a sidecar get intervals from a detector: WebRTC's VAD (``webrtcvad-wheels``,
whose model is compiled into the package) or a plain energy detector.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np

from .schemas import SAMPLE_RATE

Interval = tuple[float, float]

DETECTORS = ("webrtc", "energy")

_FRAME = 480  # 30 ms at 16 kHz: the longest frame WebRTC's VAD takes.


@dataclasses.dataclass(frozen=True)
class Segment:
    """Voiced intervals (seconds in the source) that make one output sample."""

    intervals: tuple[Interval, ...]

    @property
    def start(self) -> float:
        return self.intervals[0][0]

    @property
    def end(self) -> float:
        return self.intervals[-1][1]

    def sample_ranges(self) -> list[tuple[int, int]]:
        """The intervals as 16 kHz sample index ranges, as ``int(t * 16000)`` in Libri-light."""
        return [(int(a * SAMPLE_RATE), int(b * SAMPLE_RATE)) for a, b in self.intervals]


@dataclasses.dataclass(frozen=True)
class Clipping:
    """What :func:`clip` had to change: intervals cut at the file's end or dropped."""

    clipped: int = 0
    dropped: int = 0


def clip(intervals: Iterable[Interval], duration: float) -> tuple[list[Interval], Clipping]:
    """Sorts intervals, clips them to ``[0, duration]`` and drops the empty ones.

    Sidecars sometimes hold intervals that end a little after the audio (rounding) or lie
    wholly outside it (a sidecar from another file); both are counted, never fatal.
    """
    out, clipped, dropped = [], 0, 0
    for a, b in sorted(intervals):
        a2, b2 = max(a, 0.0), min(b, duration)
        if b2 <= a2:
            dropped += 1
            continue
        if (a2, b2) != (a, b):
            clipped += 1
        if out and a2 < out[-1][1]:  # Overlap: merge, so no sample is stored twice.
            out[-1] = (out[-1][0], max(out[-1][1], b2))
        else:
            out.append((a2, b2))
    return out, Clipping(clipped, dropped)


def group(intervals: Sequence[Interval], target_seconds: float) -> list[Segment]:
    """Joins intervals greedily up to ``target_seconds`` of voiced audio (Libri-light rule)."""
    segments: list[Segment] = []
    current: list[Interval] = []
    accumulated = 0.0
    for start, end in intervals:
        length = end - start
        if accumulated + length > target_seconds and accumulated > 0:
            segments.append(Segment(tuple(current)))
            current, accumulated = [], 0.0
        current.append((start, end))
        accumulated += length
    if current:
        segments.append(Segment(tuple(current)))
    return segments


class Detector:
    """Frame-level speech decisions over a 16 kHz stream fed in blocks of any size.

    Args:
        method: ``webrtc`` or ``energy``.
        aggressiveness: WebRTC VAD mode, 0 (least) to 3 (most aggressive).
        min_speech: Shortest speech run kept, seconds.
        min_silence: Shortest pause that splits speech, seconds (shorter pauses are bridged).
    """

    def __init__(
        self,
        method: str = "webrtc",
        aggressiveness: int = 2,
        min_speech: float = 0.1,
        min_silence: float = 0.3,
    ):
        if method not in DETECTORS:
            raise ValueError(f"unknown VAD {method!r}; choose one of {', '.join(DETECTORS)}")
        self.method = method
        self._vad = None
        if method == "webrtc":
            import webrtcvad

            self._vad = webrtcvad.Vad(aggressiveness)
        self._min_speech = min_speech
        self._min_silence = min_silence
        self._pending = np.zeros(0, dtype=np.float32)
        self._decisions: list[bool] = []
        self._energies: list[float] = []

    def feed(self, block: np.ndarray) -> None:
        """Takes the next block of the 16 kHz stream (float32, or int16 scaled by 32768)."""
        if block.dtype == np.int16:
            block = np.multiply(block, np.float32(1 / 32768), dtype=np.float32)
        data = np.concatenate([self._pending, block]) if len(self._pending) else block
        n = len(data) // _FRAME
        frames = data[: n * _FRAME].reshape(n, _FRAME)
        self._pending = data[n * _FRAME :].copy()
        if self._vad is not None:
            pcm = np.clip(np.rint(frames * 32768.0), -32768, 32767).astype("<i2")
            self._decisions.extend(self._vad.is_speech(row.tobytes(), SAMPLE_RATE) for row in pcm)
        else:
            energy = 10.0 * np.log10(np.mean(frames.astype(np.float64) ** 2, axis=1) + 1e-12)
            self._energies.extend(energy.tolist())

    def intervals(self) -> list[Interval]:
        """Speech intervals in seconds, after bridging short pauses and dropping blips."""
        if self._vad is not None:
            speech = np.asarray(self._decisions, dtype=bool)
        else:
            energy = np.asarray(self._energies)
            if energy.size == 0:
                return []
            # Threshold 15 dB above the noise floor (10th percentile), never below -55 dBFS.
            threshold = max(np.percentile(energy, 10) + 15.0, -55.0)
            speech = energy > threshold
        return _runs(speech, _FRAME / SAMPLE_RATE, self._min_speech, self._min_silence)


def _runs(
    speech: np.ndarray, frame_seconds: float, min_speech: float, min_silence: float
) -> list[Interval]:
    runs: list[list[int]] = []
    for i in np.flatnonzero(speech):
        if runs and (i - runs[-1][1]) * frame_seconds < min_silence:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [
        (a * frame_seconds, b * frame_seconds)
        for a, b in runs
        if (b - a) * frame_seconds >= min_speech
    ]
