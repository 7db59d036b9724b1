"""A unit-quality report for one label set: numbers, figures and one self-contained HTML page.

:func:`build` reads what the earlier stages left under ROOT (labels, their k-means, the
manifests and rejects) and, given reference phones, the purity and PNMI measures of
:mod:`units.quality.metrics`; :func:`write` renders ``ROOT/reports/NAME/``::

    report.html     every figure embedded (base64 PNG): one file to open or send
    metrics.json    the numbers the page shows, the lineage, the reference phones' sha256
    usage.png       unit usage, most used first, with dead units and perplexity
    phone_unit.png  P(phone | unit), units ordered by their dominant phone (HuBERT, Fig. 2)
    utterances.png  a few utterances: log-mel spectrogram, phones and units on one time axis
    inertia.png     k-means inertia per iteration (a k-means label set's only)
    corpus.png      utterance durations and hours per speaker
    rejects.png     rejects by stage and reason (when there are any)

The files are written to a hidden sibling directory and swapped in as a whole: no figure of
an earlier run stays beside a new page, and a run stopped while writing leaves the earlier
report whole (:func:`write`). :func:`update` builds and writes a report without ever
replacing one with a poorer one: a rerun without reference phones reuses those of the
report already there, or keeps that report when they are gone
(:func:`units.quality.lineage.choose_phones`).

A label set from any target is reported: a k-means's (``meta.json`` names it in
``kmeans``) or a BEST-RQ quantizer's (``target: bestrq``; the first codebook's units).
:mod:`units.quality.compare` puts several label sets side by side.

The manifests, label shards and rejects are read in record batches and aggregated batch by
batch with Arrow: only per-speaker hours, a fixed-bin duration histogram, per-unit counts,
the units of utterances with references and the few utterances the view draws are kept, so
the report's memory follows the speakers, the units and the reference set, never the number
of utterances.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import html
import io
import json
import logging
import os
import shutil
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shards.core import storage
from shards.core.atomic import fsync_dir, read_json, temp_prefix, write_atomic
from shards.core.outputs import OutputLayout, StageError
from shards.root import RootLayout
from units.labels.model import label_layout
from units.quality import lineage, metrics, phone_refs, utterance_view

log = logging.getLogger(__name__)

#: Rows per record batch aggregated at once. The driver holds one Parquet row group and
#: one batch of it (a batch of manifest keys, durations and speakers is a few MB), so its
#: memory is the same for ten thousand utterances and for ten million.
BATCH_ROWS = 65_536

#: The duration histogram's bin edges in seconds, fixed whatever the corpus, so that batches
#: are counted as they come without a first pass to find the range: 100 bins per decade,
#: equally wide on a log scale (each about 2.3% of its duration, finer than any figure
#: shows), from 10 ms to 100,000 s (27.8 h). A log scale because durations span VAD
#: segments of a fraction of a second to whole files of hours passed through unsegmented.
DURATION_EDGES = np.logspace(-2, 5, 7 * 100 + 1)


@dataclasses.dataclass
class DurationHistogram:
    """Utterance durations counted into the fixed :data:`DURATION_EDGES` bins.

    The figure is drawn from these counts, so the report holds one count per bin instead of
    one duration per utterance. A duration outside the edges counts in the first or last
    bin: every utterance is counted exactly once.

    Example:
        >>> h = DurationHistogram()
        >>> h.add(np.array([1.0, 2.5, 14.2]))
        >>> h.utterances
        3
    """

    counts: np.ndarray = dataclasses.field(
        default_factory=lambda: np.zeros(len(DURATION_EDGES) - 1, np.int64)
    )

    @property
    def edges(self) -> np.ndarray:
        return DURATION_EDGES

    @property
    def utterances(self) -> int:
        return int(self.counts.sum())

    def add(self, durations: np.ndarray) -> None:
        """Counts one batch of durations (seconds)."""
        clipped = np.clip(np.asarray(durations, np.float64), DURATION_EDGES[0], DURATION_EDGES[-1])
        self.counts += np.histogram(clipped, DURATION_EDGES)[0]

    def shown(self, bars: int = 40) -> tuple[np.ndarray, np.ndarray]:
        """``(counts, edges)`` for a figure: the bins from the first to the last one used,
        merged by groups of adjacent bins into at most ``bars`` bars (the last group may be
        narrower). Empty arrays when nothing was counted."""
        used = np.flatnonzero(self.counts)
        if len(used) == 0:
            return np.zeros(0, np.int64), np.zeros(0)
        lo, hi = int(used[0]), int(used[-1]) + 1
        group = -(-(hi - lo) // bars)  # ceil
        starts = np.arange(lo, hi, group)
        return np.add.reduceat(self.counts[:hi], starts), DURATION_EDGES[np.append(starts, hi)]


@dataclasses.dataclass
class Report:
    """What a report shows: the numbers (``metrics``) and what the figures are drawn from.

    Nothing here grows with the number of utterances: durations are a fixed-bin histogram,
    hours are per speaker, counts per unit and per reject reason, and the ``joint`` counts
    per (phone, unit).
    """

    name: str
    metrics: dict
    joint: metrics.JointCounts | None
    unit_counts: list[int]
    inertia: list[float]
    iterations: list[int]
    durations: DurationHistogram
    hours_by_speaker: dict[str, float]
    rejects: dict[str, int]
    #: Frames the k-means was fitted on: ``inertia`` is per frame when known, else the total.
    inertia_frames: int | None = None
    #: The few utterances the utterance view draws (:mod:`units.quality.utterance_view`).
    utterances: list[utterance_view.Utterance] = dataclasses.field(default_factory=list)


def build(root: str, labels: str, phones: str | None = None) -> Report:
    """Gathers a label set's numbers, with PNMI and purities when ``phones`` is given.

    Streams the utterances manifest, the label shards and the rejects in record batches of
    at most :data:`BATCH_ROWS` rows, aggregating each batch with Arrow: the driver's memory
    follows the speakers, the units and the reference utterances, never the corpus. The
    audio of the few utterances the utterance view draws is read from their shards.

    Args:
        root: The dataset root (a local path or a URL).
        labels: The label set's name (``ROOT/labels/NAME``).
        phones: Reference phones (see :func:`phone_refs.read_references`), or None for
            unit usage only.

    Returns:
        The report's numbers and figure data; :func:`write` renders them.

    Raises:
        StageError: No finished label set of that name.
        phone_refs.ReferenceError: Unreadable references, or references at another rate.
        metrics.MetricsError: References that share no utterance with the labels.
    """
    root = RootLayout(root).root
    layout = label_layout(root, labels)
    meta = label_meta(root, labels)
    refs = phone_refs.read_references(phones) if phones else None
    # The reference keys as an Arrow set: each batch picks its reference rows with is_in,
    # not with a Python lookup per row.
    ref_keys = pa.array(list(refs), pa.string()) if refs is not None else None
    # The label pass's rejects have no units: their audio is not the labels' audio.
    corpus = _corpus_stats(
        RootLayout(root).manifest("utterances.parquet"), ref_keys, _rejected_keys(layout)
    )
    if refs is not None:
        phone_refs.check_rate(refs, corpus.ref_durations, phones)

    k, hyps = int(meta["k"]), {}
    usage = metrics.UnitUsage(k)
    shown = utterance_view.Selection(meta["frame_rate"])
    for batch in _batches(layout.path("units"), ["key", "units"]):
        units = batch.column("units")
        # flatten() honours a sliced array, where .values would not.
        offsets = units.offsets.to_numpy() - units.offsets[0].as_py()
        values = units.flatten().to_numpy().astype(np.int64)
        usage.add_flat(values, offsets)
        keys = batch.column("key")
        if ref_keys is None:
            for i in range(len(keys)):  # The first few utterances only: then it is full.
                if shown.full:
                    break
                shown.offer(keys[i].as_py(), values[offsets[i] : offsets[i + 1]])
        else:
            picked = pc.is_in(keys, value_set=ref_keys).to_numpy(zero_copy_only=False)
            for i in np.flatnonzero(picked):
                # A copy: a view would keep the whole batch's values alive with it.
                hyps[keys[i].as_py()] = values[offsets[i] : offsets[i + 1]].copy()
    seconds = corpus.seconds - corpus.rejected_seconds
    numbers = {
        "labels": labels,
        # Only a k-means label set has one; BEST-RQ's name their quantizer instead.
        "kmeans": meta.get("kmeans"),
        **{key: meta[key] for key in _TARGET_KEYS if key in meta},
        "k": k,
        "frame_rate": meta["frame_rate"],
        "utterances": meta["utterances"],
        "hours": meta.get("hours"),
        "usage": usage.summary(),
        "seconds": seconds,
        # Sequence lengths per second of audio, as a model trained on them sees them.
        "units_per_second": usage.frames / seconds if seconds > 0 else 0.0,
        "dedup_units_per_second": usage.runs / seconds if seconds > 0 else 0.0,
    }
    joint = None
    if refs is not None:
        joint = metrics.joint_counts(refs, hyps, ref_rate=100.0, hyp_rate=meta["frame_rate"])
        numbers["phones"] = dict(
            metrics.quality(joint),
            references=phones,
            references_sha256=phone_refs.fingerprint(phones),
        )
        for key, units in hyps.items():  # With references: the first ones that have them.
            shown.offer(key, units)
    numbers["lineage"] = lineage.of_labels(root, labels, meta)
    iterations, inertia = kmeans_iterations(root, meta.get("kmeans"))
    fitted = _fitted_frames(root, meta.get("kmeans"))
    if fitted:
        inertia = [value / fitted for value in inertia]  # Comparable across corpus sizes.
    rejects = _rejects(root, layout)
    numbers["rejects"] = rejects
    return Report(
        name=labels,
        metrics=numbers,
        joint=joint,
        unit_counts=usage.counts.tolist(),
        inertia=inertia,
        iterations=iterations,
        inertia_frames=fitted,
        durations=corpus.durations,
        hours_by_speaker={s: seconds / 3600 for s, seconds in corpus.seconds_by_speaker.items()},
        rejects=rejects,
        utterances=utterance_view.load(root, shown.units, meta, refs),
    )


def label_meta(root: str, labels: str) -> dict:
    """The ``meta.json`` of a finished label set.

    Raises:
        StageError: No finished label set of that name.
    """
    meta = read_json(label_layout(root, labels).path("meta.json"))
    if meta is None:
        raise StageError(f"no finished labels {labels!r} under {root}: run pipelines.label first")
    return meta


#: The lineage keys of ``meta.json`` that say which target labelled (BEST-RQ's; a k-means
#: label set has ``kmeans`` alone), copied into the report's numbers.
_TARGET_KEYS = ("target", "bestrq", "codebooks", "stack")


def target(numbers: dict) -> str:
    """What labelled: ``k-means NAME k=K`` or ``BEST-RQ NAME codebook K`` (``xN`` with N
    codebooks; the reports measure the first)."""
    if numbers.get("target") == "bestrq":
        codebooks = numbers.get("codebooks") or 1
        many = f" x{codebooks}" if codebooks > 1 else ""
        return f"BEST-RQ {numbers.get('bestrq')} codebook {numbers['k']}{many}"
    if numbers.get("kmeans") is not None:
        return f"k-means {numbers['kmeans']} k={numbers['k']}"
    return f"{numbers.get('target', 'labels')} k={numbers['k']}"


@dataclasses.dataclass
class _CorpusStats:
    durations: DurationHistogram
    seconds_by_speaker: dict[str, float]
    ref_durations: dict[str, float]
    seconds: float = 0.0
    rejected_seconds: float = 0.0


def _corpus_stats(
    manifest: str, ref_keys: pa.Array | None, rejected: pa.Array | None = None
) -> _CorpusStats:
    """One pass over the utterances manifest: the duration histogram, the seconds per
    speaker (``?`` for none), the durations of the reference utterances, and the seconds of
    all utterances and of those in ``rejected``."""
    stats = _CorpusStats(DurationHistogram(), collections.defaultdict(float), {})
    for batch in _batches(manifest, ["key", "duration", "speaker"]):
        duration = batch.column("duration")
        seconds = duration.to_numpy(zero_copy_only=False)
        stats.durations.add(seconds)
        stats.seconds += float(seconds.sum())
        if rejected is not None and len(rejected):
            hit = pc.is_in(batch.column("key"), value_set=rejected).to_numpy(zero_copy_only=False)
            stats.rejected_seconds += float(seconds[hit].sum())
        speaker = batch.column("speaker")
        # No speaker and an empty name are both "?", as the figure has always shown them.
        speaker = pc.if_else(pc.equal(speaker, ""), pa.scalar(None, speaker.type), speaker)
        speaker = pc.fill_null(speaker, "?")
        sums = (
            pa.table({"speaker": speaker, "duration": duration})
            .group_by("speaker", use_threads=False)  # One thread: the same sums every run.
            .aggregate([("duration", "sum")])
        )
        for name, seconds in zip(
            sums.column("speaker").to_pylist(), sums.column("duration_sum").to_pylist(), strict=True
        ):
            stats.seconds_by_speaker[name] += seconds
        if ref_keys is not None:
            hit = batch.filter(pc.is_in(batch.column("key"), value_set=ref_keys))
            keys, seconds = hit.column("key").to_pylist(), hit.column("duration").to_pylist()
            stats.ref_durations.update(zip(keys, seconds, strict=True))
    stats.seconds_by_speaker = dict(stats.seconds_by_speaker)
    return stats


def _batches(path: str, columns: list[str]):
    """Record batches of ``columns`` from a Parquet file or a directory of them (hidden and
    temporary files skipped, as :func:`storage.dataset` does), at most :data:`BATCH_ROWS`
    rows each, read one row group at a time.

    One row group in memory, whatever the corpus: the manifests are written in fixed-size
    row groups, a label shard is one shard's rows. pyarrow's dataset scanner is not used
    for the reading itself: it pre-buffers a file's column chunks across its row groups
    and, when the consumer is slower than the reader, decodes row groups ahead past its
    readahead settings; measured on a 3M-utterance root, its memory grew with the corpus.
    """
    import pyarrow.parquet as pq

    dataset = storage.dataset(path)
    for file in dataset.files:
        with dataset.filesystem.open_input_file(file) as stream:
            parquet = pq.ParquetFile(stream)
            for group in range(parquet.num_row_groups):
                table = parquet.read_row_group(group, columns=columns)
                yield from table.to_batches(max_chunksize=BATCH_ROWS)


def _rejected_keys(layout: OutputLayout) -> pa.Array | None:
    """The keys of the utterances the label pass rejected (None when there are none, or
    when the rejects do not name them)."""
    directory = os.path.join(layout.directory, "rejects")
    if not storage.glob(directory, "*.parquet"):
        return None
    if "key" not in storage.dataset(directory).schema.names:
        return None
    keys = [batch.column("key").drop_null() for batch in _batches(directory, ["key"])]
    return pa.concat_arrays(keys) if keys else None


def kmeans_iterations(root: str, kmeans: str | None) -> tuple[list[int], list[float]]:
    """The k-means iterations as ``iterations.parquet`` numbers them (Lloyd's iteration 0 is
    the initial centroids), and the inertia at each; none without a k-means (BEST-RQ)."""
    if kmeans is None:
        return [], []
    path = os.path.join(root, "kmeans", kmeans, "iterations.parquet")
    if not storage.exists(path):
        return [], []
    table = storage.read_parquet(path, columns=["iteration", "inertia"])
    return table.column("iteration").to_pylist(), table.column("inertia").to_pylist()


def _fitted_frames(root: str, kmeans: str | None) -> int | None:
    """The frames a k-means was fitted on (``kmeans.json``'s ``rows``), if it says."""
    if kmeans is None:
        return None
    saved = read_json(os.path.join(root, "kmeans", kmeans, "kmeans.json"))
    return int(saved["rows"]) if saved and saved.get("rows") else None


def _rejects(root: str, layout: OutputLayout) -> dict[str, int]:
    """``stage: reason`` -> count, for the shard stage and the label pass."""
    out: dict[str, int] = collections.Counter()
    shard_rejects = RootLayout(root).manifest("rejects.parquet")
    if storage.exists(shard_rejects):
        for (stage, reason), n in _count(shard_rejects, ["stage", "reason"]).items():
            out[f"{stage}: {reason}"] += n
    label_rejects = os.path.join(layout.directory, "rejects")
    if storage.glob(label_rejects, "*.parquet"):
        for (reason,), n in _count(label_rejects, ["reason"]).items():
            out[f"label: {reason}"] += n
    return dict(sorted(out.items()))


def _count(path: str, columns: list[str]) -> collections.Counter:
    """Rows per distinct value of ``columns`` (a tuple), counted batch by batch with Arrow."""
    out: collections.Counter = collections.Counter()
    for batch in _batches(path, columns):
        counted = (
            pa.Table.from_batches([batch])
            .group_by(columns, use_threads=False)
            .aggregate([(columns[0], "count", pc.CountOptions(mode="all"))])
        )
        names = zip(*(counted.column(c).to_pylist() for c in columns), strict=True)
        for name, n in zip(names, counted.column(f"{columns[0]}_count").to_pylist(), strict=True):
            out[name] += n
    return out


def headline(numbers: dict) -> str:
    """One line: PNMI and purities (with references), perplexity and dead units."""
    usage = numbers["usage"]
    tail = f"perplexity {usage['perplexity']:.1f} of k={numbers['k']}, {usage['dead']} dead"
    if "phones" not in numbers:
        return f"units: {tail}"
    p = numbers["phones"]
    return (
        f"units: PNMI {p['pnmi']:.3f}, phone purity {p['phone_purity']:.3f}, cluster purity "
        f"{p['cluster_purity']:.3f} on {p['frames']} frames of {p['utterances']} utterances "
        f"({p['missing_utterances']} without units); {tail}"
    )


# --------------------------------------------------------------------------- figures
def figures(report: Report) -> dict[str, bytes]:
    """PNG bytes per figure name."""
    import matplotlib

    matplotlib.use("Agg")  # Headless: workers and CI have no display.
    import matplotlib.pyplot as plt

    out = {}
    for name, draw in (
        ("usage", _usage),
        ("phone_unit", _phone_unit),
        ("utterances", _utterances),
        ("inertia", _inertia_figure),
        ("corpus", _corpus),
        ("rejects", _rejects_figure),
    ):
        fig = draw(plt, report)
        if fig is None:
            continue
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        out[name] = buffer.getvalue()
    return out


def _usage(plt, report: Report):
    counts = np.sort(np.asarray(report.unit_counts))[::-1]
    usage = report.metrics["usage"]
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.bar(np.arange(len(counts)), np.maximum(counts, 0.5), width=1.0, color="#4c72b0")
    ax.set_yscale("log")
    ax.set_xlabel("units, most used first")
    ax.set_ylabel("frames")
    ax.set_title(
        f"Unit usage: perplexity {usage['perplexity']:.1f} of k={len(counts)}, {usage['dead']} dead"
    )
    return fig


def _phone_unit(plt, report: Report):
    if report.joint is None:
        return None
    joint = report.joint
    p = joint.counts / joint.counts.sum()
    p_phone_given_unit = p / np.maximum(p.sum(0, keepdims=True), 1e-12)
    # Phones by frequency; units by their dominant phone, then by how pure they are.
    phone_order = np.argsort(-p.sum(1), kind="stable")
    rank = np.empty(len(phone_order), np.int64)
    rank[phone_order] = np.arange(len(phone_order))
    dominant = p_phone_given_unit.argmax(0)
    unit_order = np.lexsort((-p_phone_given_unit.max(0), rank[dominant]))
    shown = p_phone_given_unit[phone_order][:, unit_order]
    # At most 24 inches wide: thousands of units (a BEST-RQ codebook) stay a readable page.
    width = min(max(6, len(unit_order) / 12), 24)
    fig, ax = plt.subplots(figsize=(width, max(4, len(phone_order) / 4)))
    image = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_yticks(np.arange(len(phone_order)))
    ax.set_yticklabels([joint.phones[i] for i in phone_order], fontsize=7)
    ax.set_xlabel("units, ordered by their most likely phone")
    ax.set_title(f"P(phone | unit), PNMI {report.metrics['phones']['pnmi']:.3f}")
    fig.colorbar(image, ax=ax, fraction=0.03)
    return fig


def _utterances(plt, report: Report):
    parts = "log-mel spectrogram, reference phones and units"
    if all(u.waveform is None for u in report.utterances):
        parts = "reference phones and units"
    elif all(u.phones is None for u in report.utterances):
        parts = "log-mel spectrogram and units"
    title = f"{len(report.utterances)} utterances: {parts} ({target(report.metrics)})"
    return utterance_view.figure(plt, report.utterances, title)


def _inertia_figure(plt, report: Report):
    if not report.inertia:
        return None
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(report.iterations, report.inertia, marker="o", ms=3)
    ax.set_xlabel("iteration")
    ax.set_ylabel("inertia per frame" if report.inertia_frames else "inertia (total)")
    ax.set_title(f"k-means {report.metrics['kmeans']}")
    return fig


def _corpus(plt, report: Report):
    from matplotlib import ticker

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3))
    counts, edges = report.durations.shown()
    if len(counts):
        # The bins are equally wide on a log scale: on a log axis, bar heights compare.
        left.stairs(counts, edges, fill=True, color="#55a868")
        left.set_xscale("log")
        # Plain numbers (3, 10, 30) rather than matplotlib's default 3x10^0 on a log axis.
        left.xaxis.set_major_formatter(ticker.LogFormatter())
        left.xaxis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False))
    else:
        left.text(0.5, 0.5, "no utterances", ha="center", va="center")
    left.set_xlabel("utterance duration (s, log scale)")
    left.set_ylabel("utterances per bin")
    left.set_title(f"{report.durations.utterances:,} utterances")
    speakers = sorted(report.hours_by_speaker.items(), key=lambda kv: -kv[1])[:40]
    right.bar(range(len(speakers)), [h for _, h in speakers], color="#c44e52")
    right.set_xticks(range(len(speakers)))
    right.set_xticklabels([s for s, _ in speakers], rotation=90, fontsize=6)
    right.set_ylabel("hours")
    right.set_title(f"{len(report.hours_by_speaker)} speakers (top 40)")
    return fig


