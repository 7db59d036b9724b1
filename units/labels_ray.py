"""The streaming label pass on Ray: every utterance of every audio shard gets its units.

For each audio shard a worker decodes the audio, computes features with exactly the spec
the k-means recorded (same extractor, checkpoint and layer), applies its PCA if it had one,
assigns the nearest centroid and writes uint16 units; features are never stored. A label
shard is committed atomically; a rerun skips committed shards and a finished run does
nothing. Units must have exactly the frames the frame contract gives for the utterance's
``num_samples``: a mismatch is an error naming the key.

Determinism (README, "Determinism"): a worker batches one shard's rows in manifest order,
cut at ``batch_seconds`` of audio (:func:`units.features_ray.batches`), so which worker
labels a shard, and how often it is retried, never changes a batch; on one machine type
the label shards are the same bytes. Elsewhere features move within float32 rounding, and
units only where the two nearest centroids are that close: at least 99.99% of frames agree.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import time

import numpy as np

from shards import storage
from shards.atomic import (
    fsync_dir,
    read_json,
    remove_all_temps,
    remove_temps,
    unpublish,
    write_atomic,
    write_parquet_atomic,
)
from shards.root import RootLayout
from shards.throughput import hours_bar
from shards.throughput import record as throughput_record

from . import extractors, project_version
from .actors import actor_pool, longest_first, map_until_failure, place
from .extractors import ExtractorOptions
from .fairseq_checkpoint import sha256_file
from .features_ray import batches, check_frames, decode_rows
from .labels import (
    LABEL_REJECTS,
    LABELS,
    LABELS_DEDUP,
    KMeansModel,
    LabelError,
    LabelLayout,
    check_spec,
    dedup,
    extractor_options,
)

log = logging.getLogger(__name__)

_MANIFEST_COLUMNS = ["key", "shard", "offset", "size", "num_samples", "duration"]


class Labeller:
    """A finished k-means with the extractor that rebuilds its features.

    Called on a batch of decoded utterances, it returns each one's features and units:
    the frame contract checked per utterance, one assignment for the whole batch (a single
    GEMM, or GPU search, instead of one per utterance).

    Args:
        root: Dataset root.
        kmeans: Finished k-means name.
        extractor: Extractor to use instead of the one the k-means recorded (a moved
            checkpoint, say); it must compute the same features.
        device: ``cpu``, or ``cuda`` for the model and the centroid search.
    """

    def __init__(
        self,
        root: str,
        kmeans: str,
        *,
        extractor: ExtractorOptions | None = None,
        device: str = "cpu",
    ):
        self.model = KMeansModel.load(root, kmeans)
        if extractor is None:
            extractor = extractor_options(self.model.spec)
        self.extractor = extractors.build(dataclasses.replace(extractor, device=device))
        check_spec(kmeans, self.model.spec, self.extractor.spec)
        self.device = device

    def __call__(self, batch: list) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(features, units)`` per ``(row, waveform)`` of ``batch``."""
        features = self.extractor([wav for _, wav in batch])
        for (row, _), feats in zip(batch, features, strict=True):
            check_frames(self.model.spec, row["key"], row["num_samples"], len(feats))
        units = self.model.units(np.concatenate(features), device=self.device)
        bounds = np.cumsum([0] + [len(f) for f in features])
        return [(f, units[bounds[i] : bounds[i + 1]]) for i, f in enumerate(features)]


