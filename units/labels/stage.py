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
from shards.core.outputs import LayoutGroup, OutputGroup, ShardOutput, StageError
from shards.root import RootLayout
from units import project_version
from units.features import extractors
from units.features.extractors import ExtractorOptions
from units.features.fairseq_checkpoint import sha256_file
from units.labels import targets
from units.labels.model import (
    KMeansModel,
    check_same_features,
    check_spec,
    dedup,
    label_layout,
)
from units.schemas import LABELS, LABELS_DEDUP, list_column
from units.stage import check_frames, claim, rows_by_shard, run_pass

log = logging.getLogger(__name__)

_MANIFEST_COLUMNS = ["key", "shard", "offset", "size", "num_samples", "duration"]


class Labeller:
    """Labelling targets (finished k-means or BEST-RQ quantizers) with the one extractor
    that rebuilds their features.

    Called on a batch of decoded utterances, it returns each one's features and units:
    the frame contract checked per utterance, one assignment for the whole batch (a single
    GEMM, or GPU search, instead of one per utterance). Several targets share each batch's
    features (:meth:`units_for`); targets of several layers of one SSL model share one
    forward pass to the deepest of them.

    Args:
        root: Dataset root.
        target: A target's reference (:mod:`units.labels.targets`: a k-means name, or
            ``bestrq:NAME``), or several of one extractor (``models[0]`` is the first).
        extractor: Extractor to use instead of the one the (first) target recorded (a moved
            checkpoint, say); it must compute the same features.
        device: ``cpu``, or ``cuda`` for the model and the centroid search.
    """

    def __init__(
        self,
        root: str,
        target: str | list[str],
        *,
        extractor: ExtractorOptions | None = None,
        device: str = "cpu",
    ):
        references = [target] if isinstance(target, str) else list(target)
        models = [targets.load(root, reference) for reference in references]
        check_same_features(models)
        if extractor is None:
            extractor = ExtractorOptions.from_spec(models[0].spec)
        extra = sorted({m.spec.layer for m in models} - {extractor.layer, None})
        extractor = dataclasses.replace(extractor, device=device, extra_layers=tuple(extra))
        self._setup(models, extractors.build(extractor), device)
        self.batch_seconds = extractor.bucket  # Audio per batch of the stage's worker.

    @classmethod
    def of(cls, model, extractor, device: str = "cpu") -> Labeller:
        """A labeller from a target (or several) and a built extractor (a benchmark's)."""
        labeller = cls.__new__(cls)
        labeller._setup(model if isinstance(model, list) else [model], extractor, device)
        return labeller

    def _setup(self, models: list, extractor, device: str) -> None:
        self.models, self.extractor, self.device = models, extractor, device
        self.model = models[0]
        specs = getattr(extractor, "specs", {extractor.spec.layer: extractor.spec})
        for model in models:
            check_spec(model.name, model.spec, specs.get(model.spec.layer, extractor.spec))

    def __call__(self, batch: list) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(features, units)`` per ``(row, waveform)`` of ``batch``, for the first target."""
        features = self._checked(batch, self.extractor([wav for _, wav in batch]))
        return list(zip(features, self.model.units_of(features, self.device), strict=True))

    def units(self, batch: list) -> list[np.ndarray]:
        """The units alone per ``(row, waveform)`` of ``batch``. On a GPU, an extractor that
        can leave its features there (:meth:`units.features.ssl.SSLExtractor.on_device`)
        does, and the centroid search runs beside them: only unit ids cross to the host."""
        return self.units_for(batch, [self.model])[0]

    def units_on_device(self, batch: list) -> list[np.ndarray]:
        """:meth:`units` through the extractor's device tensors (on any device)."""
        return self._units(batch, [self.model], on_device=True)[0]

    def units_for(self, batch: list, models: list | None = None) -> list[list[np.ndarray]]:
        """:meth:`units` of each of ``models`` (default: every target) from one computation
        of the batch's features: per model, the units per utterance."""
        models = self.models if models is None else models
        on_device = (
            self.device != "cpu"
            and hasattr(self.extractor, "on_device")
            and all(hasattr(m, "units_on_device") for m in models)
        )
        return self._units(batch, models, on_device)

    def _units(self, batch: list, models: list, on_device: bool) -> list[list[np.ndarray]]:
        wavs = [wav for _, wav in batch]
        layers = {m.spec.layer for m in models}
        if layers == {self.extractor.spec.layer}:
            computed = self.extractor.on_device(wavs) if on_device else self.extractor(wavs)
            by_layer = {self.extractor.spec.layer: computed}
        else:  # One forward pass for every layer the targets read.
            by_layer = self.extractor.layers_on_device(wavs, host=not on_device)
            if not on_device:
                by_layer = {n: [f.numpy() for f in fs] for n, fs in by_layer.items()}
        joined = {}  # Each layer's batch concatenated once, on its device.
        out = []
        for model in models:
            features = self._checked(batch, by_layer[model.spec.layer], model.spec)
            if not on_device:
                out.append(model.units_of(features, self.device))
                continue
            import torch

            layer = model.spec.layer
            if layer not in joined:
                joined[layer] = torch.cat(features)
            out.append(_split(model.units_on_device(joined[layer]), features))
        return out

    def _checked(self, batch: list, features: list, spec=None) -> list:
        """``features``, once each utterance's frame count is checked against its row."""
        spec = self.model.spec if spec is None else spec
        for (row, _), feats in zip(batch, features, strict=True):
            check_frames(spec, row["key"], row["num_samples"], len(feats))
        return features


