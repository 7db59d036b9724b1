"""The utterance view's time axis and segments: each label on the cell around its window's
centre, at 100, 50 and 25 Hz, and runs that give back the labels they came from."""

from __future__ import annotations

import io

import numpy as np
import pytest

from units.features.frames import MFCC, SSL, FrameContract
from units.quality import utterance_view
from units.quality.phone_refs import frames_from_segments
from units.quality.utterance_view import (
    Selection,
    Utterance,
    label_times,
    segments,
    units_contract,
)

MFCC_SPEC = {"window": 400, "hop": 160}


@pytest.mark.parametrize(
    "meta, window, hop, first_centre",
    [
        # MFCC at 100 Hz: frame i's window is centred at i / 100 + 0.0125 s.
        ({"frame_rate": 100.0, "spec": MFCC_SPEC}, 400, 160, 0.0125),
        # An SSL layer at 50 Hz: the conv front end's 400-sample field every 320 samples.
        ({"frame_rate": 50.0, "spec": {"window": 400, "hop": 320}}, 400, 320, 0.0125),
        # BEST-RQ at 25 Hz: four 10 ms fbank frames stacked, 400 + 3 * 160 samples.
        ({"frame_rate": 25.0, "spec": MFCC_SPEC, "stack": 4}, 880, 640, 0.0275),
        # No spec recorded: the rate's hop and the 400-sample window.
        ({"frame_rate": 50.0}, 400, 320, 0.0125),
    ],
)
def test_labels_sit_on_the_cell_around_their_windows_centre(meta, window, hop, first_centre):
    contract = units_contract(meta)
    assert (contract.window, contract.hop) == (window, hop)
    assert contract.rate == meta["frame_rate"]
    edges = label_times(5, contract)
    centres = (edges[:-1] + edges[1:]) / 2
    np.testing.assert_allclose(centres, first_centre + np.arange(5) / meta["frame_rate"])
    np.testing.assert_allclose(np.diff(edges), 1 / meta["frame_rate"])


def test_segments_are_the_runs_of_the_labels_with_a_boundary_where_the_label_changes():
    units = np.array([7, 7, 7, 3, 3, 9, 7, 7], np.uint16)
    runs = segments(units, MFCC)
    assert [r.label for r in runs] == [7, 3, 9, 7]
    # Back to one label per frame: the runs' lengths in frames give the units again.
    lengths = [round((r.end - r.start) * MFCC.rate) for r in runs]
    np.testing.assert_array_equal(np.repeat([r.label for r in runs], lengths), units)
    assert [r.start for r in runs[1:]] == [r.end for r in runs[:-1]]  # No gap, no overlap.
    assert runs[0].start == pytest.approx(0.0075) and runs[1].start == pytest.approx(0.0375)
    assert runs[-1].end == pytest.approx(0.0075 + 8 / 100)
    assert segments([], MFCC) == []


def test_phone_segments_follow_the_reference_intervals_at_frame_resolution():
    # A phone from 0.1 to 0.3 s: frames whose centres lie inside it, drawn on their cells.
    frames = frames_from_segments([("a", 0.0, 0.1), ("b", 0.1, 0.3), ("c", 0.3, 0.5)], 0.5)
    runs = segments(frames, MFCC)
    assert [r.label for r in runs] == ["a", "b", "c"]
    assert runs[1].start == pytest.approx(0.0975) and runs[1].end == pytest.approx(0.2975)
    # Every boundary lies within half a frame of the interval's own boundary.
    assert abs(runs[1].start - 0.1) <= 0.005 and abs(runs[2].start - 0.3) <= 0.005


def test_the_selection_takes_the_first_utterances_that_are_not_too_long():
    chosen = Selection(rate=50.0, count=2)
    too_long = np.zeros(int(utterance_view.LONGEST_SECONDS * 50) + 1, np.int64)
    for key, units in [("empty", []), ("long", too_long), ("a", [1, 2]), ("b", [3]), ("c", [4])]:
        chosen.offer(key, np.asarray(units))
    assert list(chosen.units) == ["a", "b"] and chosen.full


def _image(png: bytes):
    import matplotlib.image

    return matplotlib.image.imread(io.BytesIO(png), format="png")


def test_the_figure_draws_each_utterance_with_what_it_has():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    wav = (0.1 * rng.standard_normal(16_000)).astype(np.float32)
    units = rng.integers(0, 50, SSL.frames(len(wav)))
    phones = ["sil"] * 20 + ["a"] * 40 + ["b"] * (MFCC.frames(len(wav)) - 60)
    shown = [
        Utterance("with_all", units, SSL, phones, wav),
        Utterance("no_phones", units, SSL, None, wav),
        Utterance("no_audio", units, FrameContract(400, 320), phones, None),
    ]
    fig = utterance_view.figure(plt, shown, "three")
    # Panels as tall as what they hold: spectrogram, phones and units; without phones;
    # without audio (inches: each panel's title and axis, 1.9 a spectrogram, 0.36 a track).
    assert fig.get_figheight() == pytest.approx(
        (0.75 + 1.9 + 0.36 + 0.36) + (0.75 + 1.9 + 0.36) + (0.75 + 0.36 + 0.36)
    )
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=60)
    plt.close(fig)
    image = _image(buffer.getvalue())
    assert image.shape[0] > 200 and image.std() > 0.01
    assert utterance_view.figure(plt, [], "none") is None
