"""A stage's output under ``ROOT/KIND/NAME``: where each shard's files go, and how they commit.

Every stage that streams shards (features, labels, wav2vec-U preparation) writes, per input
shard, one or more data files and a rejects table, and last a small commit record that says
the shard is complete (DESIGN.md, invariant 2). :class:`OutputLayout` says where those files
live; :class:`ShardOutput` writes one shard's files and commits them, or removes them all.

Example:
    >>> layout = OutputLayout("/tmp/doc-root", "labels", "it1",
    ...     data={"units": "units/{shard}.parquet"},
    ...     rejects="rejects/{shard}.parquet", commit="commits/{shard}.json")
    >>> layout.shard_path("units", "000007")
    '/tmp/doc-root/labels/it1/units/000007.parquet'
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Mapping

import numpy as np
import pyarrow as pa

from . import storage
from .atomic import (
    ParquetStream,
    PendingFile,
    committed,
    fsync_dir,
    read_commit,
    remove_all_temps,
    remove_temps,
    unpublish,
    write_atomic,
    write_npy_atomic,
    write_parquet_atomic,
)


class StageError(ValueError):
    """Arguments or state a stage cannot work with (a missing input, an output started with
    other settings, ...); raised before any work is done."""


#: Utterances a stage could not use, with the reason (``corrupt_audio``,
#: ``non_finite_features``, ...) and the error's message.
REJECTS = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
    ]
)


@dataclasses.dataclass(frozen=True)
class OutputLayout:
    """Paths of one stage output: ``ROOT/KIND/NAME`` and each shard's files in it.

    Attributes:
        root: Dataset root (a local path or an object-store URL).
        kind: The stage's directory under the root (``features``, ``labels``, ``w2vu``).
        name: The output's name.
        data: Each data file's role and path template (``{shard}`` is the shard's name),
            relative to the output's directory. The first is the one whose size the commit
            record carries: a shard counts as committed only while that file has it.
        rejects: Path template of the shard's rejects table.
        commit: Path template of the shard's commit record.
    """

    root: str
    kind: str
    name: str
    data: Mapping[str, str]
    rejects: str
    commit: str

    @property
    def directory(self) -> str:
        return os.path.join(self.root, self.kind, self.name)

    def path(self, *parts: str) -> str:
        """A file of the output itself (``plan.json``, ``meta.json``, ...)."""
        return os.path.join(self.directory, *parts)

    def shard_path(self, role: str, shard: str) -> str:
        return self.path(self.data[role].format(shard=shard))

    def rejects_path(self, shard: str) -> str:
        return self.path(self.rejects.format(shard=shard))

    def commit_path(self, shard: str) -> str:
        return self.path(self.commit.format(shard=shard))

    def shard_dirs(self) -> list[str]:
        """The directories that hold shard files, each once."""
        templates = [*self.data.values(), self.rejects, self.commit]
        return list(dict.fromkeys(os.path.dirname(self.path(t)) for t in templates))

    def make_dirs(self) -> None:
        for directory in self.shard_dirs():
            storage.makedirs(directory)

    def read_commit(self, shard: str) -> dict | None:
        """The shard's commit record, if it is committed and its first data file is whole."""
        return read_commit(self.commit_path(shard), self.shard_path(next(iter(self.data)), shard))

    def remove_temps(self) -> None:
        """Drops every temporary file of the shard directories: call only when no writer
        is alive (a stage's end), as an attempt that lost a race leaves its file behind."""
        remove_all_temps(*self.shard_dirs())

    def output(self, shard: str) -> ShardOutput:
        """The writer of ``shard``'s files (the engine's one call, for any layout)."""
        return ShardOutput(self, shard)