def _split(units: np.ndarray, features: list) -> list[np.ndarray]:
    """The units of a batch's concatenated features, cut back into one array per utterance."""
    bounds = np.cumsum([0] + [len(f) for f in features])
    return [units[bounds[i] : bounds[i + 1]] for i in range(len(features))]


class LabelWorker:
    """Builds the targets' extractor once and labels audio shards with it (a worker of
    :func:`units.stage.run_pass`).

    Several targets that read the same features (k-means of several k, quantizers of one
    filterbank) share one extractor, and each batch's features are computed once for all
    of them; each target's label set gets the rows a pass of its own would write.

    Args:
        root: Dataset root.
        target: A target's reference (a finished k-means name, or ``bestrq:NAME``), or
            several, written to a :class:`~shards.core.outputs.LayoutGroup` in this order.
        extractor: See :class:`Labeller`; its ``batch_seconds`` is the audio per batch.
            Default: the one the (first) target recorded.
        device: See :class:`Labeller`.
        dedup: Also write GSLM-style deduplicated units with durations.
    """

    def __init__(
        self,
        root: str,
        target: str | list[str],
        extractor: ExtractorOptions | None = None,
        *,
        device: str = "cpu",
        dedup: bool = False,
    ):
        self.labeller = Labeller(root, target, extractor=extractor, device=device)
        self.targets = self.labeller.models
        self.dedup = dedup
        self.batch_seconds = self.labeller.batch_seconds

    def write_shard(self, out: ShardOutput | OutputGroup, batches) -> dict:
        members = out.members if isinstance(out, OutputGroup) else [(0, out)]
        chosen = [self.targets[i] for i, _ in members]  # Those that have not committed it.
        schemas = [labels_schema(codebooks(t), self.dedup) for t in chosen]
        # Streamed a row group at a time: the worker's memory does not grow with the shard.
        streams = [
            member.stream_parquet("units", schema, UNITS_ROW_GROUP)
            for (_, member), schema in zip(members, schemas, strict=True)
        ]
        frames = [0] * len(chosen)
        for batch in batches:
            for j, labels in enumerate(self.labeller.units_for(batch, chosen)):
                for (row, _), units in zip(batch, labels, strict=True):
                    # The target's own framing (a quantizer's stacked frames): a bug, if broken.
                    check_units(chosen[j], row, len(units))
                rate = chosen[j].contract.rate
                streams[j].write(label_table(out.shard, batch, labels, rate, schemas[j]))
                frames[j] += sum(len(u) for u in labels)
        counts = [
            {"utterances": stream.rows, "frames": f}
            for stream, f in zip(streams, frames, strict=True)
        ]
        return {"counts": counts} if isinstance(out, OutputGroup) else counts[0]


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
        workers: CPU workers: shards labelled at once (default: one per CPU).
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
    return run_many(
        root,
        [kmeans],
        [name],
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        extractor=extractor,
        dedup=dedup,
        progress=progress,
    )[0]


def run_many(
    root: str,
    kmeans: list[str],
    names: list[str],
    *,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    extractor: ExtractorOptions | None = None,
    dedup: bool = False,
    progress: bool = False,
) -> list[dict]:
    """:func:`run` for several targets of one extractor (k-means of k = 100, 500, 2,000 on
    one layer or on several layers of one model, BEST-RQ quantizers of the same features) in
    one pass: the features of each batch are computed once, and target ``kmeans[i]`` (a
    k-means name, or ``bestrq:NAME``) labels into ``ROOT/labels/names[i]``, the same files
    a pass of its own writes. A shard is done when every label set has committed it.

    Returns:
        One result per label set, as :func:`run`'s (the throughput is the pass's).

    Raises:
        StageError: As :func:`run`; also k-means of different features, or names that are
            not one per k-means and distinct.
    """
    started = time.monotonic()
    root = RootLayout(root).root
    models = [targets.load(root, reference) for reference in kmeans]
    extractor = rebuilding(models, extractor)
    manifest_sha256 = sha256_file(utterances_manifest(root))
    lineages = [lineage_of(model, manifest_sha256, dedup) for model in models]
    return label_all(
        root,
        list(kmeans),
        models,
        list(names),
        lineages,
        extractor=extractor,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        progress=progress,
        started=started,
    )


