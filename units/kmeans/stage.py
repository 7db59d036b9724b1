"""k-means data spread over Ray actors: each holds (or streams) its own blocks.

:func:`distribute` turns an array or a feature store into parts that live in Ray actors,
one per worker, with the interface of :class:`units.kmeans.parts.LocalParts`. Rows never
travel to the driver: an array is cut on the driver (where it already is) and each actor
gets only its slice through the object store; a feature store is read by each actor from
its own row range.

Example:
    >>> parts = distribute(FeatureStore(root, "mfcc"), workers=4)  # doctest: +SKIP
    >>> km = KMeans(100, seed=0).fit(parts)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.exceptions import ActorUnavailableError
from tqdm import tqdm

from shards.core import storage
from shards.core.atomic import read_json, write_atomic, write_npy_atomic, write_parquet_atomic
from shards.core.outputs import StageError
from shards.core.throughput import record as throughput_record
from shards.root import RootLayout
from units import project_version
from units.features.store import FeatureStore
from units.kmeans.estimator import CheckpointMismatchError, KMeans, check_finite
from units.kmeans.parts import (
    DEFAULT_BLOCK_ROWS,
    ArraySource,
    Blocks,
    DataError,
    Part,
    StoreSource,
    fingerprint_of,
)
from units.kmeans.pca import PCA

log = logging.getLogger(__name__)

# An actor that dies (a lost node) is restarted from its constructor arguments and the
# call retried; every call is a pure function of the part's data, the state that earlier
# calls set (which RayParts.map gives a restarted part back) and the arguments.
_RETRIES = {"max_restarts": 3, "max_task_retries": 3}

#: Times RayParts.map gives a lost part its state back and calls it again before failing.
_RESTORE_ATTEMPTS = 20


class PartRestarted(RuntimeError):
    """A part's actor was restarted (its node was lost): its rows are back, but not the state
    that earlier calls set (a PCA projection, k-means|| distances)."""


class _RayPart(Part):
    """A part in a Ray actor, which knows whether Ray restarted it.

    Ray restarts a lost actor from its constructor arguments, so the rows come back (read
    again from the store, or from the array's object), but not what earlier calls set. Until
    :meth:`restore` has replayed those calls, :meth:`call` refuses to compute on the bare
    part: a wrong answer would be silent (a missing projection changes the dimension only
    when PCA reduces it).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._current = not _restarted()

    def call(self, method: str, *args):
        """``method(*args)``, unless the part lost its state."""
        if not self._current:
            raise PartRestarted(f"the part of blocks [{self.lo}, {self.hi}) was restarted")
        return getattr(self, method)(*args)

    def restore(self, journal: list) -> None:
        """Replays ``(method, args)`` calls in order, in one actor call (a second restart
        cannot leave a part half restored and marked current)."""
        for method, args in journal:
            resolved = [ray.get(a) if isinstance(a, ray.ObjectRef) else a for a in args]
            getattr(self, method)(*resolved)
        self._current = True


def _restarted() -> bool:
    """Whether Ray restarted the actor this runs in.

    ``RuntimeContext.was_current_actor_reconstructed`` is the public answer, but inside it
    reads Ray's own deprecated ``RuntimeContext.actor_id`` (Ray 2.60), which would warn once
    in every actor started: that one warning is silenced here, not the question changed.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="ray")
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)


class _ArrayPart(_RayPart):
    def __init__(self, array, offset, blocks, lo, hi, hold, device):
        super().__init__(ArraySource(array, offset), blocks, lo, hi, hold=hold, device=device)


class _StorePart(_RayPart):
    def __init__(self, root, name, blocks, lo, hi, hold, device):
        row_lo, row_hi = blocks.span(lo)[0], blocks.span(hi - 1)[1]
        source = StoreSource(root, name, row_lo, row_hi)
        super().__init__(source, blocks, lo, hi, hold=hold, device=device)


class RayParts:
    """Parts held by Ray actors; ``map`` calls a method on all of them at once."""

    def __init__(
        self, actors: list, blocks: Blocks, dim: int, fingerprint: str | None = None, refs=()
    ):
        self.actors, self.blocks, self.dim = actors, blocks, dim
        self._fingerprint = fingerprint
        self._refs = list(refs)  # Keeps the actors' data alive for restarts.
        # The calls that set the parts' state, in order, for a part that restarts.
        self._journal: list[tuple[str, list]] = []

    @property
    def rows(self) -> int:
        return self.blocks.rows

    def map(self, method: str, *args) -> list:
        # Large arguments (centroids, candidates) go to the object store once, not per actor.
        refs = [ray.put(a) if isinstance(a, np.ndarray) and a.nbytes > 65536 else a for a in args]
        calls = [actor.call.remote(method, *refs) for actor in self.actors]
        results = [
            self._get(actor, call, method, refs)
            for actor, call in zip(self.actors, calls, strict=True)
        ]
        if method in ("set_projection", "seed_update"):
            self._journal.append((method, refs))
        elif method == "seed_weights":  # Ends k-means||: frees what seed_update built.
            self._journal = [entry for entry in self._journal if entry[0] != "seed_update"]
        return results

    def _get(self, actor, call, method: str, refs: list):
        """``call``'s result. A part whose node was lost meanwhile gets its state back and
        the call again: Ray restarts its actor, and every call is a pure function of the
        part's rows and state (replaying ``seed_update`` on a part that had it is harmless:
        distances to the same candidates are the same minimum)."""
        for attempt in range(_RESTORE_ATTEMPTS):
            try:
                if call is None:
                    ray.get(actor.restore.remote(self._journal))
                    call = actor.call.remote(method, *refs)
                return ray.get(call)
            except (PartRestarted, ActorUnavailableError) as e:
                if attempt == _RESTORE_ATTEMPTS - 1:
                    raise
                log.warning(
                    "a k-means part was lost during %s (%s); giving it its state back",
                    method,
                    type(e).__name__,
                )
                if isinstance(e, ActorUnavailableError):  # Its node's death not yet known.
                    time.sleep(1.0)
                call = None
        raise AssertionError("unreachable")

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint_of(self)
        return self._fingerprint

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def distribute(
    data,
    *,
    workers: int | None = None,
    gpus_per_worker: float = 0,
    hold: bool = True,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    spread: bool = False,
) -> RayParts:
    """Spreads ``data`` over Ray actors. Ray must be initialised.

    Args:
        data: A (n, d) array, or a :class:`~units.features.store.FeatureStore`.
        workers: Actors (default: one per CPU, or per ``gpus_per_worker`` GPUs).
        gpus_per_worker: GPUs per actor; assignment then runs on faiss's GPU index.
        hold: Actors keep their rows in memory as float32; ``False`` reads them from the
            store on every pass (bounded memory, for data bigger than the cluster).
        block_rows: Rows per block (fixes the order of every sum).
        spread: Place actors on as many nodes as possible.
    """
    resources = ray.cluster_resources()
    use_gpu = gpus_per_worker > 0 and resources.get("GPU", 0) >= gpus_per_worker
    if workers is None:
        workers = (
            int(resources["GPU"] // gpus_per_worker) if use_gpu else int(resources.get("CPU", 1))
        )
    options = dict(_RETRIES)
    if use_gpu:
        options.update(num_gpus=gpus_per_worker, num_cpus=0)
    else:
        # More workers than CPUs share them (the actors hold their CPU share for life).
        options.update(num_cpus=min(1.0, resources.get("CPU", 1) / max(1, workers)))
    if spread:
        options["scheduling_strategy"] = "SPREAD"
    device = "cuda" if use_gpu else "cpu"

    if isinstance(data, FeatureStore):
        rows, dim = int(data.meta["rows"]), data.dim
        blocks = Blocks(rows, block_rows)
        if rows == 0:
            raise DataError(f"feature store {data.layout.name!r} holds no frames")
        cls = ray.remote(**options)(_StorePart)
        ranges = blocks.split(max(1, workers))
        actors = [
            cls.remote(data.layout.root, data.layout.name, blocks, lo, hi, hold, device)
            for lo, hi in ranges
        ]
        fingerprint = StoreSource.fingerprint_of_store(data)
        return RayParts(actors, blocks, dim, fingerprint)

    x = np.asarray(data)
    if x.ndim != 2:
        raise DataError(f"expected a 2-d array (rows, dim), got shape {x.shape}")
    blocks = Blocks(len(x), block_rows)
    if blocks.rows == 0:
        raise DataError("no rows to cluster: the data is empty")
    cls = ray.remote(**options)(_ArrayPart)
    actors, refs = [], []
    for lo, hi in blocks.split(max(1, workers)):
        row_lo, row_hi = blocks.span(lo)[0], blocks.span(hi - 1)[1]
        refs.append(ray.put(x[row_lo:row_hi]))
        actors.append(cls.remote(refs[-1], row_lo, blocks, lo, hi, hold, device))
    return RayParts(actors, blocks, x.shape[1], refs=refs)


# ---------------------------------------------------------------------------- the stage
@dataclasses.dataclass(frozen=True)
class StageOptions:
    """What the k-means stage fits, beyond the estimator's own arguments.

    Attributes:
        pca: Project the features to this many dimensions first (``None``: no PCA).
        whiten: Whiten the PCA projection.
        workers: Ray actors (default: one per CPU, or per ``gpus_per_worker`` GPUs).
        gpus_per_worker: GPUs per actor.
        hold: Actors keep their rows in memory (``False``: stream from the store).
        fairseq_export: Also write ``kmeans.joblib`` for fairseq's ``dump_km_label.py``.
        progress: Show the iterations on the driver, live, with the audio hours the
            features cover.
    """

    pca: int | None = None
    whiten: bool = False
    workers: int | None = None
    gpus_per_worker: float = 0
    hold: bool = True
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
        ``hold=False`` reads them again on every pass) and the bytes of the output files,
        ``kmeans.json`` aside.

    Raises:
        StageError: A missing or empty store, k or a PCA size that does not fit the
            data, NaN/Inf features (named by shard and key), an output started with another
            config. Nothing is written in those cases.
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

    parts = distribute(
        store,
        workers=options.workers,
        gpus_per_worker=options.gpus_per_worker,
        hold=options.hold,
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
                "set_projection", pca.mean_.astype(np.float32), pca.matrix().astype(np.float32)
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
        out, store, config, km, options, pca_meta, rows, dim, started, workers=workers, hours=hours
    )


def fit_pca(parts, directory: str, dim: int, whiten: bool = False) -> PCA:
    """Fits a PCA on ``parts`` into ``directory`` (with wav2vec-U's ``{dim}_pca_A/b.npy``),
    or loads the one an earlier run committed there (``pca.json`` is written last)."""
    committed = read_json(os.path.join(directory, "pca.json"))
    if committed is not None:
        pca = PCA.load(directory, whiten=whiten)
        pca.total_variance_ = committed["total_variance"]
        return pca
    pca = PCA(dim, whiten=whiten).fit(parts)
    storage.makedirs(directory)
    pca.save(directory)
    write_atomic(
        os.path.join(directory, "pca.json"),
        json.dumps({"dim": dim, "whiten": whiten, "total_variance": pca.total_variance_}).encode(),
    )
    return pca


def _hours(store: FeatureStore) -> float:
    """Hours of audio the store's frames cover: its index's frames at the spec's frame rate
    (one hop each, so a window's length short of each utterance's duration)."""
    frames = pc.sum(store.index.column("frames")).as_py() or 0
    return frames / store.meta["spec"]["frame_rate"] / 3600


def _commit(
    out, store, config, km: KMeans, options, pca_meta, rows, dim, started, *, workers, hours
) -> dict:
    write_npy_atomic(os.path.join(out, "centroids.npy"), km.cluster_centers_.astype(np.float32))
    table = pa.Table.from_pylist([dataclasses.asdict(s) for s in km.iterations_])
    write_parquet_atomic(os.path.join(out, "iterations.parquet"), table)
    if options.fairseq_export:
        export_fairseq(km.cluster_centers_, os.path.join(out, "kmeans.joblib"))
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


def export_fairseq(centroids: np.ndarray, path: str) -> None:
    """A joblib file that fairseq's ``dump_km_label.py`` loads: it reads only
    ``cluster_centers_``, so a plain namespace (no scikit-learn, no unitpipe needed to load)
    carries it."""
    import io
    import types

    import joblib

    buffer = io.BytesIO()
    joblib.dump(types.SimpleNamespace(cluster_centers_=np.asarray(centroids, np.float32)), buffer)
    write_atomic(path, buffer.getvalue())