class ShardOutput:
    """One shard's files of a stage output, committed together or not at all.

    A worker writes the shard's data files through it (whole arrays and tables, or rows
    streamed into an ``.npy``) and its rejects; :meth:`commit` then publishes what is still
    temporary, writes the rejects, makes the renames durable and writes the commit record
    last. :meth:`abort` removes everything the attempt wrote, so no data file stays visible
    without its commit record. Temporary files that an earlier, killed attempt left are
    removed when the output is opened.

    Args:
        layout: The stage output.
        shard: The shard's name.
    """

    def __init__(self, layout: OutputLayout, shard: str):
        self.layout, self.shard = layout, shard
        self.rejects: list[dict] = []
        self.bytes_written = 0
        self._published: list[str] = []
        self._streams: list[NpyStream | ParquetStream] = []
        for role in layout.data:
            remove_temps(layout.shard_path(role, shard))

    def path(self, role: str) -> str:
        return self.layout.shard_path(role, self.shard)

    def reject(self, key: str, reason: str, message: str) -> None:
        self.rejects.append({"key": key, "shard": self.shard, "reason": reason, "message": message})

    def write_parquet(self, role: str, rows: list[dict] | pa.Table, schema: pa.Schema) -> None:
        self._publish(self.path(role), write_parquet_atomic, rows, schema)

    def write_npy(self, role: str, array: np.ndarray) -> None:
        self._publish(self.path(role), write_npy_atomic, array)

    def stream_npy(self, role: str, dim: int, dtype: np.dtype) -> NpyStream:
        """A ``.npy`` of ``(rows, dim)`` written row block by row block; published by
        :meth:`commit`."""
        stream = NpyStream(self.path(role), dim, dtype)
        self._streams.append(stream)
        return stream

    def stream_parquet(self, role: str, schema: pa.Schema, row_group: int) -> ParquetStream:
        """A Parquet file written table by table in row groups of ``row_group`` rows;
        published by :meth:`commit`."""
        stream = ParquetStream(self.path(role), schema, row_group)
        self._streams.append(stream)
        return stream

    def commit(self, **counts: int) -> dict:
        """Publishes the shard and writes its commit record last; returns the record.

        Args:
            counts: What the record says of the shard besides its name, rejects and bytes
                (``utterances``, ``rows``, ``frames``, ...).
        """
        data = None  # The commit record, once made.
        try:
            for stream in self._streams:
                stream.publish(sync_dir=False)
                self._published.append(stream.final)
            self._streams = []
            self._publish(self.layout.rejects_path(self.shard), write_parquet_atomic,
                          self.rejects, REJECTS)  # fmt: skip
            for directory in dict.fromkeys(os.path.dirname(p) for p in self._published):
                fsync_dir(directory)
            sizes = {path: storage.file_size(path) for path in self._published}
            first = self.path(next(iter(self.layout.data)))
            if first not in sizes:
                raise RuntimeError(f"shard {self.shard}: its worker did not write {first}")
            record = dict(counts, shard=self.shard, rejects=len(self.rejects), bytes=sizes[first])
            data = json.dumps(record, sort_keys=True).encode()
            write_atomic(self.layout.commit_path(self.shard), data)
        except BaseException:
            if data is not None and committed(self.layout.commit_path(self.shard), data):
                # Stopped after its commit: the shard is whole, and its files stay.
                self._published = []
            else:
                self.abort()
            raise
        self.bytes_written += sum(sizes.values()) + len(data)
        self._published = []  # Committed: nothing of it is this attempt's to remove any more.
        return record

    def abort(self) -> None:
        """Removes what this attempt wrote; never raises (it runs while another error is
        raised, and on a full disk closing a file fails to flush it too)."""
        for stream in self._streams:
            stream.discard()
        self._streams = []
        unpublish(*self._published)
        self._published = []

    def _publish(self, final: str, write, *args) -> None:
        self._published.append(final)  # Before writing: a half-failed write is undone too.
        write(final, *args, sync_dir=False)


#: Bytes reserved for a streamed .npy's header (magic, version, length, dict; a multiple of 64).
_HEADER = 128


