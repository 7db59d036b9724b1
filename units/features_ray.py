"""The feature stage on Ray: a seeded sample of the corpus into the feature store.

The driver draws the sample from the utterances manifest and plans one feature shard per
audio shard. Workers are Ray actors, each of which builds its extractor once (one model load
per worker): on a cluster with GPUs, GPU actors take decoded audio from CPU tasks, so a GPU
never waits on FLAC decoding; without GPUs, CPU actors decode for themselves. A feature shard
is committed atomically; a rerun skips committed shards and a finished run does nothing.

Determinism (README, "Determinism"): :func:`batches` cuts one shard's rows, in manifest
order, at ``batch_seconds`` of audio, a rule of the shard alone, so neither the number of
workers nor a retry changes what shares a batch: on one machine type the store is the same
bytes. The batch does decide the shapes of the float32 kernels, so ``batch_seconds`` is
part of the config, and features computed in another batch agree within float32 rounding.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import ray

from shards import storage, throughput
from shards.atomic import (
    read_json,
    remove_all_temps,
    remove_temps,
    write_atomic,
    write_parquet_atomic,
)
from shards.reader import read_audio
from shards.root import RootLayout

from . import extractors, feature_store
from .actors import actor_pool, map_until_failure, place
from .extractor import FeatureSpec
from .extractors import ExtractorOptions
from .feature_store import FeatureShardWriter, StoreLayout
from .sampling import SampleRequest, draw

log = logging.getLogger(__name__)

_MANIFEST_COLUMNS = ["key", "shard", "offset", "size", "num_samples", "speaker", "duration"]


class FeatureStageError(ValueError):
    """Arguments or state that cannot work; raised before any work is done."""


def decode_rows(root: str, rows: list[dict]) -> list[tuple[np.ndarray | None, str | None]]:
    """Decodes the audio of ``rows``: (waveform, None) or (None, error message) each."""
    out = []
    for row in rows:
        try:
            wav, rate = read_audio(root, row["shard"], row["offset"], row["size"])
        except Exception as e:  # A bad member is that utterance's reject, not the shard's end.
            out.append((None, f"{type(e).__name__}: {e}"))
            continue
        if rate != 16_000 or wav.ndim != 1:
            out.append((None, f"expected 16 kHz mono, got {rate} Hz, shape {wav.shape}"))
        else:
            out.append((wav, None))
    return out


class FeatureWorker:
    """Builds one extractor and writes feature shards with it."""

    def __init__(self, options: ExtractorOptions):
        self.extractor = extractors.build(options)
        self.batch_seconds = options.batch_seconds

    def write_shard(
        self, root: str, name: str, shard: str, rows: list[dict], decoded: list | None = None
    ) -> dict:
        """Extracts the features of ``rows`` (all from audio shard ``shard``) and commits them."""
        layout = StoreLayout(root, name)
        done = layout.read_commit(shard)
        if done is not None:
            return dict(done, written=False)
        remove_temps(layout.array_path(shard))  # An earlier attempt at this shard died.
        decoded = decode_rows(root, rows) if decoded is None else decoded
        spec = self.extractor.spec
        writer = FeatureShardWriter(layout, shard, spec.dim)
        try:

            def reject(row: dict, error: str) -> None:
                writer.reject(row["key"], "corrupt_audio", error)

            for batch in batches(rows, decoded, self.batch_seconds, reject):
                self._flush(batch, writer, spec)
            record = writer.commit()
        except BaseException:
            writer.abort()
            raise
        return dict(record, written=True)

    def _flush(self, batch, writer: FeatureShardWriter, spec: FeatureSpec) -> None:
        features = self.extractor([wav for _, wav in batch])
        for (row, wav), feats in zip(batch, features, strict=True):
            check_frames(spec, row["key"], len(wav), len(feats))
            writer.add(row["key"], feats)


def batches(
    rows: list[dict], decoded: list, batch_seconds: float, reject: Callable[[dict, str], None]
) -> Iterator[list[tuple[dict, np.ndarray]]]:
    """Decoded rows in batches of about ``batch_seconds`` of audio, in order; a row that
    failed to decode goes to ``reject(row, message)`` instead."""
    batch: list[tuple[dict, np.ndarray]] = []
    seconds = 0.0
    for row, (wav, error) in zip(rows, decoded, strict=True):
        if error is not None:
            reject(row, error)
            continue
        batch.append((row, wav))
        seconds += len(wav) / 16_000
        if seconds >= batch_seconds:
            yield batch
            batch, seconds = [], 0.0
    if batch:
        yield batch


def check_frames(spec: FeatureSpec, key: str, num_samples: int, frames: int) -> None:
    """Raises when ``frames`` breaks the frame contract: a bug, never a warning."""
    expected = spec.contract.frames(num_samples)
    if frames != expected:
        raise RuntimeError(
            f"{key}: {frames} feature frames for {num_samples} samples, expected {expected} "
            f"at {spec.frame_rate:g} Hz ({spec.extractor})"
        )


@ray.remote(num_cpus=1)
def _decode_task(root: str, rows: list[dict]) -> list:
    return decode_rows(root, rows)


def _plan(root: str, name: str, spec: FeatureSpec, request: SampleRequest) -> dict:
    layout = RootLayout(root)
    manifest = layout.manifest("utterances.parquet")
    if not storage.exists(manifest):
        raise FeatureStageError(
            f"no utterances manifest under {root}: run `python -m pipelines.shard --output "
            f"{root} ...` first"
        )
    store = StoreLayout(layout.root, name)
    plan = {"spec": spec.to_json(), "request": dataclasses.asdict(request)}
    plan["fingerprint"] = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()
    saved_path = store.path("plan.json")
    saved = read_json(saved_path)
    if saved is not None:
        if saved["fingerprint"] != plan["fingerprint"]:
            raise FeatureStageError(
                f"feature store {name!r} was started with another extractor or sample "
                f"({saved['spec']['extractor']}, {saved['request']}); use another --name"
            )
        sample = storage.read_parquet(store.path("sample.parquet")).to_pylist()
        return dict(saved, sample=sample)
    rows = storage.read_parquet(manifest, columns=_MANIFEST_COLUMNS).to_pylist()
    try:
        sample = draw(rows, request)
    except ValueError as e:
        raise FeatureStageError(str(e)) from None
    store.make_dirs()
    write_parquet_atomic(store.path("sample.parquet"), pa.Table.from_pylist(sample))
    write_atomic(saved_path, json.dumps(plan, indent=1, sort_keys=True).encode())
    return dict(plan, sample=sample)


def run(
    root: str,
    name: str,
    options: ExtractorOptions,
    request: SampleRequest,
    *,
    gpus_per_worker: float | None = 0,
    progress: bool = False,
    spec: FeatureSpec | None = None,
) -> dict:
    """Extracts the features of a seeded sample of ``root`` into ``ROOT/features/NAME``.

    Ray must be initialised. Everything that can be checked (the extractor, its checkpoint
    and layer, the manifests, the sample) is checked before any work.

    Args:
        gpus_per_worker: GPUs per actor; ``None`` takes one per actor when the cluster has
            GPUs (see :func:`units.actors.place`); 0 runs on CPUs.
        spec: The spec of the extractor ``options`` name, when the caller already built it
            (saves loading a model on the driver a second time).

    Returns:
        The store's ``meta.json`` content plus this run's ``shards_written`` and throughput.
    """
    started = time.monotonic()
    if spec is None:
        try:
            spec = extractors.build(options).spec  # Fails early on a bad checkpoint or layer.
        except extractors.ExtractorError as e:
            raise FeatureStageError(str(e)) from None
    root = RootLayout(root).root
    plan = _plan(root, name, spec, request)
    store = StoreLayout(root, name)
    by_shard: dict[str, list[dict]] = collections.defaultdict(list)
    for row in plan["sample"]:
        by_shard[row["shard"]].append(row)
    shards = sorted(by_shard)
    pending = [s for s in shards if store.read_commit(s) is None]
    meta = read_json(store.path("meta.json")) if not pending else None
    if meta is not None:
        log.info("nothing to do: feature store %s is complete", name)
        return dict(meta, shards_written=0)
    hours, workers = _write(root, name, options, by_shard, pending, gpus_per_worker, progress)
    sample_hours = sum(r["duration"] for r in plan["sample"]) / 3600
    remove_all_temps(store.shards_dir)  # Every writer is done (see labels_ray).
    meta = feature_store.finalize(
        store,
        shards,
        {
            "spec": plan["spec"],
            "request": plan["request"],
            "sample": {"utterances": len(plan["sample"]), "hours": sample_hours},
        },
    )
    return dict(
        meta,
        shards_written=len(pending),
        throughput=throughput.record(
            "hours_extracted",
            hours,
            wall_seconds=time.monotonic() - started,
            workers=workers,
            # The FLAC members decoded, and the feature arrays committed, by this run.
            bytes_read=sum(r["size"] for s in pending for r in by_shard[s]),
            bytes_written=sum(store.read_commit(s)["bytes"] for s in pending),
        ),
    )


def _write(root, name, options, by_shard, pending, gpus_per_worker, progress):
    """Writes the pending shards; returns their audio hours and the number of actors."""
    placement = place(None, gpus_per_worker)
    use_gpu = placement.device == "cuda"
    options = dataclasses.replace(options, device=placement.device)
    pool = actor_pool(FeatureWorker, placement, len(pending), options)

    def submit(actor, shard):
        rows = by_shard[shard]
        decoded = _decode_task.remote(root, rows) if use_gpu else None
        return actor.write_shard.remote(root, name, shard, rows, decoded)

    total = sum(r["duration"] for s in pending for r in by_shard[s]) / 3600
    bar = throughput.hours_bar(total, "features", progress)
    hours = 0.0
    with bar:  # Closed on errors too: an error's line never follows a half-drawn bar.
        for record in map_until_failure(pool, submit, pending):
            shard = record["shard"]
            shard_hours = sum(r["duration"] for r in by_shard[shard]) / 3600
            hours += shard_hours
            bar.update(shard_hours)
            log.debug("feature shard %s: %s", shard, record)
    return hours, placement.actors(len(pending))
