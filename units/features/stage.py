"""The feature stage on Ray: a seeded sample of the corpus into the feature store.

The driver draws the sample from the utterances manifest and plans one feature shard per
audio shard, written by the stage engine (:mod:`units.stage`): on CPUs a task per shard on
Ray's pooled workers, each of which builds its extractor once per run (one model load per
worker process); on a cluster with GPUs, GPU actors whose threads decode the audio ahead, so
a GPU never waits on FLAC decoding. A feature shard is committed atomically; a rerun skips
committed shards and a finished run does nothing.

Determinism (README, "Determinism"): :func:`batches` cuts one shard's rows, in manifest
order, at ``batch_seconds`` of audio, a rule of the shard alone, so neither the number of
workers nor a retry changes what shares a batch: on one machine type the store is the same
bytes. The batch does decide the shapes of the float32 kernels, so ``batch_seconds`` is
part of the config, and features computed in another batch agree within float32 rounding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time

import numpy as np
import pyarrow as pa

from shards.core import storage
from shards.core.atomic import read_json, write_parquet_atomic
from shards.core.outputs import ShardOutput, StageError
from shards.core.placement import place
from shards.root import RootLayout
from shards.schemas import UTTERANCES
from units.features import extractors
from units.features import store as feature_store
from units.features.extractor import FeatureSpec
from units.features.extractors import ExtractorOptions
from units.features.sampling import SampleRequest, draw
from units.features.store import FeatureShardWriter, store_layout
from units.stage import check_frames, claim, rows_by_shard, run_pass

log = logging.getLogger(__name__)

_MANIFEST_COLUMNS = ["key", "shard", "offset", "size", "num_samples", "speaker", "duration"]

#: ``sample.parquet``: the manifest's columns above, each nullable (as the store has always
#: written them).
SAMPLE = pa.schema([UTTERANCES.field(c).with_nullable(True) for c in _MANIFEST_COLUMNS])


class FeatureWorker:
    """Builds one extractor and writes feature shards with it (a worker of
    :func:`units.stage.run_pass`).

    Args:
        options: The extractor, and how it runs.
        spec: The spec the plan recorded (:func:`units.features.extractors.describe` on the
            driver); the extractor built here must have it, or nothing is written (another
            file at the checkpoint's path on this node, say).
        device: ``cpu`` or ``cuda``.
    """

    def __init__(self, options: ExtractorOptions, spec: FeatureSpec | None = None, *, device: str):
        options = dataclasses.replace(options, device=device)
        self.extractor = extractors.build(options)
        if spec is not None and self.extractor.spec != spec:
            raise StageError(
                f"the extractor built on this worker computes {self.extractor.spec}, "
                f"not the planned {spec}"
            )
        self.batch_seconds = options.bucket

    def write_shard(self, out: ShardOutput, batches) -> dict:
        spec = self.extractor.spec
        writer = FeatureShardWriter(out, spec.dim)
        for batch in batches:
            features = self.extractor([wav for _, wav in batch])
            for (row, wav), feats in zip(batch, features, strict=True):
                check_frames(spec, row["key"], len(wav), len(feats))
                writer.add(row["key"], feats)
        return writer.finish()


def _plan(root: str, name: str, spec: FeatureSpec, request: SampleRequest) -> tuple[dict, pa.Table]:
    """The store's plan and its sample: drawn and saved with the plan on the first run, read
    back after. The manifest and the sample stay Arrow tables (columns of the manifest's
    utterances, never a Python object each)."""
    layout = RootLayout(root)
    manifest = layout.manifest("utterances.parquet")
    if not storage.exists(manifest):
        raise StageError(
            f"no utterances manifest under {root}: run `python -m pipelines.shard --output "
            f"{root} ...` first"
        )
    store = store_layout(layout.root, name)
    plan = {"spec": spec.to_json(), "request": dataclasses.asdict(request)}
    plan["fingerprint"] = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()
    sample: list[pa.Table] = []

    def draw_sample() -> None:
        rows = storage.read_parquet(manifest, columns=_MANIFEST_COLUMNS)
        try:
            sample.append(draw(rows, request).cast(SAMPLE))
        except ValueError as e:
            raise StageError(str(e)) from None
        storage.makedirs(store.directory)
        write_parquet_atomic(store.path("sample.parquet"), sample[0])

    if claim(store, plan, "was started with another extractor or sample", draw_sample) is None:
        return plan, sample[0]
    return plan, storage.read_parquet(store.path("sample.parquet"), schema=SAMPLE)


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
    and layer, the manifests, the sample) is checked before any work. The driver reads the
    extractor's spec (:func:`units.features.extractors.describe`) but loads no model; each
    worker builds the extractor and checks that it has that spec.

    Args:
        gpus_per_worker: GPUs per actor; ``None`` takes one per actor when the cluster has
            GPUs (see :func:`shards.core.placement.place`); 0 runs on CPUs.
        spec: The spec of the extractor ``options`` name, when the caller already described
            it (saves hashing the checkpoint on the driver a second time).

    Returns:
        The store's ``meta.json`` content plus this run's ``shards_written``,
        ``wall_seconds`` and ``throughput``.

    Raises:
        StageError: A bad extractor, no manifest, a sample that cannot be drawn, or a store
            started with another extractor or sample. Nothing is written then.
    """
    started = time.monotonic()
    if spec is None:
        try:
            spec = extractors.describe(options)  # Fails early on a bad checkpoint or layer.
        except extractors.ExtractorError as e:
            raise StageError(str(e)) from None
    if options.dtype is not None and place(None, gpus_per_worker).device != "cuda":
        # Each worker would refuse it when it builds its extractor: say so before any work.
        raise StageError(
            f"dtype={options.dtype!r} is autocast on CUDA only, and the workers run on CPUs: "
            "drop it or give the workers GPUs (gpus_per_worker)"
        )
    root = RootLayout(root).root
    plan, sample = _plan(root, name, spec, request)
    store = store_layout(root, name)
    by_shard = rows_by_shard(sample)
    done = run_pass(
        store,
        FeatureWorker,
        by_shard,
        options,
        spec,
        gpus_per_worker=gpus_per_worker,
        progress=progress,
    )
    meta = read_json(store.path("meta.json")) if done.shards_written == 0 else None
    if meta is not None:
        log.info("nothing to do: feature store %s is complete", name)
        return done.result(meta, "hours_extracted", started)
    meta = feature_store.finalize(
        store,
        sorted(by_shard),
        {
            "spec": plan["spec"],
            "request": plan["request"],
            "sample": {
                "utterances": sample.num_rows,
                # Sequential, in sample order: the same bits on every machine.
                "hours": float(np.cumsum(sample.column("duration").to_numpy())[-1]) / 3600,
            },
        },
    )
    return done.result(meta, "hours_extracted", started)
