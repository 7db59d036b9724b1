"""The k-means stage: fits a :class:`~units.kmeans.estimator.KMeans` on a feature store into
``ROOT/kmeans/NAME``, resumably, on parts spread over Ray actors.

It checks the store and the options before anything is written, decides whether the workers
hold their rows or stream them from the store (:func:`rows_decision`, from the store's size
and the memory Ray offers each worker), spreads the store's rows
(:func:`units.kmeans.transport.distribute`), optionally fits and applies a PCA first
(:func:`units.kmeans.pca.fit_pca`), and commits ``centroids.npy``, ``iterations.parquet``,
the fairseq export if asked (:mod:`units.kmeans.fairseq`) and ``kmeans.json`` last.

Example:
    >>> run(root, "mfcc", "km100", KMeans(100, seed=0), StageOptions(pca=32))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from shards.core import storage
from shards.core.atomic import read_json, write_atomic, write_npy_atomic, write_parquet_atomic
from shards.core.outputs import StageError
from shards.core.throughput import record as throughput_record
from shards.root import RootLayout
from units import project_version
from units.features.store import FeatureStore
from units.kmeans import fairseq
from units.kmeans.estimator import CheckpointMismatchError, KMeans, check_finite
from units.kmeans.memory import ROWS, RowsDecision, decide, format_bytes
from units.kmeans.parts import Blocks, DataError, Part, StoreSource
from units.kmeans.pca import fit_pca
from units.kmeans.transport import distribute

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StageOptions:
    """What the k-means stage fits, beyond the estimator's own arguments.

    Attributes:
        pca: Project the features to this many dimensions first (``None``: no PCA).
        whiten: Whiten the PCA projection.
        workers: Ray actors (default: one per CPU, or per ``gpus_per_worker`` GPUs).
        gpus_per_worker: GPUs per actor.
        rows: ``hold``: actors keep their rows in memory (float32, read once);
            ``stream``: they read them from the store on every pass (bounded memory);
            ``auto``: hold when the rows fit in what Ray offers each actor
            (:func:`rows_decision`), else stream.
        fairseq_export: Also write ``kmeans.joblib`` for fairseq's ``dump_km_label.py``.
        progress: Show the iterations on the driver, live, with the audio hours the
            features cover.
    """

    pca: int | None = None
    whiten: bool = False
    workers: int | None = None
    gpus_per_worker: float = 0
    rows: str = "auto"
    fairseq_export: bool = False
    progress: bool = False


def _config(store: FeatureStore, features: str, km: KMeans, options: StageOptions) -> dict:
    config = {
        "features": features,
        "features_fingerprint": StoreSource.fingerprint_of_store(store),
        "spec": store.meta["spec"],
        "kmeans": km.config(),
        "pca": options.pca,
        "whiten": options.whiten,
        "block_rows": km.block_rows,
    }
    config["fingerprint"] = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    return config


def run(
    root: str,
    features: str,
    name: str,
    km: KMeans,
    options: StageOptions = StageOptions(),
) -> dict:
    """Fits ``km`` on feature store ``features`` into ``ROOT/kmeans/NAME``. Ray must be up.

    Resumable: the estimator checkpoints every iteration under the output directory, and a
    finished output (``kmeans.json``, written last) is left as it is.

    Returns:
        The content of ``kmeans.json`` plus ``written`` (whether this run fitted anything).
        Its ``throughput`` is that of the run that finished the fit: ``hours_clustered``
        (the audio the store's frames cover), wall time, audio hours per second overall and
        per worker, the feature bytes read (the store's shard files, counted once, though
        streaming reads them again on every pass) and the bytes of the output files,
        ``kmeans.json`` aside. Its ``rows_decision`` is the run's
        :meth:`~units.kmeans.memory.RowsDecision.to_json`: hold or stream, asked for or
        decided, and the bytes and memory that decided it.

    Raises:
        StageError: A missing or empty store, k or a PCA size that does not fit the
            data, NaN/Inf features (named by shard and key), an output started with another
            config, ``rows`` not one of auto, hold, stream. Nothing is written in those
            cases.
    """
    started = time.monotonic()
    root = RootLayout(root).root
    out = os.path.join(root, "kmeans", name)
    try:
        store = FeatureStore(root, features)
    except FileNotFoundError as e:
        raise StageError(str(e)) from None
    config = _config(store, features, km, options)
    saved = read_json(os.path.join(out, "config.json"))
    if saved is not None and saved["fingerprint"] != config["fingerprint"]:
        raise StageError(
            f"k-means {name!r} under {root} was started with another config (features "
            f"{saved['features']!r}, k={saved['kmeans']['n_clusters']}, pca={saved['pca']}); "
            "use another --name"
        )
    done = read_json(os.path.join(out, "kmeans.json"))
    if done is not None:
        log.info("nothing to do: k-means %s is complete", name)
        return dict(done, written=False)
    rows, dim = int(store.meta["rows"]), store.dim
    if rows == 0:
        raise StageError(f"feature store {features!r} holds no frames: nothing to cluster")
    if rows < km.n_clusters:
        raise StageError(
            f"n_samples={rows} frames in {features!r} should be >= n_clusters={km.n_clusters}"
        )
    if options.pca is not None and not 1 <= options.pca <= dim:
        raise StageError(f"--pca {options.pca} must be between 1 and the dimension {dim}")
    if options.rows not in ROWS:
        raise StageError(f"rows must be one of {', '.join(ROWS)}, got {options.rows!r}")

    # Before any actor starts: what the workers will do with the rows, and why, where the
    # user sees it (and kmeans.json keeps it).
    rows_choice = rows_decision(store, km, options)
    log.info(
        "k-means rows: %s (%s): %s; holding every row takes %s (%s frames of %d-d) of the "
        "cluster's %s",
        rows_choice.rows,
        "decided" if rows_choice.requested == "auto" else "asked for",
        rows_choice.reason,
        format_bytes(rows_choice.hold_bytes),
        f"{rows_choice.frames:,}",
        rows_choice.dim,
        format_bytes(rows_choice.cluster_memory),
    )
    if rows_choice.warning:
        log.warning("k-means rows: %s", rows_choice.warning)
    parts = distribute(
        store,
        workers=options.workers,
        gpus_per_worker=options.gpus_per_worker,
        hold=rows_choice.hold,
        block_rows=km.block_rows,
    )
    try:
        try:
            check_finite(parts)
        except DataError as e:
            raise StageError(f"feature store {features!r}: {e}") from None
        storage.makedirs(out)
        write_atomic(
            os.path.join(out, "config.json"), json.dumps(config, indent=1, sort_keys=True).encode()
        )
        pca_meta = None
        if options.pca is not None:
            pca = fit_pca(parts, os.path.join(out, "pca"), options.pca, options.whiten)
            parts.map(
                Part.set_projection, pca.mean_.astype(np.float32), pca.matrix().astype(np.float32)
            )
            pca_meta = {
                "dim": options.pca,
                "whiten": options.whiten,
                "directory": "pca",
                "explained_variance_ratio": float(
                    pca.explained_variance_.sum() / pca.total_variance_
                ),
            }
        hours = _hours(store)
        bar = tqdm(
            desc="k-means", unit="it", total=km.max_steps(rows), disable=not options.progress
        )

        def on_iteration(stats: dict) -> None:
            # The bar counts iterations as iterations.parquet numbers them (Lloyd's
            # iteration 0, the initial centroids, is none done), from where a resumed fit is.
            bar.update(stats["iteration"] - bar.n)
            bar.set_postfix(inertia=f"{stats['inertia']:.6g}", audio_h=f"{hours:.3f}")

        try:
            km.fit(parts, checkpoint=out, check=False, callback=on_iteration)
        except CheckpointMismatchError as e:
            raise StageError(str(e)) from None
        finally:
            bar.close()
    finally:
        workers = len(parts.actors)
        parts.shutdown()
    return _commit(
        out,
        store,
        config,
        km,
        options,
        pca_meta,
        rows,
        dim,
        started,
        workers=workers,
        hours=hours,
        rows_choice=rows_choice,
    )


def worker_memory(
    workers: int | None, gpus_per_worker: float, max_actors: int | None = None
) -> dict:
    """What Ray offers each k-means actor: the actors ``distribute`` starts (counted as it
    counts them) and the memory of one on the most crowded node. Ray must be up.

    A node's ``memory`` resource (what Ray may give tasks and actors there: the node's memory
    at start less the object store) is shared by the actors that land on it: at most as many
    as its CPUs (or GPUs) hold at the actors' share, and never more than there are actors.
    Ray places them where it likes, so the answer is the smallest such share over the live
    nodes that can take an actor at all (a head node started with no CPUs takes none).

    Args:
        workers: Actors asked for (``None``: one per CPU, or per ``gpus_per_worker`` GPUs).
        gpus_per_worker: GPUs per actor (0: CPU actors).
        max_actors: At most this many actors start (the rows' blocks: each actor gets
            at least one); default: ``workers``.

    Returns:
        ``workers`` (the actors asked for, resolved), ``cluster_memory`` (bytes: the
        cluster's ``memory`` resource; ``None`` if Ray reports none) and
        ``memory_per_worker`` (bytes; ``None`` if no node reports memory).
    """
    import ray

    resources = ray.cluster_resources()
    # The rules of units.kmeans.transport.distribute, which starts the actors.
    use_gpu = gpus_per_worker > 0 and resources.get("GPU", 0) >= gpus_per_worker
    if workers is None:
        workers = (
            int(resources["GPU"] // gpus_per_worker) if use_gpu else int(resources.get("CPU", 1))
        )
    workers = max(1, workers)
    actors = max(1, min(workers, max_actors or workers))
    if use_gpu:
        unit, per_actor = "GPU", gpus_per_worker
    else:
        unit, per_actor = "CPU", min(1.0, resources.get("CPU", 1) / workers)
    shares = []
    for node in ray.nodes():
        offered = node.get("Resources") or {}
        memory = offered.get("memory")
        # Resources are floats: 1e-9 keeps 2.0 CPUs / (2/3) per actor at 3 actors, not 2.
        slots = int(offered.get(unit, 0) / per_actor + 1e-9) if per_actor > 0 else 0
        if node.get("Alive") and memory and slots >= 1:
            shares.append(memory / min(slots, actors))
    cluster = resources.get("memory")
    return {
        "workers": workers,
        "cluster_memory": int(cluster) if cluster else None,
        "memory_per_worker": int(min(shares)) if shares else None,
    }


def rows_decision(store: FeatureStore, km: KMeans, options: StageOptions) -> RowsDecision:
    """Whether the actors hold their rows or stream them (:func:`units.kmeans.memory.decide`),
    from the store's size (its meta's frames and dimension: no feature is read) and the memory
    Ray offers each actor (:func:`worker_memory`). Ray must be up."""
    frames = int(store.meta["rows"])
    # Fewer blocks than workers start fewer actors, which then share a node less.
    blocks = Blocks(frames, km.block_rows).count
    offered = worker_memory(options.workers, options.gpus_per_worker, blocks)
    return decide(
        frames,
        store.dim,
        offered["workers"],
        offered["memory_per_worker"],
        requested=options.rows,
        block_rows=km.block_rows,
        seeding=isinstance(km.init, str) and km.init == "k-means||",
        url_source=storage.is_url(store.layout.root),
        cluster_memory=offered["cluster_memory"],
    )


def _hours(store: FeatureStore) -> float:
    """Hours of audio the store's frames cover: its index's frames at the spec's frame rate
    (one hop each, so a window's length short of each utterance's duration)."""
    frames = pc.sum(store.index.column("frames")).as_py() or 0
    return frames / store.meta["spec"]["frame_rate"] / 3600


def _commit(
    out,
    store,
    config,
    km: KMeans,
    options,
    pca_meta,
    rows,
    dim,
    started,
    *,
    workers,
    hours,
    rows_choice: RowsDecision,
) -> dict:
    write_npy_atomic(os.path.join(out, "centroids.npy"), km.cluster_centers_.astype(np.float32))
    table = pa.Table.from_pylist([dataclasses.asdict(s) for s in km.iterations_])
    write_parquet_atomic(os.path.join(out, "iterations.parquet"), table)
    if options.fairseq_export:
        fairseq.export(km.cluster_centers_, os.path.join(out, "kmeans.joblib"), km.inertia_)
    last = km.iterations_[-1]
    meta = {
        "features": config["features"],
        "features_fingerprint": config["features_fingerprint"],
        "spec": config["spec"],
        "k": km.n_clusters,
        "dim": int(km.cluster_centers_.shape[1]),
        "feature_dim": dim,
        "seed": km.seed,
        "config": config["kmeans"],
        "fingerprint": config["fingerprint"],
        "rows": rows,
        "inertia": km.inertia_,
        "inertia_per_frame": km.inertia_ / rows,
        "iterations": km.n_iter_,
        "converged": bool(km.n_iter_ < km.max_iter),
        "imbalance": last.imbalance,
        "empty_clusters": int((km.counts_ == 0).sum()),
        "pca": pca_meta,
        "rows_decision": rows_choice.to_json(),
        "fairseq_export": "kmeans.joblib" if options.fairseq_export else None,
        "wall_seconds": time.monotonic() - started,
        "version": project_version(),
    }
    # The run that finished the fit: every file of the output but kmeans.json itself.
    meta["throughput"] = throughput_record(
        "hours_clustered",
        hours,
        wall_seconds=meta["wall_seconds"],
        workers=workers,
        bytes_read=sum(
            storage.file_size(store.layout.shard_path("array", s)) for s in store.shard_names()
        ),
        bytes_written=sum(
            storage.file_size(storage.join(out, f))
            for f in storage.walk_files(out)
            if f != "kmeans.json"
        ),
    )
    write_atomic(
        os.path.join(out, "kmeans.json"), json.dumps(meta, indent=1, sort_keys=True).encode()
    )
    return dict(meta, written=True)
