"""A few utterances as a model sees them: log-mel spectrogram, reference phones and units on
one time axis.

The report shows :data:`COUNT` utterances, chosen without randomness: the first ones of the
label shards, in shard order, that are not longer than :data:`LONGEST_SECONDS` (with
reference phones, the first ones that have references). Only their audio is read, each
member straight from its shard through the manifest's byte offset and size.

Every label sequence is drawn on the time axis of its frame contract: label ``i`` covers
the hop-wide cell around the centre of its window, ``(i * hop + window / 2) / 16000`` s
(:func:`label_times`). For MFCC units at 100 Hz that is ``i / 100 + 0.0125`` s; for SSL
units at 50 Hz ``i / 50 + 0.0125`` s; for BEST-RQ's 25 Hz units, which stack four 10 ms
filterbank frames (window 400 + 3 * 160 samples, hop 640), ``i / 25 + 0.0275`` s. The 100 Hz
reference phones take the MFCC contract (:mod:`units.quality.phone_refs`), and the
spectrogram is computed with the same 25 ms windows every 10 ms without padding, so its
columns are the MFCC frames' cells.

Example:
    >>> from units.features.frames import MFCC
    >>> [(s.start, s.end, s.label) for s in segments([7, 7, 3], MFCC)]
    [(0.0075, 0.0275, 7), (0.0275, 0.0375, 3)]
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import pyarrow.compute as pc

from shards.core import storage
from shards.reader import read_audio
from shards.root import RootLayout
from units.bestrq.quantizer import stacked_contract
from units.features.frames import MFCC, SAMPLE_RATE, FrameContract
from units.labels.model import dedup

log = logging.getLogger(__name__)

#: Utterances shown.
COUNT = 3
#: The longest utterance whose audio is read for the view (an unsegmented file of hours
#: would otherwise be decoded whole on the driver).
LONGEST_SECONDS = 60.0
#: The stretch of each utterance drawn, from its start: enough for a few words, short
#: enough that runs of units stay wide enough to read.
SHOWN_SECONDS = 3.0
#: Mel bands of the spectrogram.
MELS = 80


@dataclasses.dataclass(frozen=True)
class Segment:
    """A run of one label: ``[start, end)`` seconds."""

    start: float
    end: float
    label: int | str


@dataclasses.dataclass
class Utterance:
    """What the view draws of one utterance.

    Attributes:
        key: The utterance.
        units: Its stored units (the label set's first codebook).
        contract: The units' framing (:func:`units_contract`).
        phones: Its reference phones, one per 100 Hz frame, or None.
        waveform: Its audio (float32), or None where it could not be read.
        sample_rate: The audio's rate.
    """

    key: str
    units: np.ndarray
    contract: FrameContract
    phones: list[str] | None = None
    waveform: np.ndarray | None = None
    sample_rate: int = SAMPLE_RATE

    @property
    def seconds(self) -> float:
        """The utterance's length: its audio's, else its units' end."""
        if self.waveform is not None:
            return len(self.waveform) / self.sample_rate
        return self.contract.samples_for(len(self.units)) / SAMPLE_RATE


class Selection:
    """The first :data:`COUNT` utterances offered that are not too long, in offer order.

    Example:
        >>> chosen = Selection(rate=100.0, count=2)
        >>> for key, units in [("a", [1, 2]), ("b", [3] * 7000), ("c", [4]), ("d", [5])]:
        ...     chosen.offer(key, np.array(units))
        >>> list(chosen.units)
        ['a', 'c']
    """

    def __init__(self, rate: float, count: int = COUNT):
        self.count = count
        self.longest = int(LONGEST_SECONDS * rate)
        self.units: dict[str, np.ndarray] = {}

    @property
    def full(self) -> bool:
        return len(self.units) >= self.count

    def offer(self, key: str, units: np.ndarray) -> None:
        """Takes ``units`` (copied) unless enough are taken or the utterance is too long."""
        if not self.full and 0 < len(units) <= self.longest:
            self.units[key] = np.array(units)


def units_contract(meta: dict) -> FrameContract:
    """The framing of a label set's units, from its ``meta.json``: the feature spec's window
    and hop, ``stack`` feature frames per label where the target stacks them (BEST-RQ).

    A label set whose spec is not recorded, or disagrees with its label rate, gets the
    label rate's hop and the 400-sample window that MFCC and the SSL front ends share.
    """
    rate = float(meta["frame_rate"])
    spec = meta.get("spec") or {}
    if spec.get("window") and spec.get("hop"):
        features = FrameContract(spec["window"], spec["hop"])
        contract = stacked_contract(features, meta.get("stack", 1))
        if abs(contract.rate - rate) < 1e-6:
            return contract
    return FrameContract(MFCC.window, int(round(SAMPLE_RATE / rate)))


def label_times(count: int, contract: FrameContract) -> np.ndarray:
    """The ``count + 1`` edges of the cells of ``count`` labels, in seconds: label ``i``
    covers the hop around its window's centre, ``[(i * hop + (window - hop) / 2) / 16000,
    ((i + 1) * hop + (window - hop) / 2) / 16000)``."""
    first = (contract.window - contract.hop) / 2
    return (np.arange(count + 1) * contract.hop + first) / SAMPLE_RATE


def segments(labels: Sequence, contract: FrameContract) -> list[Segment]:
    """Runs of equal labels (units, or phones) on the time axis of ``contract``: one
    :class:`Segment` per run, a boundary where the label changes."""
    values, lengths = dedup(np.asarray(labels))
    edges = label_times(len(labels), contract)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    return [
        Segment(float(edges[s]), float(edges[e]), v.item())
        for v, s, e in zip(values, starts, ends, strict=True)
    ]


def load(
    root: str,
    chosen: dict[str, np.ndarray],
    meta: dict,
    refs: dict[str, list[str]] | None = None,
) -> list[Utterance]:
    """The chosen utterances with their audio (read through the manifest's offsets) and
    their reference phones.

    Audio that cannot be read (a root without shards, a manifest without offsets, a member
    that does not decode) leaves ``waveform`` None and is logged. Without references, an
    utterance without audio has nothing to show but its units: none is returned then.
    """
    contract = units_contract(meta)
    audio = _audio(root, list(chosen))
    out = []
    for key, units in chosen.items():
        wav, rate = audio.get(key, (None, SAMPLE_RATE))
        phones = refs.get(key) if refs is not None else None
        if wav is None and phones is None:
            continue
        out.append(Utterance(key, units, contract, phones, wav, rate))
    return out


def _audio(root: str, keys: list[str]) -> dict[str, tuple[np.ndarray, int]]:
    manifest = RootLayout(root).manifest("utterances.parquet")
    columns = ["key", "shard", "offset", "size"]
    if not keys or not storage.exists(manifest):
        return {}
    if not set(columns) <= set(storage.dataset(manifest).schema.names):
        log.info("utterance view: %s has no byte offsets; drawn without audio", manifest)
        return {}
    # A filtered read: only the chosen keys' rows are kept, batch by batch.
    rows = storage.read_parquet(manifest, columns=columns, filters=pc.field("key").isin(keys))
    out = {}
    for row in rows.to_pylist():
        try:
            out[row["key"]] = read_audio(root, row["shard"], row["offset"], row["size"])
        except (OSError, ValueError, RuntimeError) as e:  # soundfile's errors are RuntimeErrors.
            log.warning("utterance view: %s: audio not read (%s); drawn without it", row["key"], e)
    return out


# --------------------------------------------------------------------------- figure
#: Colours of the tracks' alternate segments, and of their boundaries.
_PHONE_FILL = ("#dbe7f3", "#bcd2e8")
_UNIT_FILL = ("#f6e3cf", "#ecc9a5")
_BOUNDARY = "#444444"
_FONT = 7
#: The figure's width, a track's width (the figure less the labels at the left) and height,
#: and the spectrogram's height, in inches.
_WIDTH, _TRACK_WIDTH, _TRACK_HEIGHT, _SPECTROGRAM_HEIGHT = 12.0, 10.6, 0.36, 1.9
#: A panel's title and time axis, in inches.
_PANEL_MARGIN = 0.75


def figure(plt, utterances: list[Utterance], title: str):
    """One figure, one panel per utterance: the log-mel spectrogram (where its audio was
    read), its reference phones (where it has them) and its units, on one time axis."""
    if not utterances:
        return None
    heights = [_panel_height(u) for u in utterances]
    fig = plt.figure(figsize=(_WIDTH, sum(heights)), layout="constrained")
    fig.suptitle(title, fontsize=11)
    panels = fig.subfigures(len(utterances), 1, height_ratios=heights)
    for panel, utterance in zip(np.atleast_1d(panels), utterances, strict=True):
        _draw(panel, utterance)
    return fig


def _rows(utterance: Utterance) -> list[tuple[str, float]]:
    """The panel's rows and their heights: what the utterance has to show."""
    rows = []
    if utterance.waveform is not None:
        rows.append(("spectrogram", _SPECTROGRAM_HEIGHT))
    if utterance.phones is not None:
        rows.append(("phones", _TRACK_HEIGHT))
    return rows + [("units", _TRACK_HEIGHT)]


def _panel_height(utterance: Utterance) -> float:
    return _PANEL_MARGIN + sum(height for _, height in _rows(utterance))


def _draw(panel, utterance: Utterance) -> None:
    shown = min(utterance.seconds, SHOWN_SECONDS)
    rows = _rows(utterance)
    axes = panel.subplots(
        len(rows), 1, sharex=True, gridspec_kw={"height_ratios": [h for _, h in rows]}
    )
    axes = dict(zip([name for name, _ in rows], np.atleast_1d(axes), strict=True))
    length = f"{utterance.seconds:.1f} s"
    if shown < utterance.seconds:
        length = f"first {shown:.1f} s of {length}"
    panel.suptitle(f"{utterance.key} ({length})", fontsize=9, x=0.01, ha="left")
    if "spectrogram" in axes:
        _spectrogram(axes["spectrogram"], utterance, shown)
    if "phones" in axes:
        _track(axes["phones"], segments(utterance.phones, MFCC), shown, "phones", _PHONE_FILL)
    units = segments(utterance.units, utterance.contract)
    _track(axes["units"], units, shown, f"units ({utterance.contract.rate:g} Hz)", _UNIT_FILL)
    bottom = axes["units"]
    bottom.set_xlim(0, shown)
    bottom.set_xlabel("time (s)", fontsize=8)
    bottom.tick_params(axis="x", labelsize=7, labelbottom=True)


def _spectrogram(ax, utterance: Utterance, shown: float) -> None:
    import librosa
    import librosa.display

    rate = utterance.sample_rate
    # MFCC's framing: 25 ms windows every 10 ms, no padding (center=False), so that column j
    # is MFCC frame j and its cell is where a 100 Hz label j is drawn.
    window, hop = MFCC.window * rate // SAMPLE_RATE, MFCC.hop * rate // SAMPLE_RATE
    wav = utterance.waveform[: int(round(shown * rate)) + window]
    if len(wav) < window:
        ax.text(0.5, 0.5, "too short for a spectrogram", ha="center", va="center")
        return
    mel = librosa.feature.melspectrogram(
        y=wav, sr=rate, n_fft=window, hop_length=hop, center=False, n_mels=MELS
    )
    db = librosa.power_to_db(mel, ref=np.max, top_db=80.0)
    # Column centres (the mel axis gives librosa band centres too, so cells are drawn around
    # both): frame j's window centre. x_axis="s" formats the shared time axis in seconds.
    centres = (np.arange(db.shape[1]) * hop + window / 2) / rate
    librosa.display.specshow(
        db, x_coords=centres, x_axis="s", y_axis="mel", sr=rate, hop_length=hop, ax=ax,
        cmap="magma",
    )  # fmt: skip
    ax.set_ylabel("Hz (mel scale)", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.tick_params(axis="x", labelbottom=False)
    ax.set_xlabel("")


def _track(ax, runs: list[Segment], shown: float, name: str, fills: tuple[str, str]) -> None:
    """Labelled intervals: alternate fills, a line at each boundary, the label written
    where it fits (across the interval, else upright)."""
    runs = [r for r in runs if r.start < shown]
    spans = [(r.start, min(r.end, shown) - r.start) for r in runs]
    ax.broken_barh(spans, (0, 1), facecolors=[fills[i % 2] for i in range(len(spans))])
    ax.vlines([r.start for r in runs[1:]], 0, 1, color=_BOUNDARY, linewidth=0.5)
    ax.set_ylim(0, 1)
    ax.set_yticks([])
    ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    ax.tick_params(axis="x", labelbottom=False)
    # The track's size on the page, from the figure's fixed layout (the axes' own positions
    # are known only once constrained layout has run, at drawing time).
    points_per_second = _TRACK_WIDTH * 72 / shown
    height_pt = _TRACK_HEIGHT * 72
    for (start, width), run in zip(spans, runs, strict=True):
        text, room = str(run.label), width * points_per_second
        needed = len(text) * _FONT * 0.62 + 2
        if room >= needed:
            ax.text(start + width / 2, 0.5, text, ha="center", va="center", fontsize=_FONT)
        elif room >= _FONT * 1.2 and needed <= height_pt:
            ax.text(start + width / 2, 0.5, text, ha="center", va="center", fontsize=_FONT,
                    rotation=90)  # fmt: skip
