"""One shard written without Ray: commits, rejects, and the safety net for odd inputs."""

import json

import pyarrow.parquet as pq
import soundfile as sf

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
