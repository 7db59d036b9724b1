"""wav2vec-U preparation on Ray: cluster, PCA, then a streaming pass over every audio shard.

1. k-means with ``k`` clusters on the layer features of a feature store (``ROOT/kmeans/
   NAME-clsK``, resumable like any k-means stage), on the features before the PCA, as
   fairseq's ``CLUS128``.
2. A PCA to ``pca_dim`` on the same store (``ROOT/w2vu/NAME/pca``).
3. For every audio shard: decode, layer features with exactly the store's spec (the same
   model, layer and waveform normalisation as the fits), cluster ids, PCA, merge runs, mean
   pool (:mod:`units.w2vu`); one ``.npy`` and one Parquet per shard, committed atomically.
4. Splits (seeded, by utterance or speaker) assembled shard by shard into ``{split}.npy``,
   ``{split}.lengths`` and ``{split}.tsv``, each renamed into place when whole; ``meta.json``
   last.

A rerun skips every finished step and committed shard; a finished run does nothing.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import json
import logging
import os
import time

import numpy as np

from shards import storage
from shards.atomic import (
    fsync_dir,
    publish,
    read_commit,
    read_json,
    remove_all_temps,
    remove_temps,
    temp_path,
    unpublish,
    write_atomic,
    write_npy_atomic,
    write_parquet_atomic,
)
from shards.root import RootLayout
from shards.throughput import hours_bar
from shards.throughput import record as throughput_record

from . import project_version
from .actors import actor_pool, longest_first, map_until_failure, place
from .fairseq_checkpoint import sha256_file
from .fairseq_export import assign_splits, link_audio, tsv_text
from .feature_store import FeatureStore
from .features_ray import batches, decode_rows
from .kmeans import KMeans
from .kmeans_parts import DataError
from .kmeans_ray import StageOptions, distribute, fit_pca
from .kmeans_ray import run as fit_kmeans
from .labels import LABEL_REJECTS
from .labels_ray import Labeller
from .w2vu import W2VU_ROWS, W2VUPrep

log = logging.getLogger(__name__)

_MANIFEST_COLUMNS = ["key", "shard", "offset", "size", "num_samples", "duration", "speaker"]


class W2VUError(ValueError):
    """A request that cannot work; raised before anything is written."""


@dataclasses.dataclass(frozen=True)
class W2VUOptions:
    """What the preparation computes and how it runs.

    Attributes:
        k: Clusters for merging (fairseq's ``CLUS128``).
        pca_dim: PCA output dimension.
        rate: Mean-pool subsample rate.
        remove_extra: Drop frames that do not pool evenly instead of padding with the last.
        seed: k-means seed.
        workers: CPU actors (default: one per CPU).
        gpus_per_worker: GPUs per actor (default: one when the cluster has GPUs; 0: CPUs).
    """

    k: int = 128
    pca_dim: int = 512
    rate: float = 0.5
    remove_extra: bool = False
    seed: int = 0
    workers: int | None = None
    gpus_per_worker: float | None = None


@dataclasses.dataclass(frozen=True)
class W2VULayout:
    """Paths under ``ROOT/w2vu/NAME``."""

    root: str
    name: str

    @property
    def directory(self) -> str:
        return os.path.join(self.root, "w2vu", self.name)

    def path(self, *parts: str) -> str:
        return os.path.join(self.directory, *parts)

    def make_dirs(self) -> None:
        for sub in ("features", "rows", "rejects", "commits"):
            storage.makedirs(self.path(sub))

    def features_path(self, shard: str) -> str:
        return self.path("features", f"{shard}.npy")

    def rows_path(self, shard: str) -> str:
        return self.path("rows", f"{shard}.parquet")

    def read_commit(self, shard: str) -> dict | None:
        return read_commit(self.path("commits", f"{shard}.json"), self.rows_path(shard))


class W2VUWorker:
    """Rebuilds the store's extractor once and prepares audio shards with it."""

    def __init__(self, root: str, name: str, kmeans: str, options: W2VUOptions, device: str):
        self.labeller = Labeller(root, kmeans, device=device)
        self.prep = W2VUPrep.load(
            W2VULayout(root, name).path("pca"),
            options.pca_dim,
            rate=options.rate,
            remove_extra=options.remove_extra,
        )

    def prepare_shard(self, root: str, name: str, shard: str, rows: list[dict]) -> dict:
        layout = W2VULayout(root, name)
        done = layout.read_commit(shard)
        if done is not None:
            return dict(done, written=False)
        for path in (layout.features_path(shard), layout.rows_path(shard)):
            remove_temps(path)
        pooled, out, rejects, row = [], [], [], 0

        def reject(item: dict, error: str) -> None:
            rejects.append(
                {"key": item["key"], "shard": shard, "reason": "corrupt_audio", "message": error}
            )

        for batch in batches(rows, decode_rows(root, rows), 120.0, reject):
            for (item, _), (features, ids) in zip(batch, self.labeller(batch), strict=True):
                x = self.prep(features, ids)
                pooled.append(x)
                out.append(
                    {
                        "key": item["key"],
                        "shard": shard,
                        "clusters": ids,
                        "frames": len(ids),
                        "row": row,
                        "length": len(x),
                    }
                )
                row += len(x)
        dim = len(self.prep.pca_b)
        array = np.concatenate(pooled) if pooled else np.empty((0, dim), np.float32)
        written = (
            layout.features_path(shard),
            layout.rows_path(shard),
            layout.path("rejects", f"{shard}.parquet"),
        )
        try:
            write_npy_atomic(written[0], array, sync_dir=False)
            write_parquet_atomic(written[1], out, W2VU_ROWS, sync_dir=False)
            write_parquet_atomic(written[2], rejects, LABEL_REJECTS, sync_dir=False)
            fsync_dir(layout.path("features"))
            fsync_dir(layout.path("rows"))
            fsync_dir(layout.path("rejects"))
            record = {
                "shard": shard,
                "utterances": len(out),
                "rows": int(row),
                "rejects": len(rejects),
                "bytes": storage.file_size(layout.rows_path(shard)),
            }
            write_atomic(
                layout.path("commits", f"{shard}.json"),
                json.dumps(record, sort_keys=True).encode(),
            )
        except BaseException:
            unpublish(*written)
            raise
        # What this call wrote, for the stage's throughput (not part of the commit record).
        nbytes = sum(storage.file_size(path) for path in written)
        return dict(record, written=True, bytes_written=nbytes)


def run(
    root: str,
    features: str,
    name: str,
    splits: dict[str, float],
    *,
    by: str = "utterance",
    split_seed: int = 0,
    options: W2VUOptions = W2VUOptions(),
    progress: bool = False,
) -> dict:
    """Prepares wav2vec-U features for every utterance under ``root`` into ``ROOT/w2vu/NAME``.

    Ray must be initialised.

    Args:
        root: Dataset root.
        features: Feature store of the layer features that the k-means and PCA are fitted on
            (``pipelines.features --extractor ... --layer 14``); its spec decides the
            features of the pass.
        name: Output name.
        splits: Split name to percent (adding up to 100).
        by: ``utterance`` or ``speaker``.
        split_seed: Seed of the split draw.
        options: See :class:`W2VUOptions`.
        progress: Show the audio hours of the pass on the driver, live (and the k-means
            iterations).

    Returns:
        ``meta.json``'s content, plus this run's ``shards_written`` and ``wall_seconds``.
        Its ``throughput`` is that of the run that finished the output: the audio hours of
        the shards it prepared, its wall time (fits included), audio hours per second
        overall and per worker of the pass, the audio bytes it read and the bytes of the
        shard and split files it wrote.

    Raises:
        W2VUError: A missing store or manifest, a PCA wider than the features, splits that
            do not add up or would be empty, or an output started with other settings.
    """
    started = time.monotonic()
    root = RootLayout(root).root
    layout = W2VULayout(root, name)
    splits = {split: float(percent) for split, percent in splits.items()}
    try:
        store = FeatureStore(root, features)
    except FileNotFoundError as e:
        raise W2VUError(str(e)) from None
    if options.remove_extra and options.rate != 0.5:
        raise W2VUError(f"--remove-extra pools evenly at rate 0.5 only, not {options.rate}")
    if not 1 <= options.pca_dim <= store.dim:
        raise W2VUError(
            f"--pca-dim {options.pca_dim} must be between 1 and the feature dimension {store.dim}"
        )
    manifest_path = RootLayout(root).manifest("utterances.parquet")
    manifest = storage.read_parquet(manifest_path, columns=_MANIFEST_COLUMNS).to_pylist()
    try:
        assign_splits(manifest, splits, by, split_seed)  # Fails early on bad or empty splits.
    except ValueError as e:
        raise W2VUError(str(e)) from None
    kmeans = f"{name}-cls{options.k}"
    plan = {
        "features": features,
        "spec": store.meta["spec"],
        "kmeans": kmeans,
        "options": {
            f.name: getattr(options, f.name)
            for f in dataclasses.fields(options)
            if f.name not in ("workers", "gpus_per_worker")
        },
        "splits": splits,
        "split_by": by,
        "split_seed": split_seed,
        "manifest_sha256": sha256_file(manifest_path),
    }
    saved = read_json(layout.path("plan.json"))
    if saved is not None and saved != plan:
        raise W2VUError(
            f"w2vu {name!r} under {root} was started with other settings; use another --name"
        )
    done = read_json(layout.path("meta.json"))
    if done is not None:
        return dict(done, shards_written=0)
    layout.make_dirs()
    write_atomic(layout.path("plan.json"), json.dumps(plan, indent=1, sort_keys=True).encode())

    gpus = place(options.workers, options.gpus_per_worker).options.get("num_gpus", 0)
    stage = StageOptions(workers=options.workers, gpus_per_worker=gpus, progress=progress)
    fit_kmeans(root, features, kmeans, KMeans(options.k, seed=options.seed), stage)
    if read_json(layout.path("pca", "pca.json")) is None:
        parts = distribute(store, workers=options.workers, gpus_per_worker=0)
        try:
            fit_pca(parts, layout.path("pca"), options.pca_dim)
        except DataError as e:
            raise W2VUError(f"feature store {features!r}: {e}") from None
        finally:
            parts.shutdown()

    by_shard: dict[str, list[dict]] = collections.defaultdict(list)
    for row in manifest:
        by_shard[row["shard"]].append(row)
    shards = sorted(by_shard)
    pending = longest_first([s for s in shards if layout.read_commit(s) is None], by_shard)
    hours, bytes_written, workers = 0.0, 0, 1
    if pending:
        hours, bytes_written, workers = _pass(
            root, name, kmeans, options, pending, by_shard, progress
        )
    meta, split_files = _assemble(root, layout, plan, shards, manifest, splits, by, split_seed)
    meta["throughput"] = throughput_record(
        "hours_prepared",
        hours,
        wall_seconds=time.monotonic() - started,
        workers=workers,
        bytes_read=sum(r["size"] for s in pending for r in by_shard[s]),
        bytes_written=bytes_written + sum(storage.file_size(p) for p in split_files),
    )
    write_atomic(layout.path("meta.json"), json.dumps(meta, indent=1, sort_keys=True).encode())
    return dict(meta, shards_written=len(pending), wall_seconds=time.monotonic() - started)


def _pass(root, name, kmeans, options, pending, by_shard, progress) -> tuple[float, int, int]:
    """Prepares the ``pending`` shards; returns their audio hours, the bytes written and
    the number of workers."""
    placement = place(options.workers, options.gpus_per_worker)
    pool = actor_pool(
        W2VUWorker, placement, len(pending), root, name, kmeans, options, placement.device
    )
    hours = {s: sum(r["duration"] for r in by_shard[s]) / 3600 for s in pending}
    done_hours, nbytes = 0.0, 0
    with hours_bar(sum(hours.values()), "w2vu", progress) as bar:  # Closed on errors too.
        for record in map_until_failure(
            pool, lambda a, s: a.prepare_shard.remote(root, name, s, by_shard[s]), pending
        ):
            done_hours += hours[record["shard"]]
            nbytes += record.get("bytes_written", 0)
            bar.update(hours[record["shard"]])
            log.debug("w2vu shard %s", record)
    return done_hours, nbytes, placement.actors(len(pending))


def _assemble(root, layout, plan, shards, manifest, splits, by, split_seed) -> tuple[dict, list]:
    """Concatenates the committed shards into the split files, in manifest order; returns
    the content of ``meta.json`` (written by the caller) and the split files."""
    # Every writer of the pass is done: what an attempt that lost a race left behind goes.
    remove_all_temps(*(layout.path(sub) for sub in ("features", "rows", "rejects", "commits")))
    table = storage.dataset([layout.rows_path(s) for s in shards], schema=W2VU_ROWS).to_table(
        columns=["key", "shard", "row", "length"]
    )
    placed = {r["key"]: r for r in table.to_pylist()}
    rows = [r for r in manifest if r["key"] in placed]
    try:
        members = assign_splits(rows, splits, by, split_seed)
    except ValueError as e:
        raise W2VUError(f"after the pass: {e}") from None
    audio = link_audio(root, layout.directory, rows)
    dim = plan["options"]["pca_dim"]
    counts, files = {}, []
    for split, chosen in members.items():
        lengths = [placed[r["key"]]["length"] for r in chosen]
        _write_split_npy(layout, split, chosen, placed, sum(lengths), dim)
        write_atomic(layout.path(f"{split}.lengths"), "".join(f"{n}\n" for n in lengths).encode())
        write_atomic(layout.path(f"{split}.tsv"), tsv_text(audio, chosen).encode())
        counts[split] = {"utterances": len(chosen), "frames": int(sum(lengths))}
        files += [layout.path(f"{split}.{ext}") for ext in ("npy", "lengths", "tsv")]
    rejects = len(manifest) - len(rows)
    meta = dict(
        plan,
        splits_written=counts,
        utterances=len(rows),
        rejects=rejects,
        hours=sum(r["duration"] for r in rows) / 3600,
        pca_dir=layout.path("pca"),
        version=project_version(),
    )
    return meta, files


def _write_split_npy(layout, split, chosen, placed, total, dim) -> None:
    """Streams each shard's rows of the split into one ``.npy``, renamed into place whole;
    one shard's array is mapped at a time, so memory stays flat however large the split."""
    final = layout.path(f"{split}.npy")
    remove_temps(final)
    tmp = temp_path(final)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(total, dim))
        _allocate(tmp)
        at, current, source = 0, None, None
        for row in chosen:
            place = placed[row["key"]]
            if place["shard"] != current:
                current = place["shard"]
                source = storage.load_npy(layout.features_path(current), mmap=True)
            n = place["length"]
            out[at : at + n] = source[place["row"] : place["row"] + n]
            at += n
        out.flush()
        del out, source
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        publish(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            storage.remove(tmp)
        raise


def _allocate(path: str) -> None:
    """Reserves the blocks of a sparse file before it is written through a memory map: a
    full disk is then an ``OSError`` here, not a SIGBUS that kills the process mid-write."""
    with open(path, "rb+") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                return  # A file system without fallocate: nothing reserved, as before.
            e.filename = path
            raise