def _rejects_figure(plt, report: Report):
    if not report.rejects:  # No panel without data: the table says "rejects: none".
        return None
    names = list(report.rejects)
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.35 * len(names)))
    ax.barh(range(len(names)), [report.rejects[n] for n in names], color="#8172b2")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xlabel("files or utterances")
    ax.set_title("Rejects by stage and reason")
    return fig


# ------------------------------------------------------------------------------ page
_CAPTIONS = {
    "usage": "How often each unit occurs. Dead units never occur; perplexity is exp(entropy).",
    "phone_unit": "Each column is a unit: the share of its frames on each phone. A good "
    "unit set shows a staircase: each phone owns a few pure units.",
    "utterances": "The first utterances of the label shards (with reference phones, the first "
    "that have them), from their start: the log-mel spectrogram, the reference phones and the "
    "units on one time axis. A line marks each place where the unit changes; a label is "
    "written where it fits. Each label is drawn over the hop around its window's centre.",
    "inertia": "k-means inertia (mean squared distance of a frame to its centroid, over the "
    "frames it was fitted on) at the centroids of each iteration: 0 is the initial "
    "centroids, the last is the final ones.",
    "corpus": "The corpus: utterance durations (on a log scale) and audio hours per speaker.",
    "rejects": "Inputs turned away, by stage and reason (details in the rejects tables).",
}


