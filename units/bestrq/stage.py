"""The BEST-RQ stage on Ray: a quantizer from a seeded sample's statistics, then labels.

1. The features of a seeded sample go to a feature store (:mod:`units.features.stage`,
   ``ROOT/features/bestrq-NAME``), or an existing store is named.
2. Ray tasks sum each store shard's stacked frames in float64; the driver adds the partial
   sums in shard order (:class:`units.bestrq.quantizer.Statistics`), so the mean and
   standard deviation do not depend on the number of workers.
3. The quantizer (statistics, projection, codebooks) is written to ``ROOT/bestrq/NAME``
   with its lineage, ``quantizer.json`` last.
4. The label pass (:func:`units.labels.stage.label_all`) labels every utterance into
   ``ROOT/labels/NAME``, the same layout, commits and checks as k-means labels.

Each step resumes: ``plan.json`` records what the quantizer is made from before any work
(a rerun with other options is refused), the store and the label shards are committed one
shard at a time, and a finished quantizer is loaded, never drawn again.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from shards.core.atomic import read_json
from shards.core.outputs import OutputLayout, StageError
from shards.root import RootLayout
from units.bestrq.quantizer import QuantizerConfig, RandomProjectionQuantizer, Statistics
from units.features import extractors
from units.features.extractor import FeatureSpec
from units.features.extractors import ExtractorOptions
from units.features.fairseq_checkpoint import sha256_file
from units.features.sampling import SampleRequest
from units.stage import claim

#: A sample of at most this much audio by default: enough for 320 means and deviations
#: (3.6 million 10 ms frames), and a sample that a large corpus does not make large.
DEFAULT_SAMPLE_HOURS = 10.0


def quantizer_layout(root: str, name: str) -> OutputLayout:
    """``ROOT/bestrq/NAME``: ``plan.json``, the quantizer's arrays and ``quantizer.json``."""
    # No shards of its own: the templates name files of the output's own directory.
    return OutputLayout(root, "bestrq", name, data={}, rejects="{shard}", commit="{shard}")


def default_sample(root: str, seed: int) -> SampleRequest:
    """:data:`DEFAULT_SAMPLE_HOURS` of audio, or all of a smaller corpus."""
    from shards.core import storage

    manifest = RootLayout(root).manifest("utterances.parquet")
    seconds = storage.read_parquet(manifest, columns=["duration"]).column("duration")
    hours = float(np.cumsum(seconds.to_numpy())[-1]) / 3600 if len(seconds) else 0.0
    if hours <= DEFAULT_SAMPLE_HOURS:
        return SampleRequest(percent=100.0, seed=seed)
    return SampleRequest(hours=DEFAULT_SAMPLE_HOURS, seed=seed)


def statistics(root: str, store: str, stack: int) -> Statistics:
    """Float64 statistics of the stacked frames of feature store ``store``: one Ray task per
    store shard, added on the driver in shard order."""
    import ray

    from units.features.store import FeatureStore

    feature_store = FeatureStore(root, store)
    index = feature_store.index
    shards = feature_store.shard_names()
    by_shard: dict[str, list] = {s: [] for s in shards}
    for shard, offset, frames in zip(
        *(index.column(c).to_pylist() for c in ("shard", "offset", "frames")), strict=True
    ):
        by_shard[shard].append((offset, frames))
    task = ray.remote(num_cpus=1)(_shard_statistics)
    calls = [task.remote(root, store, s, by_shard[s], stack) for s in shards]
    total = Statistics(stack * feature_store.dim)
    for partial in ray.get(calls):  # In shard order, whatever finished first.
        total.add(Statistics.from_arrays(partial))
    return total


def _shard_statistics(root: str, store: str, shard: str, spans: list, stack: int) -> dict:
    """One store shard's sums (a Ray task): each utterance's frames stacked on their own."""
    from units.bestrq.quantizer import stack_frames
    from units.features.store import FeatureStore

    array = FeatureStore(root, store).shard_array(shard)
    stats = Statistics(stack * array.shape[1])
    for offset, frames in spans:
        stats.update(stack_frames(np.asarray(array[offset : offset + frames]), stack))
    return stats.to_arrays()