def lineage_of(target: targets.Target, manifest_sha256: str, dedup: bool) -> dict:
    """What a label set records of its target (its ``plan.json`` and ``meta.json``): the
    k-means or quantizer and its fingerprint, the feature spec, the manifest's sha256."""
    if isinstance(target, KMeansModel):
        lineage = {
            "kmeans": target.name,
            "kmeans_fingerprint": target.meta["fingerprint"],
            "spec": target.meta["spec"],
            "k": int(len(target.centroids)),
            "pca": target.meta.get("pca"),
            "features": target.meta.get("features"),
        }
    else:
        config = target.config
        lineage = {
            "target": "bestrq",
            "bestrq": target.name,
            "bestrq_fingerprint": target.fingerprint(),
            "spec": target.spec.to_json(),
            "k": config.codebook_size,
            "codebooks": config.codebooks,
            "stack": config.stack,
        }
    return dict(
        lineage,
        # Top level as well as in the spec: what the next HuBERT iteration starts from.
        checkpoint_sha256=target.spec.checkpoint_sha256,
        layer=target.spec.layer,
        manifest_sha256=manifest_sha256,
        dedup=dedup,
    )


def rebuilding(
    models: targets.Target | list[targets.Target], extractor: ExtractorOptions | None
) -> ExtractorOptions:
    """The extractor options that rebuild the features of ``models`` (one target, or
    several that read the same features): ``extractor``, checked to compute them, or the
    ones the (first) target recorded.

    Raises:
        StageError: An extractor that cannot be rebuilt, or computes other features than
            one of the targets reads.
    """
    models = models if isinstance(models, list) else [models]
    check_same_features(models)
    if extractor is None:
        extractor = ExtractorOptions.from_spec(models[0].spec)
    described = {}
    for model in models:
        # The first target reads the extractor's own layer; the others may read other
        # layers of the same model (one forward pass): each layer's spec is checked.
        layer = extractor.layer if model is models[0] else model.spec.layer
        if extractor.layer is None:
            layer = None
        if layer not in described:
            try:
                # The spec alone, with no model loaded on the driver; each worker builds
                # the extractor and checks its spec again (Labeller).
                described[layer] = extractors.describe(dataclasses.replace(extractor, layer=layer))
            except extractors.ExtractorError as e:
                raise StageError(f"{model.name!r}: its features cannot be rebuilt: {e}") from None
        check_spec(model.name, model.spec, described[layer])
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
    references: list[str],
    models: list[targets.Target],
    names: list[str],
    lineages: list[dict],
    *,
    extractor: ExtractorOptions,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    progress: bool = False,
    started: float | None = None,
) -> list[dict]:
    """The label pass of targets (:mod:`units.labels.targets`) that read the same features,
    once their stage has checked the request and loaded them: target ``references[i]``
    (``models[i]`` on the driver, for its label rate; each worker loads its own) labels into
    ``ROOT/labels/names[i]``. Claims each output with its lineage (which holds ``dedup``
    and the manifest's sha256), labels every shard not committed by all of them, and
    writes each ``meta.json`` (lineage, shards, label rate, totals) last.

    Returns:
        One result per label set, as :func:`run`'s.

    Raises:
        StageError: Names that are not one per target and distinct; an output started
            with another target or manifest (nothing is written then).
    """
    started = time.monotonic() if started is None else started
    if len(names) != len(references) or len(set(names)) != len(names):
        raise StageError(f"give one distinct label set name per target: {names} for {references}")
    layouts = [label_layout(root, name) for name in names]
    for layout, lineage in zip(layouts, lineages, strict=True):
        claim(layout, lineage, "were started with another k-means, quantizer or manifest")
    manifest = RootLayout(root).manifest("utterances.parquet")
    # Columns, not a dict per utterance: the driver holds tens of bytes per utterance.
    rows = storage.read_parquet(manifest, columns=_MANIFEST_COLUMNS)
    by_shard = rows_by_shard(rows)
    one = len(layouts) == 1
    done = run_pass(
        layouts[0] if one else LayoutGroup(tuple(layouts)),
        LabelWorker,
        by_shard,
        root,
        references[0] if one else list(references),
        extractor,
        dedup=lineages[0]["dedup"],
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        progress=progress,
    )
    shards = sorted(by_shard)
    # Sequential, in manifest order: the same bits on every machine.
    hours = float(np.cumsum(rows.column("duration").to_numpy())[-1]) / 3600
    results = []
    for layout, lineage, model in zip(layouts, lineages, models, strict=True):
        meta = read_json(layout.path("meta.json")) if done.shards_written == 0 else None
        if meta is None:
            totals = {"utterances": 0, "frames": 0, "rejects": 0}
            for shard in shards:
                record = layout.read_commit(shard)
                for key in totals:
                    totals[key] += record[key]
            meta = dict(lineage, shards=shards, frame_rate=model.contract.rate, **totals)
            meta["version"] = project_version()
            meta["hours"] = hours
            text = json.dumps(meta, indent=1, sort_keys=True).encode()
            write_atomic(layout.path("meta.json"), text)
        results.append(done.result(meta, "hours_labelled", started))
    return results
