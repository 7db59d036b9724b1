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
