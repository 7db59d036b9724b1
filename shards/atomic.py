"""Files that appear whole or not at all: temporary names, fsync, rename, commit records.

Every stage commits its units of output this way (DESIGN.md, invariant 2): write under a
hidden temporary name, fsync, rename into place, and last a small commit record that says the
unit is complete.
"""

from __future__ import annotations

import glob
import io
import json
import os
import uuid

import pyarrow as pa
import pyarrow.parquet as pq


def temp_prefix(final_path: str) -> str:
    """Temporary files of ``final_path`` start with this (hidden, so no glob of ``*.tar`` or
    ``*.npy`` picks them up)."""
    directory, name = os.path.split(final_path)
    return os.path.join(directory, f".{name}.tmp-")


def temp_path(final_path: str) -> str:
    """A fresh temporary name for ``final_path``; the pid in it tells which process writes it
    (the fault tests use it)."""
    return f"{temp_prefix(final_path)}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_temps(final_path: str) -> None:
    """Drops what earlier, killed writers of ``final_path`` left behind."""
    for stale in glob.glob(temp_prefix(final_path) + "*"):
        os.unlink(stale)


def fsync_dir(path: str) -> None:
    """Makes renames in ``path`` durable."""
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, sync_dir: bool = True) -> None:
    """Writes a small file under a temporary name, fsyncs it and renames it into place."""
    tmp = temp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(os.path.dirname(path))


def write_npy_atomic(path: str, array, sync_dir: bool = True) -> None:
    """Writes one array as a ``.npy`` file, atomically."""
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array))
    write_atomic(path, buf.getvalue(), sync_dir=sync_dir)


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
        with open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def read_commit(commit_path: str, data_path: str) -> dict | None:
    """A unit's commit record, if the record exists and the data file has its ``bytes``."""
    try:
        with open(commit_path, "rb") as f:
            record = json.load(f)
        size = os.path.getsize(data_path)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return record if size == record["bytes"] else None