class LabelWorker:
    """Builds the k-means's extractor once and labels audio shards with it.

    Args:
        root: Dataset root.
        kmeans: Finished k-means name.
        extractor: See :class:`Labeller`.
        device: See :class:`Labeller`.
        dedup: Also write GSLM-style deduplicated units with durations.
        batch_seconds: Padded audio per extractor batch.
    """

    def __init__(
        self,
        root: str,
        kmeans: str,
        *,
        extractor: ExtractorOptions | None = None,
        device: str = "cpu",
        dedup: bool = False,
        batch_seconds: float = 120.0,
    ):
        self.labeller = Labeller(root, kmeans, extractor=extractor, device=device)
        self.dedup = dedup
        self.batch_seconds = batch_seconds

    def label_shard(self, root: str, name: str, shard: str, rows: list[dict]) -> dict:
        layout = LabelLayout(root, name)
        done = layout.read_commit(shard)
        if done is not None:
            return dict(done, written=False)
        final = layout.units_path(shard)
        remove_temps(final)
        out, rejects = [], []

        def reject(row: dict, error: str) -> None:
            rejects.append(
                {"key": row["key"], "shard": shard, "reason": "corrupt_audio", "message": error}
            )

        for batch in batches(rows, decode_rows(root, rows), self.batch_seconds, reject):
            out += self._label(batch, shard)
        schema = LABELS_DEDUP if self.dedup else LABELS
        try:
            write_parquet_atomic(final, out, schema, sync_dir=False)
            write_parquet_atomic(layout.rejects_path(shard), rejects, LABEL_REJECTS, sync_dir=False)
            fsync_dir(layout.units_dir)
            fsync_dir(os.path.dirname(layout.rejects_path(shard)))
            record = {
                "shard": shard,
                "utterances": len(out),
                "frames": int(sum(r["frames"] for r in out)),
                "rejects": len(rejects),
                "bytes": storage.file_size(final),
            }
            write_atomic(layout.commit_path(shard), json.dumps(record, sort_keys=True).encode())
        except BaseException:
            unpublish(final, layout.rejects_path(shard))
            raise
        return dict(record, written=True)

    def _label(self, batch: list, shard: str) -> list[dict]:
        frame_rate = self.labeller.model.spec.frame_rate
        out = []
        for (row, _), (_, units) in zip(batch, self.labeller(batch), strict=True):
            record = {
                "key": row["key"],
                "shard": shard,
                "units": units,
                "frames": len(units),
                "frame_rate": frame_rate,
            }
            if self.dedup:
                record["dedup_units"], record["durations"] = dedup(units)
            out.append(record)
        return out


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
        LabelError: No utterances manifest, no such k-means, an extractor that cannot be
            rebuilt or computes other features than the k-means was fitted on, or a label
            set started with another k-means. Nothing is written then.
    """
    started = time.monotonic()
    root = RootLayout(root).root
    model = KMeansModel.load(root, kmeans)
    if extractor is None:
        extractor = extractor_options(model.spec)
    try:
        built = extractors.build(extractor)
    except extractors.ExtractorError as e:
        raise LabelError(f"k-means {kmeans!r}: its features cannot be rebuilt: {e}") from None
    check_spec(kmeans, model.spec, built.spec)
    del built
    manifest = RootLayout(root).manifest("utterances.parquet")
    if not storage.exists(manifest):
        raise LabelError(f"no utterances manifest under {root}: run pipelines.shard first")
    layout = LabelLayout(root, name)
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
    plan_path = layout.path("plan.json")
    saved = read_json(plan_path)
    if saved is not None:
        if saved != lineage:
            raise LabelError(
                f"labels {name!r} were started with another k-means or manifest "
                f"({saved['kmeans']}); use another --name"
            )
    rows = storage.read_parquet(manifest, columns=_MANIFEST_COLUMNS).to_pylist()
    by_shard: dict[str, list[dict]] = collections.defaultdict(list)
    for row in rows:
        by_shard[row["shard"]].append(row)
    shards = sorted(by_shard)
    layout.make_dirs()
    write_atomic(plan_path, json.dumps(lineage, indent=1, sort_keys=True).encode())
    pending = longest_first([s for s in shards if layout.read_commit(s) is None], by_shard)
    meta = read_json(layout.path("meta.json")) if not pending else None
    if meta is not None:
        return dict(meta, shards_written=0)
    placement = place(workers, gpus_per_worker)
    pool = actor_pool(
        LabelWorker,
        placement,
        len(pending),
        root,
        kmeans,
        extractor=extractor,
        device=placement.device,
        dedup=dedup,
    )
    hours = {s: sum(r["duration"] for r in by_shard[s]) / 3600 for s in pending}
    done_hours = bytes_written = 0.0
    with hours_bar(sum(hours.values()), "labels", progress) as bar:  # Closed on errors too.
        for record in map_until_failure(
            pool, lambda a, s: a.label_shard.remote(root, name, s, by_shard[s]), pending
        ):
            done_hours += hours[record["shard"]]
            bytes_written += record["bytes"]
            bar.update(hours[record["shard"]])
            log.debug("label shard %s", record)
    throughput = throughput_record(
        "hours_labelled",
        done_hours,
        wall_seconds=time.monotonic() - started,
        workers=placement.actors(len(pending)),
        bytes_read=sum(r["size"] for s in pending for r in by_shard[s]),
        bytes_written=bytes_written,
    )
    # Every writer is done: what an attempt that lost a race left behind goes.
    remove_all_temps(*(layout.path(sub) for sub in ("units", "rejects", "commits")))
    totals = {"utterances": 0, "frames": 0, "rejects": 0}
    for shard in shards:
        record = layout.read_commit(shard)
        for key in totals:
            totals[key] += record[key]
    meta = dict(lineage, shards=shards, frame_rate=model.spec.frame_rate, **totals)
    meta["version"] = project_version()
    meta["hours"] = sum(r["duration"] for r in rows) / 3600
    write_atomic(layout.path("meta.json"), json.dumps(meta, indent=1, sort_keys=True).encode())
    return dict(
        meta,
        shards_written=len(pending),
        wall_seconds=time.monotonic() - started,
        throughput=throughput,
    )
