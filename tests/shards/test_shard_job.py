"""One shard written without Ray: commits, rejects, and the safety net for odd inputs."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from shards.core import atomic
from shards.core.outputs import OutputLayout, ShardOutput
from shards.discover import Source
from shards.plan import ShardingOptions, make_plan, probed_rows
from shards.probe import probe
from shards.root import RootLayout
from shards.shard_job import write_shard
from tests.conftest import tone


def _rows(tmp_path, names):
    probes = []
    for name in names:
        sf.write(tmp_path / name, tone(0.5, 16000), 16000)
        probes.append(probe(Source(str(tmp_path / name), name.split(".")[0])))
    opts = ShardingOptions()
    return make_plan(probed_rows(probes, opts), [], opts, {"files": len(names)}).shards[0]


def test_a_committed_shard_is_not_written_again(tmp_path):
    rows = _rows(tmp_path, ["a.flac", "b.wav"])
    RootLayout(str(tmp_path / "root")).make_dirs()
    first = write_shard(str(tmp_path / "root"), 0, rows, ShardingOptions())
    second = write_shard(str(tmp_path / "root"), 0, rows, ShardingOptions())
    assert first["written"] and not second["written"]
    assert {k: v for k, v in first.items() if k != "written"} == {
        k: v for k, v in second.items() if k != "written"
    }
    commit = json.loads(
        (tmp_path / "root" / "manifest" / "parts" / "000000.commit.json").read_text()
    )
    assert (
        commit["samples"] == 2
        and commit["bytes"] == (tmp_path / "root" / "shards" / "000000.tar").stat().st_size
    )


def test_an_input_that_makes_the_writer_raise_anything_becomes_a_reject(tmp_path):
    rows = _rows(tmp_path, ["a.flac", "b.wav", "c.wav"]).to_pylist()
    rows[1] = dict(rows[1], sample_rate=0)  # A plan row no probe would make: 0 Hz.
    RootLayout(str(tmp_path / "root")).make_dirs()
    record = write_shard(str(tmp_path / "root"), 0, rows, ShardingOptions())
    assert (record["samples"], record["rejects"]) == (2, 1)
    rejects = pq.read_table(tmp_path / "root" / "manifest" / "parts" / "000000.rejects.parquet")
    [reject] = rejects.to_pylist()
    assert (reject["key"], reject["reason"]) == ("b", "unexpected_error")
    assert "ZeroDivisionError" in reject["message"]


def _exit_after_rename_of(commit_path: str, monkeypatch) -> None:
    """The worker is told to exit (Ray stops a dead driver's tasks) just after the commit
    record is renamed into place, while its directory is fsynced."""
    real = atomic.fsync_dir

    def told_to_exit(path):
        if os.path.exists(commit_path):
            raise SystemExit("the worker was told to exit")
        real(path)

    monkeypatch.setattr(atomic, "fsync_dir", told_to_exit)


def test_a_writer_stopped_after_its_commit_leaves_the_shard_whole(tmp_path, monkeypatch):
    rows = _rows(tmp_path, ["a.flac", "b.wav"])
    layout = RootLayout(str(tmp_path / "root"))
    layout.make_dirs()
    _exit_after_rename_of(layout.commit_path(0), monkeypatch)
    with pytest.raises(SystemExit):
        write_shard(layout.root, 0, rows, ShardingOptions())
    monkeypatch.undo()
    # Committed, with its tar and manifest parts: a rerun trusts it and writes nothing.
    assert layout.read_commit(0) is not None
    assert os.path.exists(layout.utterances_part(0)) and os.path.exists(layout.rejects_part(0))
    assert not write_shard(layout.root, 0, rows, ShardingOptions())["written"]


def test_a_stage_shard_stopped_after_its_commit_keeps_its_files(tmp_path, monkeypatch):
    layout = OutputLayout(
        str(tmp_path),
        "labels",
        "x",
        data={"units": "units/{shard}.parquet"},
        rejects="rejects/{shard}.parquet",
        commit="commits/{shard}.json",
    )
    layout.make_dirs()
    out = ShardOutput(layout, "000001")
    out.write_parquet("units", pa.table({"n": [1, 2]}), None)
    _exit_after_rename_of(layout.commit_path("000001"), monkeypatch)
    with pytest.raises(SystemExit):
        out.commit(utterances=2)
    out.abort()  # As the stage's actor does on any error.
    monkeypatch.undo()
    assert layout.read_commit("000001") is not None  # Its data file is there, whole.


def test_digests_made_while_copying_equal_hashlib_over_the_files(tmp_path):
    """Pass-through members are hashed as they are copied (one read each); the digests in
    the manifest and the commit record are those of the files themselves."""
    import hashlib

    rows = _rows(tmp_path, ["a.flac", "b.flac", "c.wav"])
    layout = RootLayout(str(tmp_path / "root"))
    layout.make_dirs()
    fds = set(os.listdir("/proc/self/fd"))
    record = write_shard(layout.root, 0, rows, ShardingOptions())
    assert set(os.listdir("/proc/self/fd")) == fds  # Every input opened ahead was closed.
    tar = open(layout.shard_path(0), "rb").read()
    assert record["sha256"] == hashlib.sha256(tar).hexdigest()
    assert record["bytes"] == len(tar)
    utterances = pq.read_table(layout.utterances_part(0)).to_pylist()
    assert [u["passthrough"] for u in utterances] == [True, True, False]
    for u in utterances:
        member = tar[u["offset"] : u["offset"] + u["size"]]
        assert u["sha256"] == hashlib.sha256(member).hexdigest()
        if u["passthrough"]:
            assert member == open(u["source"], "rb").read()
    assert layout.temp_files() == []  # No temporary file of the commit is left.
