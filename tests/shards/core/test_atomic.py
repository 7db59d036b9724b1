"""Units that appear whole or not at all, on local disk and on an object store (a real S3
server on loopback): the same calls, the same guarantees."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.fs as pafs
import pytest

from shards.core import atomic, storage


@pytest.fixture(scope="module")
def bucket(s3_server):
    pafs.S3FileSystem(endpoint_override=s3_server, allow_bucket_creation=True).create_dir("units")
    return "s3://units"


@pytest.fixture(params=["local", "s3"])
def directory(request, tmp_path):
    """An empty directory: a local one, or a fresh prefix of the bucket."""
    if request.param == "local":
        return str(tmp_path)
    base = request.getfixturevalue("bucket")
    return f"{base}/{request.node.name.replace('[', '-').rstrip(']')}"


def _names(directory):
    return storage.listdir(directory)


def test_write_atomic_leaves_the_file_and_no_temporary(directory):
    path = storage.join(directory, "a.json")
    storage.makedirs(directory)
    atomic.write_atomic(path, b'{"x": 1}')
    assert atomic.read_json(path) == {"x": 1}
    assert _names(directory) == ["a.json"]


def test_a_built_file_is_published_whole_and_its_scratch_copy_removed(directory, tmp_path):
    final = storage.join(directory, "000000.npy")
    storage.makedirs(directory)
    temp = atomic.temp_path(final)
    if storage.is_url(final):  # Built in local scratch space, not beside the object.
        assert temp.startswith(atomic.scratch_dir())
    else:
        assert os.path.dirname(temp) == directory
    with open(temp, "wb") as f:
        np.save(f, np.arange(6, dtype=np.float32))
    assert not storage.exists(final)
    atomic.publish(temp, final)
    assert not os.path.exists(temp)
    assert np.array_equal(storage.load_npy(final), np.arange(6, dtype=np.float32))
    assert _names(directory) == ["000000.npy"]


def test_a_commit_record_is_trusted_only_while_the_data_has_its_bytes(directory):
    storage.makedirs(directory)
    data, record = storage.join(directory, "u.parquet"), storage.join(directory, "u.json")
    assert atomic.read_commit(record, data) is None  # Nothing yet.
    atomic.write_atomic(data, b"0123456789")
    assert atomic.read_commit(record, data) is None  # Data without its record.
    atomic.write_atomic(record, json.dumps({"bytes": 10}).encode())
    assert atomic.read_commit(record, data) == {"bytes": 10}
    atomic.write_atomic(data, b"another attempt")  # Rewritten after the record.
    assert atomic.read_commit(record, data) is None
    atomic.write_atomic(record, b"{trunc")
    assert atomic.read_commit(record, data) is None


def test_temporaries_of_dead_writers_are_hidden_and_removed(directory):
    storage.makedirs(directory)
    final = storage.join(directory, "000001.tar")
    stale = atomic.temp_prefix(final) + "4242-deadbeef"
    other = atomic.temp_prefix(storage.join(directory, "000002.tar")) + "1-cafe"
    for path in (stale, other):
        atomic.write_atomic(path, b"half a shard")
    atomic.write_atomic(final, b"whole")
    assert storage.glob(directory, "*.tar") == [final]  # Temporaries are never listed.
    atomic.remove_temps(final)
    assert _names(directory) == [os.path.basename(other), "000001.tar"]
    atomic.remove_all_temps(directory)
    assert _names(directory) == ["000001.tar"]


def test_a_parquet_stream_writes_fixed_row_groups_however_its_rows_come(directory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"n": np.arange(10)})
    whole, pieces = (
        storage.join(directory, "whole.parquet"),
        storage.join(directory, "pieces.parquet"),
    )
    with atomic.ParquetStream(whole, table.schema, row_group=4) as stream:
        stream.write(table)
        stream.publish()
    with atomic.ParquetStream(pieces, table.schema, row_group=4) as stream:
        for lo, hi in [(0, 1), (1, 7), (7, 7), (7, 10)]:
            stream.write(table.slice(lo, hi - lo))
        # Nothing of it is visible yet (a temporary file starts with a dot: readers skip it).
        assert [n for n in _names(directory) if not n.startswith(".")] == ["whole.parquet"]
        stream.publish()
    assert storage.read_bytes(whole) == storage.read_bytes(pieces)
    with storage.open_input(whole) as f:
        meta = pq.ParquetFile(f).metadata
        assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [4, 4, 2]
    assert storage.read_parquet(pieces).equals(table)


def test_a_parquet_stream_not_published_leaves_nothing(directory):
    import pyarrow as pa

    table = pa.table({"n": np.arange(3)})
    with pytest.raises(RuntimeError):
        with atomic.ParquetStream(storage.join(directory, "x.parquet"), table.schema, 2) as stream:
            stream.write(table)
            raise RuntimeError("the worker failed")
    assert _names(directory) == []