def run(
    root: str,
    name: str,
    *,
    extractor: ExtractorOptions | None = None,
    config: QuantizerConfig | None = None,
    sample: SampleRequest | None = None,
    features: str | None = None,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    dedup: bool = False,
    progress: bool = False,
) -> dict:
    """Makes BEST-RQ quantizer ``name`` over ``root`` and labels every utterance with it.

    Ray must be initialised.

    Args:
        root: Dataset root.
        name: The quantizer (``ROOT/bestrq/NAME``) and its label set (``ROOT/labels/NAME``).
        extractor: The input features (default: 80 log-mel filterbanks, ``fbank``).
        config: Stacking, projection, codebooks and seed (default: the paper's).
        sample: The sample the statistics are measured on (default:
            :func:`default_sample` with the config's seed). Ignored with ``features``.
        features: Measure the statistics on this finished feature store instead (its spec
            must be the extractor's).
        workers: CPU label workers: shards at once (default: one per CPU).
        gpus_per_worker: GPUs per label actor (default: one when the cluster has GPUs).
        dedup: Also store GSLM-style deduplicated units of the first codebook.
        progress: Live progress bars on the driver.

    Returns:
        The label set's ``meta.json`` content plus this run's ``shards_written``,
        ``wall_seconds``, ``throughput`` and ``quantizer`` (``quantizer.json``'s content).

    Raises:
        StageError: A bad extractor or config, no manifest, a sample that cannot be drawn,
            a store of other features, or a quantizer or label set started with other
            options. Nothing is written then.
    """
    from units.features.stage import run as extract
    from units.labels.stage import label_all, lineage_of, utterances_manifest

    started = time.monotonic()
    root = RootLayout(root).root
    extractor = extractor or ExtractorOptions("fbank")
    config = config or QuantizerConfig()
    try:
        config.check()
        spec = extractors.describe(extractor)
    except (ValueError, extractors.ExtractorError) as e:
        raise StageError(str(e)) from None
    manifest = utterances_manifest(root)
    layout = quantizer_layout(root, name)
    store = features or f"bestrq-{name}"
    if features is None and sample is None:
        sample = default_sample(root, config.seed)
    plan = {
        "spec": spec.to_json(),
        "config": dataclasses.asdict(config),
        "features": store,
        "sample": None if features else dataclasses.asdict(sample),
    }
    claim(layout, plan, "was started with other options")
    directory = layout.directory
    if not os.path.exists(os.path.join(directory, "quantizer.json")):
        if features is None:
            extract(root, store, extractor, SampleRequest(**plan["sample"]), spec=spec,
                    gpus_per_worker=gpus_per_worker, progress=progress)  # fmt: skip
        _check_store(root, store, spec)
        stats = statistics(root, store, config.stack)
        quantizer = RandomProjectionQuantizer.create(name, spec, config, stats)
        quantizer.save(directory, {"features": store, "frames": stats.count, **plan})
    quantizer = RandomProjectionQuantizer.load(directory, name)
    lineage = lineage_of(quantizer, sha256_file(manifest), dedup)
    (result,) = label_all(
        root,
        [f"bestrq:{name}"],
        [quantizer],
        [name],
        [lineage],
        extractor=extractor,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        progress=progress,
        started=started,
    )
    return dict(result, quantizer=read_json(os.path.join(directory, "quantizer.json")))


def _check_store(root: str, store: str, spec: FeatureSpec) -> None:
    """Raises :class:`StageError` unless ``store`` is a finished store of ``spec``'s features."""
    from units.features.store import FeatureStore

    try:
        saved = FeatureSpec.from_json(FeatureStore(root, store).meta["spec"])
    except FileNotFoundError as e:
        raise StageError(str(e)) from None
    if saved.fingerprint() != spec.fingerprint():
        raise StageError(
            f"feature store {store!r} holds {saved.extractor} features (layer {saved.layer}), "
            f"not the {spec.extractor} features (layer {spec.layer}) the quantizer reads: "
            "name a store of those, or leave --features out to sample one"
        )
