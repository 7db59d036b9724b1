"""Files that appear whole or not at all: temporary names, fsync, rename, commit records.

Every stage commits its units of output this way (DESIGN.md, invariant 2): write under a
hidden temporary name, fsync, rename into place, and last a small commit record that says the
unit is complete.

A root on an object store (``s3://...``) has no rename and no fsync. There a writer builds its
file in local scratch space (``UNITPIPE_SCRATCH``, default the system temp directory), uploads
it under a hidden temporary key, moves it to its final key (a server-side copy) and writes the
commit record last. An object appears whole or not at all, and readers trust a unit only
through its commit record, whose ``bytes`` must match the object's size: an upload cut short,
or a data object that a retry is rewriting, is never taken for a committed unit.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage


def temp_prefix(final_path: str) -> str:
    """Temporary files of ``final_path`` start with this (hidden, so no glob of ``*.tar`` or
    ``*.npy`` picks them up)."""
    directory, name = os.path.split(final_path)
    return os.path.join(directory, f".{name}.tmp-")


def _temp_name(final_path: str) -> str:
    # The pid tells which process writes it (the fault tests use it).
    return f"{temp_prefix(final_path)}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def scratch_dir() -> str:
    """Local space where files bound for an object store are built."""
    path = os.environ.get("UNITPIPE_SCRATCH") or os.path.join(tempfile.gettempdir(), "unitpipe")
    os.makedirs(path, exist_ok=True)
    return path


def temp_path(final_path: str) -> str:
    """A fresh local file to build ``final_path`` in, to be published with :func:`publish`.

    Beside the final file for a local path; in scratch space for a remote one.
    """
    if storage.is_url(final_path):
        return _temp_name(os.path.join(scratch_dir(), os.path.basename(final_path)))
    return _temp_name(final_path)


def publish(temp: str, final_path: str, sync_dir: bool = True) -> None:
    """Makes a finished (and fsynced) temporary file visible as ``final_path``."""
    if storage.is_url(final_path):
        remote_temp = _temp_name(final_path)
        try:
            storage.upload(temp, remote_temp)
            storage.move(remote_temp, final_path)
        finally:
            os.unlink(temp)
        return
    os.replace(temp, final_path)
    if sync_dir:
        fsync_dir(os.path.dirname(final_path))


class PendingFile:
    """A file streamed under a temporary name (:func:`temp_path`) and published whole.

    :meth:`publish` fsyncs, closes and renames it into place; :meth:`discard` removes it and
    does nothing once it is published. As a context manager it discards on the way out, so
    an error between opening and publishing leaves nothing behind.

    Args:
        final: The path the file is published as.
        mode: ``open``'s mode (and any other ``open`` argument as keywords).

    Example:
        >>> with PendingFile("/tmp/doc-pending.txt", "w") as f:  # doctest: +SKIP
        ...     f.file.write("whole or not at all\\n")
        ...     f.publish()
    """

    def __init__(self, final: str, mode: str = "wb", **open_args):
        self.final = final
        self.temp = temp_path(final)
        self.file = open(self.temp, mode, **open_args)  # Closed by publish() or discard().
        self.published = False

    def publish(self, sync_dir: bool = True) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        publish(self.temp, self.final, sync_dir=sync_dir)
        self.published = True

    def discard(self) -> None:
        """Closes and removes the temporary file unless it was published; never raises (it
        runs while another error is raised, and on a full disk closing fails to flush)."""
        if self.published:
            return
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):
            os.remove(self.temp)

    def __enter__(self) -> PendingFile:
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


def remove_temps(final_path: str) -> None:
    """Drops what earlier, killed writers of ``final_path`` left behind."""
    directory, name = os.path.split(temp_prefix(final_path))
    for stale in storage.glob(directory, name + "*"):
        storage.remove(stale)


def remove_all_temps(*directories: str) -> None:
    """Drops every temporary file in ``directories``: call only when no writer is alive
    (a stage's end), as an attempt that lost a race with another leaves its file behind."""
    for directory in directories:
        for stale in storage.glob(directory, ".*.tmp-*"):
            storage.remove(stale)


def unpublish(*paths: str) -> None:
    """Removes the published files of a unit whose commit record was never written (a full
    disk, say), so that none stays visible without it. Never raises: it runs while the
    error that stopped the unit propagates."""
    for path in paths:
        try:
            storage.remove(path)
        except OSError:
            pass


def committed(path: str, record: bytes) -> bool:
    """Whether the commit record ``record`` is in place at ``path``.

    An error that stops a unit after its record was renamed into place (a worker told to
    exit while it fsyncs the directory, say) leaves the unit committed: its data must then
    stay with the record, not be unpublished as an uncommitted unit's is.
    """
    try:
        return storage.read_bytes(path) == record
    except OSError:
        return False


def fsync_dir(path: str) -> None:
    """Makes renames in ``path`` durable (object stores are durable on write)."""
    if storage.is_url(path):
        return
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, sync_dir: bool = True) -> None:
    """Writes a small file under a temporary name, fsyncs it and renames it into place."""
    if storage.is_url(path):
        tmp = _temp_name(path)
        storage.write_bytes(tmp, data)
        storage.move(tmp, path)
        return
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        # A full disk leaves no half-written temporary file behind, and its error names the
        # file (a failed write or close does not).
        storage.remove(tmp)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = path
        raise
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(os.path.dirname(path))


