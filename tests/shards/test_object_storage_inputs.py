"""Inputs on object storage: the same corpus read from s3:// (a real S3 server on loopback)
gives the same samples as read from local disk."""

from __future__ import annotations

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import soundfile as sf

import shards
from shards import synthetic
from shards.plan import ShardingOptions
from shards.ray_sharding import run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, s3_server):
    local = tmp_path_factory.mktemp("corpus")
    synthetic.write_librispeech(str(local / "ls"), speakers=1, chapters=2, utterances=2)
    synthetic.write_librilight(str(local / "ll"), speakers=1, books=1, files=1, seconds=(12, 15))
    speech, _ = synthetic.speechlike(6.0, rate=48000, seed=5)
    sf.write(local / "ll" / "x48.wav", speech, 48000)  # No sidecar: transcoded, detector VAD.
    s3 = pafs.S3FileSystem(endpoint_override=s3_server, allow_bucket_creation=True)
    s3.create_dir("corpus")
    pafs.copy_files(str(local), "corpus", destination_filesystem=s3)
    return local


def _utterances(root):
    rows = pq.read_table(f"{root}/manifest/utterances.parquet").to_pylist()
    return {r["key"]: (r["sha256"], r["num_samples"], r["passthrough"]) for r in rows}


@pytest.mark.parametrize(
    "subdir,opts",
    [("ls", ShardingOptions()), ("ll", ShardingOptions(layout="dir", segment="vad", vad="energy"))],
)
def test_s3_inputs_shard_exactly_like_the_same_files_on_disk(
    corpus, ray_after_s3, tmp_path, subdir, opts
):
    from_s3 = run([f"s3://corpus/{subdir}"], str(tmp_path / "s3"), opts)
    from_disk = run([str(corpus / subdir)], str(tmp_path / "disk"), opts)
    rejects = pq.read_table(tmp_path / "s3" / "manifest" / "rejects.parquet").to_pylist()
    assert from_s3["rejects"] == from_disk["rejects"] == 0, rejects
    assert _utterances(tmp_path / "s3") == _utterances(tmp_path / "disk")
    sources = {s.meta["source"] for s in shards.open(str(tmp_path / "s3"))}
    assert all(s.startswith(f"s3://corpus/{subdir}/") for s in sources)
