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

Each ``.npy`` is written through a fixed-size header reserved up front, so rows stream to
disk as they are computed and memory does not grow with the shard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa

from shards import storage
from shards.atomic import (
    publish,
    read_commit,
    read_json,
    temp_path,
    unpublish,
    write_atomic,
    write_parquet_atomic,
)

FEATURE_INDEX = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("offset", pa.int64(), nullable=False),
        pa.field("frames", pa.int64(), nullable=False),
    ]
)

FEATURE_REJECTS = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
    ]
)

#: Bytes reserved for the .npy header (magic, version, length, dict; a multiple of 64).
_HEADER = 128
DTYPE = np.dtype("<f2")


@dataclasses.dataclass(frozen=True)
class StoreLayout:
    """Paths of one feature store."""

    root: str
    name: str

    @property
    def directory(self) -> str:
        return os.path.join(self.root, "features", self.name)

    @property
    def shards_dir(self) -> str:
        return os.path.join(self.directory, "shards")

    def path(self, filename: str) -> str:
        return os.path.join(self.directory, filename)

    def array_path(self, shard: str) -> str:
        return os.path.join(self.shards_dir, f"{shard}.npy")

    def index_path(self, shard: str) -> str:
        return os.path.join(self.shards_dir, f"{shard}.index.parquet")

    def rejects_path(self, shard: str) -> str:
        return os.path.join(self.shards_dir, f"{shard}.rejects.parquet")

    def commit_path(self, shard: str) -> str:
        return os.path.join(self.shards_dir, f"{shard}.commit.json")

    def make_dirs(self) -> None:
        storage.makedirs(self.shards_dir)

    def read_commit(self, shard: str) -> dict | None:
        return read_commit(self.commit_path(shard), self.array_path(shard))


def _npy_header(rows: int, dim: int) -> bytes:
    header = repr({"descr": DTYPE.str, "fortran_order": False, "shape": (rows, dim)})
    body = header.encode("latin1")
    pad = _HEADER - 10 - len(body) - 1
    if pad < 0:
        raise ValueError(f"shape ({rows}, {dim}) does not fit a {_HEADER}-byte npy header")
    return b"\x93NUMPY\x01\x00" + (_HEADER - 10).to_bytes(2, "little") + body + b" " * pad + b"\n"


class FeatureShardWriter:
    """Streams one shard's feature rows into a temporary ``.npy``, committed atomically.

    Example:
        >>> layout = StoreLayout("/tmp/doc-root", "mfcc"); layout.make_dirs()
        >>> w = FeatureShardWriter(layout, "000000", dim=2)
        >>> w.add("utt1", np.zeros((3, 2), np.float32))
        >>> w.commit()["rows"]
        3
    """

    def __init__(self, layout: StoreLayout, shard: str, dim: int):
        self.layout, self.shard, self.dim = layout, shard, dim
        final = layout.array_path(shard)
        self._temp = temp_path(final)
        self._f = open(self._temp, "wb")  # Closed by commit() or abort().
        self._f.write(_npy_header(0, dim))
        self._rows = 0
        self._index: list[dict] = []
        self.rejects: list[dict] = []

    def add(self, key: str, features: np.ndarray) -> None:
        """Appends one utterance's frames; non-finite features become a reject instead."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"{key}: features of shape {features.shape}, expected (T, {self.dim})")
        with np.errstate(over="ignore"):  # Overflow is caught just below, as inf.
            half = features.astype(DTYPE)
        if not np.isfinite(half).all():
            self.reject(
                key, "non_finite_features", "NaN or Inf in the features (or beyond float16)"
            )
            return
        with self._naming_errors():
            self._f.write(half.tobytes())
        self._index.append(
            {"key": key, "shard": self.shard, "offset": self._rows, "frames": len(half)}
        )
        self._rows += len(half)

    def reject(self, key: str, reason: str, message: str) -> None:
        self.rejects.append({"key": key, "shard": self.shard, "reason": reason, "message": message})

    def commit(self) -> dict:
        """Writes the real header, fsyncs, renames, then the index and the commit record."""
        with self._naming_errors():
            self._f.seek(0)
            self._f.write(_npy_header(self._rows, self.dim))
            self._f.flush()
            os.fsync(self._f.fileno())
            nbytes = self._f.seek(0, io.SEEK_END)
            self._f.close()
        record = {
            "shard": self.shard,
            "utterances": len(self._index),
            "rows": self._rows,
            "bytes": nbytes,
            "rejects": len(self.rejects),
        }
        try:
            write_parquet_atomic(
                self.layout.index_path(self.shard), self._index, FEATURE_INDEX, sync_dir=False
            )
            write_parquet_atomic(
                self.layout.rejects_path(self.shard), self.rejects, FEATURE_REJECTS, sync_dir=False
            )
            publish(self._temp, self.layout.array_path(self.shard))
            write_atomic(
                self.layout.commit_path(self.shard), json.dumps(record, sort_keys=True).encode()
            )
        except BaseException:
            unpublish(
                self.layout.array_path(self.shard),
                self.layout.index_path(self.shard),
                self.layout.rejects_path(self.shard),
            )
            raise
        return record

    def abort(self) -> None:
        """Drops the temporary file; never raises (it runs while another error is raised,
        and on a full disk closing the file fails to flush it too)."""
        with contextlib.suppress(OSError):
            self._f.close()
        with contextlib.suppress(OSError):
            storage.remove(self._temp)

    @contextlib.contextmanager
    def _naming_errors(self):
        """A failed write names the file it failed on (a full disk's ENOSPC names none)."""
        try:
            yield
        except OSError as e:
            if e.filename is None:
                e.filename = self._temp
            raise


def finalize(layout: StoreLayout, shards: Iterable[str], meta: dict) -> dict:
    """Joins the committed shards' indexes and rejects and writes ``meta.json`` last."""
    indexes, rejects, totals = [], [], {"utterances": 0, "rows": 0, "bytes": 0, "rejects": 0}
    shard_names = list(shards)
    for shard in shard_names:
        record = layout.read_commit(shard)
        if record is None:
            raise RuntimeError(f"feature shard {shard} is not committed; rerun to finish it")
        for k in totals:
            totals[k] += record[k]
        indexes.append(storage.read_parquet(layout.index_path(shard), schema=FEATURE_INDEX))
        rejects.append(storage.read_parquet(layout.rejects_path(shard), schema=FEATURE_REJECTS))
    index = pa.concat_tables(indexes) if indexes else FEATURE_INDEX.empty_table()
    rejected = pa.concat_tables(rejects) if rejects else FEATURE_REJECTS.empty_table()
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
        self.layout = StoreLayout(root, name)
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
        return storage.load_npy(self.layout.array_path(shard), mmap=True)

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