def write_npy_atomic(path: str, array, sync_dir: bool = True) -> None:
    """Writes one array as a ``.npy`` file, atomically."""
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array))
    write_atomic(path, buf.getvalue(), sync_dir=sync_dir)


class ParquetStream:
    """Tables appended to one Parquet file in row groups of ``row_group`` rows, streamed into
    a :class:`PendingFile` and published whole: memory holds one row group, not the file.

    The row groups do not depend on how the rows came (one table or many), so the bytes are
    the same however the writer batched them. As a context manager it removes the file
    unless it was published.

    Args:
        final: The path the file is published as.
        schema: The tables' schema.
        row_group: Rows per row group (the last one may have fewer).
    """

    def __init__(self, final: str, schema: pa.Schema, row_group: int):
        self.final = final
        self.rows = 0
        self._row_group = row_group
        self._pending = PendingFile(final)
        self._writer = pq.ParquetWriter(self._pending.file, schema)
        self._tables: list[pa.Table] = []
        self._held = 0

    def write(self, table: pa.Table) -> None:
        self._tables.append(table)
        self._held += table.num_rows
        self.rows += table.num_rows
        while self._held >= self._row_group:
            whole = pa.concat_tables(self._tables)
            group = self._row_group
            self._writer.write_table(whole.slice(0, group), row_group_size=group)
            rest = whole.slice(group)
            self._tables, self._held = [rest], rest.num_rows

    def publish(self, sync_dir: bool = True) -> None:
        """Writes the last row group and the footer, and publishes the file."""
        if self._held:
            last = pa.concat_tables(self._tables)
            self._writer.write_table(last, row_group_size=self._row_group)
        self._tables, self._held = [], 0
        self._writer.close()
        self._pending.publish(sync_dir=sync_dir)

    def discard(self) -> None:
        """Drops the temporary file unless it was published; never raises."""
        if not self._pending.published:
            with contextlib.suppress(Exception):  # The error being raised is the one to see.
                self._writer.close()
        self._pending.discard()

    def __enter__(self) -> ParquetStream:
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


def write_parquet_atomic(
    path: str,
    rows_or_table: list[dict] | pa.Table,
    schema: pa.Schema | None = None,
    sync_dir: bool = True,
) -> None:
    """Writes rows (with ``schema``) or a table as one Parquet file, atomically."""
    table = (
        rows_or_table
        if isinstance(rows_or_table, pa.Table)
        else pa.Table.from_pylist(rows_or_table, schema=schema)
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_atomic(path, buf.getvalue(), sync_dir=sync_dir)


def read_json(path: str) -> dict | None:
    """A small JSON record, or None when it is not there (not written yet)."""
    try:
        return json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        return None


def read_commit(commit_path: str, data_path: str) -> dict | None:
    """A unit's commit record, if the record exists and the data file has its ``bytes``."""
    try:
        record = json.loads(storage.read_bytes(commit_path))
        size = storage.file_size(data_path)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return record if size == record["bytes"] else None
