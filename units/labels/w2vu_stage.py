"""wav2vec-U preparation on Ray: cluster, PCA, then a streaming pass over every audio shard.

1. k-means with ``k`` clusters on the layer features of a feature store (``ROOT/kmeans/
   NAME-clsK``, resumable like any k-means stage), on the features before the PCA, as
   fairseq's ``CLUS128``.
2. A PCA to ``pca_dim`` on the same store (``ROOT/w2vu/NAME/pca``).
3. For every audio shard: decode, layer features with exactly the store's spec (the same
   model, layer and waveform normalisation as the fits), cluster ids, PCA, merge runs, mean
   pool (:mod:`units.labels.w2vu`); one ``.npy`` and one Parquet per shard, committed atomically.
4. Splits (seeded, by utterance or speaker) assembled shard by shard into ``{split}.npy``,
   ``{split}.lengths`` and ``{split}.tsv``, each renamed into place when whole; ``meta.json``
   last.

A rerun skips every finished step and committed shard; a finished run does nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import time

import numpy as np

from shards.core import storage
from shards.core.atomic import publish, read_json, remove_temps, temp_path, write_atomic
from shards.core.outputs import OutputLayout, ShardOutput, StageError
from shards.core.placement import place
from shards.root import RootLayout
from units import project_version
from units.features.fairseq_checkpoint import sha256_file
from units.features.store import FeatureStore
from units.kmeans.estimator import KMeans
from units.kmeans.parts import DataError
from units.kmeans.pca import fit_pca
from units.kmeans.stage import StageOptions
from units.kmeans.stage import run as fit_kmeans
from units.kmeans.transport import distribute
from units.labels.fairseq import assign_splits, link_audio, tsv_text
from units.labels.stage import Labeller
from units.labels.w2vu import W2VUPrep
from units.schemas import W2VU_ROWS
from units.stage import NOTHING_TO_DO, claim, rows_by_shard, run_pass

log = logging.getLogger(__name__)

_MANIFEST_COLUMNS = ["key", "shard", "offset", "size", "num_samples", "duration", "speaker"]


@dataclasses.dataclass(frozen=True)
class W2VUOptions:
    """What the preparation computes and how it runs.

    Attributes:
        k: Clusters for merging (fairseq's ``CLUS128``).
        pca_dim: PCA output dimension.
        rate: Mean-pool subsample rate.
        remove_extra: Drop frames that do not pool evenly instead of padding with the last.
        seed: k-means seed.
        workers: CPU workers: shards at once (default: one per CPU).
        gpus_per_worker: GPUs per actor (default: one when the cluster has GPUs; 0: CPUs).
    """

    k: int = 128
    pca_dim: int = 512
    rate: float = 0.5
    remove_extra: bool = False
    seed: int = 0
    workers: int | None = None
    gpus_per_worker: float | None = None


def w2vu_layout(root: str, name: str) -> OutputLayout:
    """The files of wav2vec-U output ``name``: per shard, the pooled features (``.npy``) and
    each utterance's rows in it (Parquet), with rejects and commit records."""
    return OutputLayout(
        root,
        "w2vu",
        name,
        data={"rows": "rows/{shard}.parquet", "features": "features/{shard}.npy"},
        rejects="rejects/{shard}.parquet",
        commit="commits/{shard}.json",
    )


class W2VUWorker:
    """Rebuilds the store's extractor once and prepares audio shards with it (a worker of
    :func:`units.stage.run_pass`)."""

    def __init__(self, root: str, name: str, kmeans: str, options: W2VUOptions, *, device: str):
        self.labeller = Labeller(root, kmeans, device=device)
        self.batch_seconds = self.labeller.batch_seconds
        self.prep = W2VUPrep.load(
            w2vu_layout(root, name).path("pca"),
            options.pca_dim,
            rate=options.rate,
            remove_extra=options.remove_extra,
        )

    def write_shard(self, out: ShardOutput, batches) -> dict:
        pooled, rows, at = [], [], 0
        for batch in batches:
            for (item, _), (features, ids) in zip(batch, self.labeller(batch), strict=True):
                x = self.prep(features, ids)
                pooled.append(x)
                rows.append(
                    {
                        "key": item["key"],
                        "shard": out.shard,
                        "clusters": ids,
                        "frames": len(ids),
                        "row": at,
                        "length": len(x),
                    }
                )
                at += len(x)
        dim = len(self.prep.pca_b)
        array = np.concatenate(pooled) if pooled else np.empty((0, dim), np.float32)
        out.write_npy("features", array)
        out.write_parquet("rows", rows, W2VU_ROWS)
        return {"utterances": len(rows), "rows": int(at)}


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
        StageError: A missing store or manifest, a PCA wider than the features, splits that
            do not add up or would be empty, or an output started with other settings.
    """
    started = time.monotonic()
    root = RootLayout(root).root
    layout = w2vu_layout(root, name)
    splits = {split: float(percent) for split, percent in splits.items()}
    try:
        store = FeatureStore(root, features)
    except FileNotFoundError as e:
        raise StageError(str(e)) from None
    if options.remove_extra and options.rate != 0.5:
        raise StageError(f"--remove-extra pools evenly at rate 0.5 only, not {options.rate}")
    if not 1 <= options.pca_dim <= store.dim:
        raise StageError(
            f"--pca-dim {options.pca_dim} must be between 1 and the feature dimension {store.dim}"
        )
    manifest_path = RootLayout(root).manifest("utterances.parquet")
    manifest = storage.read_parquet(manifest_path, columns=_MANIFEST_COLUMNS).to_pylist()
    try:
        assign_splits(manifest, splits, by, split_seed)  # Fails early on bad or empty splits.
    except ValueError as e:
        raise StageError(str(e)) from None
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
    claim(layout, plan, f"under {root} was started with other settings")
    done = read_json(layout.path("meta.json"))
    if done is not None:
        return NOTHING_TO_DO.result(done, "hours_prepared", started)

    gpus = place(options.workers, options.gpus_per_worker).options.get("num_gpus", 0)
    stage = StageOptions(workers=options.workers, gpus_per_worker=gpus, progress=progress)
    fit_kmeans(root, features, kmeans, KMeans(options.k, seed=options.seed), stage)
    if read_json(layout.path("pca", "pca.json")) is None:
        parts = distribute(store, workers=options.workers, gpus_per_worker=0)
        try:
            fit_pca(parts, layout.path("pca"), options.pca_dim)
        except DataError as e:
            raise StageError(f"feature store {features!r}: {e}") from None
        finally:
            parts.shutdown()

    by_shard = rows_by_shard(manifest)
    shards = sorted(by_shard)
    done = run_pass(
        layout,
        W2VUWorker,
        by_shard,
        root,
        name,
        kmeans,
        options,
        workers=options.workers,
        gpus_per_worker=options.gpus_per_worker,
        progress=progress,
    )
    meta, split_files = _assemble(root, layout, plan, shards, manifest, splits, by, split_seed)
    # The split files are this run's output too (the pass's own bytes are in ``done``).
    done = dataclasses.replace(
        done, bytes_written=done.bytes_written + sum(storage.file_size(p) for p in split_files)
    )
    meta["throughput"] = done.throughput("hours_prepared", started)
    write_atomic(layout.path("meta.json"), json.dumps(meta, indent=1, sort_keys=True).encode())
    return done.result(meta, "hours_prepared", started)


def _assemble(root, layout, plan, shards, manifest, splits, by, split_seed) -> tuple[dict, list]:
    """Concatenates the committed shards into the split files, in manifest order; returns
    the content of ``meta.json`` (written by the caller) and the split files."""
    table = storage.dataset(
        [layout.shard_path("rows", s) for s in shards], schema=W2VU_ROWS
    ).to_table(columns=["key", "shard", "row", "length"])
    placed = {r["key"]: r for r in table.to_pylist()}
    rows = [r for r in manifest if r["key"] in placed]
    try:
        members = assign_splits(rows, splits, by, split_seed)
    except ValueError as e:
        raise StageError(f"after the pass: {e}") from None
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
                source = storage.load_npy(layout.shard_path("features", current), mmap=True)
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
