"""The feature store: sampled features, float16 per shard, with an index, committed per shard.

Layout under ``ROOT/features/NAME/``::

    plan.json                 spec, sample request, fingerprint (written before any work)
    sample.parquet            the sampled utterances: key, shard, offset, size, frames
    shards/000000.npy         float16 (rows, dim): the utterances of audio shard 000000, in order
    shards/000000.index.parquet   key, shard, offset (first row), frames
    shards/000000.commit.json     written last: the shard is complete
    index.parquet             every shard's index joined, in shard order
    rejects.parquet           utterances whose audio or features could not be used
    meta.json                 spec, sample and totals; written last: the store is complete

Each ``.npy`` is written through a fixed-size header reserved up front
(:class:`shards.core.outputs.NpyStream`), so rows stream to disk as they are computed and
memory does not grow with the shard.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa

from shards.core import storage
from shards.core.atomic import read_json, write_atomic, write_parquet_atomic
from shards.core.outputs import OutputLayout, ShardOutput
from units.schemas import FEATURE_INDEX, REJECTS

DTYPE = np.dtype("<f2")


def store_layout(root: str, name: str) -> OutputLayout:
    """The files of feature store ``name`` (see the module docstring)."""
    return OutputLayout(
        root,
        "features",
        name,
        data={"array": "shards/{shard}.npy", "index": "shards/{shard}.index.parquet"},
        rejects="shards/{shard}.rejects.parquet",
        commit="shards/{shard}.commit.json",
    )


class FeatureShardWriter:
    """Streams one shard's feature rows, as float16, into the shard's ``.npy`` and index.

    Example:
        >>> layout = store_layout("/tmp/doc-root", "mfcc"); layout.make_dirs()
        >>> w = FeatureShardWriter(ShardOutput(layout, "000000"), dim=2)
        >>> w.add("utt1", np.zeros((3, 2), np.float32))
        >>> w.commit()["rows"]
        3
    """

    def __init__(self, out: ShardOutput, dim: int):
        self.out, self.dim = out, dim
        self._array = out.stream_npy("array", dim, DTYPE)
        self._index: list[dict] = []

    def add(self, key: str, features: np.ndarray) -> None:
        """Appends one utterance's frames; non-finite features become a reject instead."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"{key}: features of shape {features.shape}, expected (T, {self.dim})")
        with np.errstate(over="ignore"):  # Overflow is caught just below, as inf.
            half = features.astype(DTYPE)
        if not np.isfinite(half).all():
            self.out.reject(
                key, "non_finite_features", "NaN or Inf in the features (or beyond float16)"
            )
            return
        offset = self._array.rows
        self._array.append(half)
        self._index.append(
            {"key": key, "shard": self.out.shard, "offset": offset, "frames": len(half)}
        )

    def finish(self) -> dict:
        """Writes the index; returns the counts of the shard's commit record."""
        self.out.write_parquet("index", self._index, FEATURE_INDEX)
        return {"utterances": len(self._index), "rows": self._array.rows}

    def commit(self) -> dict:
        """Finishes and commits the shard (:meth:`ShardOutput.commit`); returns its record."""
        try:
            counts = self.finish()
        except BaseException:
            self.out.abort()
            raise
        return self.out.commit(**counts)

    def abort(self) -> None:
        self.out.abort()


def finalize(layout: OutputLayout, shards: Iterable[str], meta: dict) -> dict:
    """Joins the committed shards' indexes and rejects and writes ``meta.json`` last."""
    indexes, rejects, totals = [], [], {"utterances": 0, "rows": 0, "bytes": 0, "rejects": 0}
    shard_names = list(shards)
    for shard in shard_names:
        record = layout.read_commit(shard)
        if record is None:
            raise RuntimeError(f"feature shard {shard} is not committed; rerun to finish it")
        for k in totals:
            totals[k] += record[k]
        indexes.append(
            storage.read_parquet(layout.shard_path("index", shard), schema=FEATURE_INDEX)
        )
        rejects.append(storage.read_parquet(layout.rejects_path(shard), schema=REJECTS))
    index = pa.concat_tables(indexes) if indexes else FEATURE_INDEX.empty_table()
    rejected = pa.concat_tables(rejects) if rejects else REJECTS.empty_table()
    write_parquet_atomic(layout.path("index.parquet"), index)
    write_parquet_atomic(layout.path("rejects.parquet"), rejected)
    meta = dict(meta, shards=shard_names, **totals)
    write_atomic(layout.path("meta.json"), json.dumps(meta, indent=1, sort_keys=True).encode())
    return meta


class FeatureStore:
    """Reads a finished store.

    Example:
        >>> store = FeatureStore("/data/root", "mfcc")  # doctest: +SKIP
        >>> for key, feats in store:  # float16 (T, dim), in index order
        ...     pass
    """

    def __init__(self, root: str, name: str):
        self.layout = store_layout(root, name)
        meta_path = self.layout.path("meta.json")
        self.meta = read_json(meta_path)
        if self.meta is None:
            raise FileNotFoundError(
                f"no finished feature store {name!r} under {root}: run pipelines.features first"
            )
        self.index = storage.read_parquet(self.layout.path("index.parquet"))

    @property
    def dim(self) -> int:
        return self.meta["spec"]["dim"]

    def shard_array(self, shard: str) -> np.ndarray:
        """One shard's rows (float16, (rows, dim)): memory-mapped from local disk, read whole
        from an object store."""
        return storage.load_npy(self.layout.shard_path("array", shard), mmap=True)

    def shard_names(self) -> list[str]:
        return list(self.meta["shards"])

    def __len__(self) -> int:
        return self.index.num_rows

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        current, array = None, None
        for key, shard, offset, frames in zip(
            *(self.index.column(c).to_pylist() for c in ("key", "shard", "offset", "frames")),
            strict=True,
        ):
            if shard != current:
                current, array = shard, self.shard_array(shard)
            yield key, np.asarray(array[offset : offset + frames])