class NpyStream:
    """Rows appended to a temporary ``.npy`` as they come, so memory does not grow with the
    shard: its header is reserved up front and written with the final row count when it is
    published (by :class:`ShardOutput`).
    """

    def __init__(self, final: str, dim: int, dtype: np.dtype):
        self.final, self.dim, self.dtype = final, dim, np.dtype(dtype)
        self.rows = 0
        self._pending = PendingFile(final)
        with self._naming_errors():
            self._pending.file.write(self._header(0))

    def append(self, rows: np.ndarray) -> None:
        if rows.ndim != 2 or rows.shape[1] != self.dim or rows.dtype != self.dtype:
            raise ValueError(
                f"rows {rows.shape} {rows.dtype}, expected (n, {self.dim}) {self.dtype}"
            )
        with self._naming_errors():
            self._pending.file.write(np.ascontiguousarray(rows).tobytes())
        self.rows += len(rows)

    def publish(self, sync_dir: bool = True) -> None:
        """Writes the real header, fsyncs and renames the file into place."""
        with self._naming_errors():
            self._pending.file.seek(0)
            self._pending.file.write(self._header(self.rows))
            self._pending.publish(sync_dir=sync_dir)

    def discard(self) -> None:
        """Drops the temporary file unless it was published; never raises."""
        self._pending.discard()

    def _header(self, rows: int) -> bytes:
        header = repr({"descr": self.dtype.str, "fortran_order": False, "shape": (rows, self.dim)})
        body = header.encode("latin1")
        pad = _HEADER - 10 - len(body) - 1
        if pad < 0:
            raise ValueError(f"shape ({rows}, {self.dim}) does not fit a {_HEADER}-byte npy header")
        magic = b"\x93NUMPY\x01\x00" + (_HEADER - 10).to_bytes(2, "little")
        return magic + body + b" " * pad + b"\n"

    @contextlib.contextmanager
    def _naming_errors(self):
        """A failed write names the file it failed on (a full disk's ENOSPC names none)."""
        try:
            yield
        except OSError as e:
            if e.filename is None:
                e.filename = self._pending.temp
            raise


@dataclasses.dataclass(frozen=True)
class LayoutGroup:
    """Several outputs one pass writes from the same shards (a label set per target, say):
    each is a whole output of its own, and a shard is done once every one has committed it.

    It stands where the engine takes an :class:`OutputLayout` (:func:`units.stage.run_pass`):
    ``read_commit`` is ``None`` until all are committed, and :meth:`output` writes the
    shard to those still without it, so a run killed between two commits redoes the shard
    for the rest only and leaves the committed files as they are.
    """

    layouts: tuple[OutputLayout, ...]

    @property
    def root(self) -> str:
        return self.layouts[0].root

    @property
    def kind(self) -> str:
        return self.layouts[0].kind

    @property
    def name(self) -> str:
        return "+".join(layout.name for layout in self.layouts)

    def read_commit(self, shard: str) -> dict | None:
        records = [layout.read_commit(shard) for layout in self.layouts]
        if any(r is None for r in records):
            return None
        return {"shard": shard, "outputs": records}

    def make_dirs(self) -> None:
        for layout in self.layouts:
            layout.make_dirs()

    def remove_temps(self) -> None:
        for layout in self.layouts:
            layout.remove_temps()

    def output(self, shard: str) -> OutputGroup:
        return OutputGroup(self, shard)


class OutputGroup:
    """One shard's writers for the outputs of a :class:`LayoutGroup` that have not committed
    it yet (``members``: each output's index in the group and its :class:`ShardOutput`)."""

    def __init__(self, group: LayoutGroup, shard: str):
        self.shard = shard
        self.members = [
            (i, ShardOutput(layout, shard))
            for i, layout in enumerate(group.layouts)
            if layout.read_commit(shard) is None
        ]

    @property
    def bytes_written(self) -> int:
        return sum(out.bytes_written for _, out in self.members)

    def reject(self, key: str, reason: str, message: str) -> None:
        """The utterance is a reject of every output: each is whole on its own."""
        for _, out in self.members:
            out.reject(key, reason, message)

    def commit(self, counts: list[dict]) -> dict:
        """Commits each member with its own counts (in ``members`` order), one by one."""
        records = [out.commit(**c) for (_, out), c in zip(self.members, counts, strict=True)]
        return {"shard": self.shard, "outputs": records}

    def abort(self) -> None:
        for _, out in self.members:
            out.abort()
