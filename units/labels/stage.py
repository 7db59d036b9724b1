"""The streaming label pass on Ray: every utterance of every audio shard gets its units.

For each audio shard a worker decodes the audio, computes features with exactly the spec
the k-means recorded (same extractor, checkpoint and layer), applies its PCA if it had one,
assigns the nearest centroid and writes uint16 units; features are never stored. A label
shard is committed atomically; a rerun skips committed shards and a finished run does
nothing. Units must have exactly the frames the frame contract gives for the utterance's
``num_samples``: a mismatch is an error naming the key.

Determinism (README, "Determinism"): a worker batches one shard's rows in manifest order,
cut at ``batch_seconds`` of audio (:func:`units.stage.batches`), so which worker
labels a shard, and how often it is retried, never changes a batch; on one machine type
the label shards are the same bytes. Elsewhere features move within float32 rounding, and
units only where the two nearest centroids are that close: at least 99.99% of frames agree.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import numpy as np
import pyarrow as pa

from shards.core import storage
from shards.core.atomic import read_json, write_atomic
from shards.core.outputs import ShardOutput, StageError
from shards.root import RootLayout
from units import project_version
from units.features import extractors
from units.features.extractors import ExtractorOptions
from units.features.fairseq_checkpoint import sha256_file
from units.labels import targets
from units.labels.model import KMeansModel, check_spec, dedup, label_layout
from units.schemas import LABELS, LABELS_DEDUP, list_column
from units.stage import check_frames, claim, rows_by_shard, run_pass

log = logging.getLogger(__name__)

_MANIFEST_COLUMNS = ["key", "shard", "offset", "size", "num_samples", "duration"]


class Labeller:
    """A labelling target (a finished k-means or BEST-RQ quantizer) with the extractor that
    rebuilds its features.

    Called on a batch of decoded utterances, it returns each one's features and units:
    the frame contract checked per utterance, one assignment for the whole batch (a single
    GEMM, or GPU search, instead of one per utterance).

    Args:
        root: Dataset root.
        target: Its reference (:mod:`units.labels.targets`: a k-means name, or
            ``bestrq:NAME``).
        extractor: Extractor to use instead of the one the target recorded (a moved
            checkpoint, say); it must compute the same features.
        device: ``cpu``, or ``cuda`` for the model and the centroid search.
    """

    def __init__(
        self,
        root: str,
        target: str,
        *,
        extractor: ExtractorOptions | None = None,
        device: str = "cpu",
    ):
        model = targets.load(root, target)
        if extractor is None:
            extractor = ExtractorOptions.from_spec(model.spec)
        extractor = dataclasses.replace(extractor, device=device)
        self._setup(model, extractors.build(extractor), device)
        self.batch_seconds = extractor.bucket  # Audio per batch of the stage's worker.

    @classmethod
    def of(cls, model: targets.Target, extractor, device: str = "cpu") -> Labeller:
        """A labeller from a target and a built extractor (a benchmark's, say)."""
        labeller = cls.__new__(cls)
        labeller._setup(model, extractor, device)
        return labeller

    def _setup(self, model: targets.Target, extractor, device: str) -> None:
        self.model, self.extractor, self.device = model, extractor, device
        check_spec(model.name, model.spec, extractor.spec)

    def __call__(self, batch: list) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(features, units)`` per ``(row, waveform)`` of ``batch``."""
        features = self._checked(batch, self.extractor([wav for _, wav in batch]))
        return list(zip(features, self.model.units_of(features, self.device), strict=True))

    def units(self, batch: list) -> list[np.ndarray]:
        """The units alone per ``(row, waveform)`` of ``batch``. On a GPU, an extractor that
        can leave its features there (:meth:`units.features.ssl.SSLExtractor.on_device`)
        does, and the centroid search runs beside them: only unit ids cross to the host."""
        on_device = hasattr(self.extractor, "on_device") and hasattr(self.model, "units_on_device")
        if self.device == "cpu" or not on_device:
            return [u for _, u in self(batch)]
        return self.units_on_device(batch)

    def units_on_device(self, batch: list) -> list[np.ndarray]:
        """:meth:`units` through the extractor's device tensors (on any device)."""
        import torch

        features = self._checked(batch, self.extractor.on_device([wav for _, wav in batch]))
        return _split(self.model.units_on_device(torch.cat(features)), features)

    def _checked(self, batch: list, features: list) -> list:
        """``features``, once each utterance's frame count is checked against its row."""
        for (row, _), feats in zip(batch, features, strict=True):
            check_frames(self.model.spec, row["key"], row["num_samples"], len(feats))
        return features


def _split(units: np.ndarray, features: list) -> list[np.ndarray]:
    """The units of a batch's concatenated features, cut back into one array per utterance."""
    bounds = np.cumsum([0] + [len(f) for f in features])
    return [units[bounds[i] : bounds[i + 1]] for i in range(len(features))]


class LabelWorker:
    """Builds a target's extractor once and labels audio shards with it (a worker of
    :func:`units.stage.run_pass`).

    Args:
        root: Dataset root.
        target: The target's reference (a finished k-means name, or ``bestrq:NAME``).
        extractor: See :class:`Labeller`; its ``batch_seconds`` is the audio per batch.
            Default: the one the target recorded.
        device: See :class:`Labeller`.
        dedup: Also write GSLM-style deduplicated units with durations.
    """

    def __init__(
        self,
        root: str,
        target: str,
        extractor: ExtractorOptions | None = None,
        *,
        device: str = "cpu",
        dedup: bool = False,
    ):
        self.labeller = Labeller(root, target, extractor=extractor, device=device)
        self.dedup = dedup
        self.batch_seconds = self.labeller.batch_seconds

    def write_shard(self, out: ShardOutput, batches) -> dict:
        target = self.labeller.model
        schema = labels_schema(codebooks(target), self.dedup)
        # Streamed a row group at a time: the worker's memory does not grow with the shard.
        stream = out.stream_parquet("units", schema, UNITS_ROW_GROUP)
        frames = 0
        for batch in batches:
            labels = self.labeller.units(batch)
            for (row, _), units in zip(batch, labels, strict=True):
                # The target's own framing (a quantizer's stacked frames): a bug, if broken.
                check_units(target, row, len(units))
            stream.write(label_table(out.shard, batch, labels, target.contract.rate, schema))
            frames += sum(len(u) for u in labels)
        return {"utterances": stream.rows, "frames": frames}


def codebooks(target: targets.Target) -> int:
    """Labels per frame: 1, or a BEST-RQ quantizer's codebooks."""
    config = getattr(target, "config", None)
    return getattr(config, "codebooks", 1)


def labels_schema(codebooks: int, dedup: bool) -> pa.Schema:
    """A label shard's schema: :data:`units.schemas.LABELS` (``LABELS_DEDUP`` with
    ``dedup``), and ``units_1`` ... for a target with several codebooks (``units`` is the
    first codebook's)."""
    schema = LABELS_DEDUP if dedup else LABELS
    for c in range(1, codebooks):
        schema = schema.append(pa.field(f"units_{c}", pa.list_(pa.uint16()), nullable=False))
    return schema


def label_table(
    shard: str, batch: list, labels: list[np.ndarray], frame_rate: float, schema: pa.Schema
) -> pa.Table:
    """One batch's rows of a label shard: ``labels`` per ``(row, waveform)`` of ``batch``,
    each ``(T,)`` or ``(T, codebooks)``."""
    first = [u if u.ndim == 1 else u[:, 0] for u in labels]
    columns = {
        "key": pa.array([row["key"] for row, _ in batch], pa.string()),
        "shard": pa.array([shard] * len(batch), pa.string()),
        "units": list_column(first, pa.uint16()),
        "frames": pa.array([len(u) for u in labels], pa.int32()),
        "frame_rate": pa.array([frame_rate] * len(batch), pa.float32()),
    }
    if "dedup_units" in schema.names:
        runs = [dedup(u) for u in first]
        columns["dedup_units"] = list_column([v for v, _ in runs], pa.uint16())
        columns["durations"] = list_column([d for _, d in runs], pa.int32())
    for name in schema.names:
        if name.startswith("units_"):
            c = int(name.removeprefix("units_"))
            codes = [np.ascontiguousarray(u[:, c]) for u in labels]
            columns[name] = list_column(codes, pa.uint16())
    return pa.table(columns, schema=schema)


def check_units(target: targets.Target, row: dict, frames: int) -> None:
    """Raises when an utterance's labels break the target's frame contract."""
    expected = target.contract.frames(row["num_samples"])
    if frames != expected:
        raise RuntimeError(
            f"{row['key']}: {frames} labels for {row['num_samples']} samples, expected "
            f"{expected} at {target.contract.rate:g} Hz ({target.name})"
        )


#: Utterances per row group of a label shard (about 3 MB of units at 30 s each).
UNITS_ROW_GROUP = 1024


def run(
    root: str,
    kmeans: str,
    name: str,
    *,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    extractor: ExtractorOptions | None = None,
    dedup: bool = False,
    progress: bool = False,
) -> dict:
    """Labels every utterance under ``root`` with k-means ``kmeans`` into ``ROOT/labels/NAME``.

    Ray must be initialised.

    Args:
        root: Dataset root.
        kmeans: Finished k-means under ``ROOT/kmeans``.
        name: Label set name.
        workers: CPU actors (default: one per CPU).
        gpus_per_worker: GPUs per actor, for the model and the centroid search (default:
            one per actor when the cluster has GPUs; 0: CPUs only).
        extractor: Build this extractor instead of the one the k-means recorded; it must
            compute the same features (same checkpoint sha256, layer, normalisation).
        dedup: Also store GSLM-style deduplicated units and their durations.
        progress: Show the audio hours labelled on the driver, live.

    Returns:
        ``meta.json``'s content, plus this run's ``shards_written``, ``wall_seconds`` and
        ``throughput`` (audio hours, hours per second overall and per worker, bytes read
        and written).

    Raises:
        StageError: No utterances manifest, no such k-means, an extractor that cannot be
            rebuilt or computes other features than the k-means was fitted on, or a label
            set started with another k-means. Nothing is written then.
    """
    started = time.monotonic()
    root = RootLayout(root).root
    model = KMeansModel.load(root, kmeans)
    extractor = rebuilding(model, extractor)
    manifest = utterances_manifest(root)
    lineage = {
        "kmeans": kmeans,
        "kmeans_fingerprint": model.meta["fingerprint"],
        "spec": model.meta["spec"],
        "k": int(len(model.centroids)),
        "pca": model.meta.get("pca"),
        "features": model.meta.get("features"),
        # Top level as well as in the spec: what the next HuBERT iteration starts from.
        "checkpoint_sha256": model.spec.checkpoint_sha256,
        "layer": model.spec.layer,
        "manifest_sha256": sha256_file(manifest),
        "dedup": dedup,
    }
    return label_all(
        root,
        kmeans,
        name,
        lineage,
        extractor=extractor,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        progress=progress,
        started=started,
    )


def rebuilding(target: targets.Target, extractor: ExtractorOptions | None) -> ExtractorOptions:
    """The extractor options that rebuild ``target``'s features: ``extractor``, checked to
    compute them, or the ones the target recorded.

    Raises:
        StageError: An extractor that cannot be rebuilt, or computes other features.
    """
    if extractor is None:
        extractor = ExtractorOptions.from_spec(target.spec)
    try:
        # The spec alone, with no model loaded on the driver; each worker builds the
        # extractor and checks its spec again (Labeller).
        described = extractors.describe(extractor)
    except extractors.ExtractorError as e:
        raise StageError(f"{target.name!r}: its features cannot be rebuilt: {e}") from None
    check_spec(target.name, target.spec, described)
    return extractor


def utterances_manifest(root: str) -> str:
    """``ROOT``'s utterances manifest.

    Raises:
        StageError: There is none.
    """
    manifest = RootLayout(root).manifest("utterances.parquet")
    if not storage.exists(manifest):
        raise StageError(f"no utterances manifest under {root}: run pipelines.shard first")
    return manifest


def label_all(
    root: str,
    target: str,
    name: str,
    lineage: dict,
    *,
    extractor: ExtractorOptions,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    progress: bool = False,
    started: float | None = None,
) -> dict:
    """The label pass of any target (:mod:`units.labels.targets`) into ``ROOT/labels/NAME``,
    once its stage has checked the request: claims the output with ``lineage`` (which holds
    ``dedup`` and the manifest's sha256), labels every shard not committed yet, and writes
    ``meta.json`` (``lineage``, the shards, the label rate and the totals) last.

    Returns:
        As :func:`run`.
    """
    started = time.monotonic() if started is None else started
    layout = label_layout(root, name)
    claim(layout, lineage, "were started with another k-means, quantizer or manifest")
    model = targets.load(root, target)
    manifest = RootLayout(root).manifest("utterances.parquet")
    # Columns, not a dict per utterance: the driver holds tens of bytes per utterance.
    rows = storage.read_parquet(manifest, columns=_MANIFEST_COLUMNS)
    by_shard = rows_by_shard(rows)
    done = run_pass(
        layout,
        LabelWorker,
        by_shard,
        root,
        target,
        extractor,
        dedup=lineage["dedup"],
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        progress=progress,
    )
    meta = read_json(layout.path("meta.json")) if done.shards_written == 0 else None
    if meta is not None:
        return done.result(meta, "hours_labelled", started)
    shards = sorted(by_shard)
    totals = {"utterances": 0, "frames": 0, "rejects": 0}
    for shard in shards:
        record = layout.read_commit(shard)
        for key in totals:
            totals[key] += record[key]
    meta = dict(lineage, shards=shards, frame_rate=model.contract.rate, **totals)
    meta["version"] = project_version()
    # Sequential, in manifest order: the same bits on every machine.
    meta["hours"] = float(np.cumsum(rows.column("duration").to_numpy())[-1]) / 3600
    write_atomic(layout.path("meta.json"), json.dumps(meta, indent=1, sort_keys=True).encode())
    return done.result(meta, "hours_labelled", started)
