import numpy as np
import pytest

from shards import vad
from shards.synthetic import speechlike


def test_group_joins_greedily_up_to_the_target_like_cut_by_vad():
    intervals = [(0.0, 4.0), (5.0, 9.0), (10.0, 13.0), (14.0, 15.0)]
    segments = vad.group(intervals, target_seconds=8.0)
    # 4 + 4 = 8 fits (not > 8); adding 3 would pass 8, so a new segment starts.
    assert [s.intervals for s in segments] == [
        ((0.0, 4.0), (5.0, 9.0)),
        ((10.0, 13.0), (14.0, 15.0)),
    ]


def test_an_interval_longer_than_the_target_is_never_cut():
    segments = vad.group([(0.0, 1.0), (2.0, 50.0), (51.0, 52.0)], target_seconds=10.0)
    assert [s.intervals for s in segments] == [((0.0, 1.0),), ((2.0, 50.0),), ((51.0, 52.0),)]


def test_segment_sample_ranges_use_int_of_seconds_times_rate():
    seg = vad.Segment(((0.10005, 0.5),))
    assert seg.sample_ranges() == [(1600, 8000)]
    assert (seg.start, seg.end) == (0.10005, 0.5)


def test_clip_cuts_intervals_at_the_file_end_and_drops_those_outside():
    clipped, how = vad.clip([(9.0, 10.5), (-1.0, 0.5), (12.0, 13.0), (2.0, 3.0)], duration=10.0)
    assert clipped == [(0.0, 0.5), (2.0, 3.0), (9.0, 10.0)]
    assert (how.clipped, how.dropped) == (2, 1)


def test_clip_merges_overlaps_so_no_sample_is_stored_twice():
    clipped, _ = vad.clip([(1.0, 3.0), (2.0, 4.0)], duration=10.0)
    assert clipped == [(1.0, 4.0)]


@pytest.mark.parametrize("method", vad.DETECTORS)
def test_detectors_find_the_voiced_stretches_of_speechlike_audio(method):
    audio, truth = speechlike(30.0, seed=3)
    detector = vad.Detector(method)
    for i in range(0, len(audio), 7777):  # Blocks of an odd size: framing must carry over.
        detector.feed(audio[i : i + 7777])
    found = detector.intervals()
    assert found, "no speech found"
    frames = np.arange(0, 30.0, 0.01)
    truth_mask = np.zeros(frames.size, bool)
    found_mask = np.zeros(frames.size, bool)
    for a, b in truth:
        truth_mask[(frames >= a) & (frames < b)] = True
    for a, b in found:
        found_mask[(frames >= a) & (frames < b)] = True
    agreement = (truth_mask == found_mask).mean()
    assert agreement > 0.85, f"{method} agrees with the truth on only {agreement:.0%} of frames"


def test_detector_on_silence_finds_nothing():
    detector = vad.Detector("energy")
    detector.feed(np.zeros(16000 * 3, np.float32))
    assert detector.intervals() == []


def test_unknown_detector_is_refused():
    with pytest.raises(ValueError, match="unknown VAD"):
        vad.Detector("silero-from-the-hub")