#: Readable names of the numbers in the page's table, by ``metrics.json`` group and key.
PHONE_NAMES = {
    "pnmi": "PNMI",
    "phone_purity": "phone purity",
    "cluster_purity": "cluster purity",
    "mutual_information": "mutual information I(phone; unit), nats",
    "h_phone": "phone entropy H(phone), nats",
    "h_unit": "unit entropy H(unit) on the references, nats",
    "phones": "phones",
    "units_seen": "units seen on the references",
    "frames": "frames compared",
    "frame_difference": "frames cut (length differences)",
    "utterances": "utterances compared",
    "missing_utterances": "reference utterances without units",
    "extra_utterances": "utterances with units but no reference",
    "references": "reference phones",
    "references_sha256": "reference phones sha256",
}
USAGE_NAMES = {
    "k": "units (k)",
    "frames": "label frames",
    "entropy": "unit entropy, nats",
    "perplexity": "perplexity",
    "used": "units used",
    "dead": "dead units",
    "mean_run_length": "mean run length, frames",
    "dedup_ratio": "deduplicated length / frames",
}


def _name(names: dict[str, str], key: str) -> str:
    return names.get(key, key.replace("_", " "))


def render_html(report: Report, pngs: dict[str, bytes]) -> str:
    """One page: the headline numbers, then every figure embedded as base64 PNG."""
    m = report.metrics
    rows = [("utterances", m["utterances"]), ("audio hours", m.get("hours")), ("k", m["k"])]
    rows += [("label rate (Hz)", m["frame_rate"]), ("labels from", target(m))]
    if "units_per_second" in m:
        rows += [("audio seconds labelled", m["seconds"])]
        rows += [("units per second", m["units_per_second"])]
        rows += [("deduplicated units per second", m["dedup_units_per_second"])]
    rows += [(_name(USAGE_NAMES, k), v) for k, v in m["usage"].items() if k != "k"]
    rows += [("rejects", sum(report.rejects.values()) if report.rejects else "none")]
    if "phones" in m:
        rows = [(_name(PHONE_NAMES, k), v) for k, v in m["phones"].items()] + rows
    table = "\n".join(f"<tr><th>{html.escape(str(k))}</th><td>{_fmt(v)}</td></tr>" for k, v in rows)
    headline = ""
    if "phones" in m:
        p = m["phones"]
        headline = (
            f"<p class=head>PNMI <b>{p['pnmi']:.3f}</b> · phone purity "
            f"<b>{p['phone_purity']:.3f}</b> · cluster purity <b>{p['cluster_purity']:.3f}</b>"
            f" on {p['frames']:,} frames of {p['utterances']} utterances</p>"
        )
    images = "\n".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode()}"><figcaption>{html.escape(_CAPTIONS[name])}'
        "</figcaption></figure>"
        for name, png in pngs.items()
    )
    title = html.escape(f"unitpipe report: {report.name} ({target(m)})")
    made_from = ""
    if "lineage" in m:
        made_from = "\n".join(
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
            for k, v in lineage.rows(m["lineage"])
        )
        made_from = f"<h2>Lineage</h2>\n<table class=lineage>{made_from}</table>"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}th,td{{padding:2px 10px;border-bottom:1px solid #ddd;
text-align:left}}figure{{margin:2em 0}}img{{max-width:100%}}.head{{font-size:1.3em}}
.lineage td{{font-family:monospace;font-size:0.9em;word-break:break-all}}</style>
</head><body><h1>{title}</h1>
{headline}
<table>{table}</table>
{images}
{made_from}
</body></html>
"""


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape(str(value))


def write(report: Report, directory: str) -> dict[str, str]:
    """Writes the page, ``metrics.json`` and the PNGs as ``directory``; returns their paths.

    A local directory is replaced as a whole (:func:`replace_directory`): nothing of an
    earlier report stays, and a run stopped midway leaves the earlier report whole. On an
    object store, which has no rename, each file is written whole, the page last (the
    report's commit), then the earlier report's other files are deleted.

    Raises:
        StageError: ``directory`` holds files that are not a report's.
    """
    pngs = figures(report)
    files = {f"{name}.png": png for name, png in pngs.items()}
    files["metrics.json"] = json.dumps(report.metrics, indent=1, sort_keys=True).encode()
    files["report.html"] = render_html(report, pngs).encode()
    replace_directory(directory, files)
    return _paths(directory, list(pngs))


def _paths(directory: str, figures: list[str]) -> dict[str, str]:
    paths = {name: os.path.join(directory, f"{name}.png") for name in figures}
    paths["metrics"] = os.path.join(directory, "metrics.json")
    paths["report"] = os.path.join(directory, "report.html")
    return paths


# --------------------------------------------------------------- writing, and rerunning
@dataclasses.dataclass
class Outcome:
    """What :func:`update` did.

    Attributes:
        paths: The report's files (figure names, ``metrics``, ``report``).
        metrics: Its numbers (``metrics.json``).
        written: False when the report already there was kept as it was.
        note: What was decided about the reference phones, when none were given.
    """

    paths: dict[str, str]
    metrics: dict
    written: bool
    note: str | None = None


def update(
    root: str,
    labels: str,
    directory: str,
    phones: str | None = None,
    *,
    built: Report | None = None,
) -> Outcome:
    """Builds and writes label set ``labels``' report as ``directory``, never replacing a
    report with a poorer one.

    With ``phones``, they are used. Without, the report already in ``directory`` decides
    (:func:`units.quality.lineage.choose_phones`): its reference phones are used again when
    they are still there with the same sha256; when they are gone or changed and the labels
    are the same, that report is kept as it is and nothing is written; otherwise the report
    shows unit usage only. The decision is logged and returned in ``note``.

    Args:
        root: The dataset root.
        labels: The label set's name.
        directory: The report's directory (``ROOT/reports/NAME`` by default).
        phones: Reference phones, or None.
        built: This label set's report already built with ``phones`` (a comparison builds
            every set's), written as it is unless other phones are chosen.

    Raises:
        As :func:`build` and :func:`write`.
    """
    root = RootLayout(root).root
    meta = label_meta(root, labels)
    _recover(directory)  # A swap cut short: the earlier report back in place first.
    check_directory(directory)
    fingerprint = lineage.labels_fingerprint(meta)
    choice = lineage.choose_phones(directory, phones, labels, fingerprint, meta)
    if choice.note:  # Phones reused: as asked for, in effect; otherwise worth a warning.
        level = logging.INFO if choice.phones else logging.WARNING
        log.log(level, "report %s: %s", labels, choice.note)
    if choice.keep:
        figures = [n[: -len(".png")] for n in storage.listdir(directory) if n.endswith(".png")]
        kept = lineage.previous_metrics(directory)
        return Outcome(_paths(directory, figures), kept, written=False, note=choice.note)
    if built is None or choice.phones != phones:
        built = build(root, labels, choice.phones)
    return Outcome(write(built, directory), built.metrics, written=True, note=choice.note)


def _is_report_file(name: str) -> bool:
    """A name a report directory holds: the page, the numbers, the figures (whatever their
    names, those of earlier versions too), or a temporary file of an earlier writer."""
    return name in ("report.html", "metrics.json") or name.endswith(".png") or ".tmp-" in name


def check_directory(directory: str) -> None:
    """Raises :class:`StageError` when ``directory`` holds anything but a report's files: a
    report replaces its directory as a whole, which must not take anything else with it."""
    if storage.is_url(directory):
        return
    directory = storage.local_path(directory)
    if not os.path.lexists(directory):
        return
    if not os.path.isdir(directory):
        raise StageError(f"{directory} is a file, not a report directory")
    others = [name for name in sorted(os.listdir(directory)) if not _is_report_file(name)]
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise StageError(
            f"{directory} holds files that are not a report's ({shown}): a report replaces its "
            "directory as a whole; give it a directory of its own"
        )


def replace_directory(directory: str, files: dict[str, bytes]) -> None:
    """Makes ``directory`` hold ``files`` (name: bytes) and nothing else.

    Locally: the files are written and fsynced in a hidden sibling directory
    (``.NAME.tmp-...``), the earlier directory is renamed aside (``.NAME.old-...``), the new
    one renamed into place, and the earlier one deleted. Until the second rename the earlier
    report is untouched; a process killed between the two renames leaves it aside, and the
    next writer puts it back (:func:`_recover`) before anything else. Written by hand: the
    standard library and pyarrow swap single files, not directories.

    On an object store each file is written whole, ``report.html`` last, then files of the
    earlier report that are not among ``files`` are deleted.
    """
    if storage.is_url(directory):
        order = sorted(files, key=lambda name: name == "report.html")  # The page last.
        for name in order:
            write_atomic(storage.join(directory, name), files[name])
        for name in storage.listdir(directory):
            if name not in files and _is_report_file(name):
                storage.remove(storage.join(directory, name))
        return
    directory = os.path.normpath(storage.local_path(directory))
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    _recover(directory)
    check_directory(directory)
    fresh = f"{temp_prefix(directory)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    aside = None
    os.mkdir(fresh)
    try:
        for name, data in files.items():
            with open(os.path.join(fresh, name), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        fsync_dir(fresh)
        if os.path.lexists(directory):
            aside = _aside_prefix(directory) + f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(directory, aside)
        os.rename(fresh, directory)
    except BaseException:
        if aside is not None and not os.path.lexists(directory):
            os.rename(aside, directory)  # The earlier report back where it was.
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    fsync_dir(parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _aside_prefix(directory: str) -> str:
    parent, name = os.path.split(directory)
    return os.path.join(parent, f".{name}.old-")


def _recover(directory: str) -> None:
    """Puts back an earlier report left aside by a writer stopped between its two renames
    (when nothing is at ``directory``), and deletes what stopped writers left: their
    unfinished directories and reports set aside. Call with no other writer of ``directory``
    alive (one report is written by one process at a time)."""
    if storage.is_url(directory):
        return
    directory = os.path.normpath(storage.local_path(directory))
    parent = os.path.dirname(directory)
    prefixes = (temp_prefix(directory), _aside_prefix(directory))
    left = [
        os.path.join(parent, name)
        for name in storage.listdir(parent)
        if os.path.join(parent, name).startswith(prefixes)
    ]
    aside = sorted((p for p in left if p.startswith(prefixes[1])), key=os.path.getmtime)
    if aside and not os.path.lexists(directory):
        log.warning("report: %s was left aside by a stopped writer: put back", aside[-1])
        os.rename(aside[-1], directory)
        left.remove(aside[-1])
    for path in left:
        shutil.rmtree(path, ignore_errors=True)
