"""A root on object storage: every stage reads and writes ``s3://`` (a real S3 server on
loopback) and leaves exactly the files, byte for byte, that the same run leaves on disk;
a run cut short resumes from the commit records."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipelines import hubert
from pipelines import w2vu as w2vu_cli
from pipelines.demo.corpus import write_demo_corpus
from shards.core import atomic, storage

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "hubert-mfcc.yaml")
BUCKET = "roots"
REMOTE = f"s3://{BUCKET}/hubert"

#: Records that name their root or time their run, and the k-means checkpoint (a zip whose
#: entries carry the time they were written); everything else must be identical.
RUN_RECORDS = (".json", ".html", "checkpoint.npz")


@pytest.fixture(scope="module")
def s3(s3_server):
    fs = pafs.S3FileSystem(endpoint_override=s3_server, allow_bucket_creation=True)
    fs.create_dir(BUCKET)
    return fs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus")
    # 9 utterances: 5 shards of at most 2 (shard.max_samples), the fewest the interrupted
    # run's test needs (it breaks shard 4's commit and label shards 1 to 3).
    write_demo_corpus(str(corpus), minutes=0.75, speakers=2, seed=3)
    return corpus


def _argv(root, corpus) -> list[str]:
    return [
        "--config", CONFIG, f"root={root}", f"inputs=[{corpus}]", "shard.max_samples=2",
        "features.percent=100", "kmeans.k=12", f"report.phones={corpus / 'phones.tsv'}",
        "label.fairseq_splits={train: 75, valid: 25}",
    ]  # fmt: skip


def _remote_files(s3, prefix=f"{BUCKET}/hubert") -> dict[str, int]:
    infos = s3.get_file_info(pafs.FileSelector(prefix, recursive=True))
    return {os.path.relpath(i.path, prefix): i.size for i in infos if i.type == pafs.FileType.File}


def _local_files(root) -> dict[str, int]:
    out = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                out[os.path.relpath(path, root)] = os.path.getsize(path)
    return out


@pytest.fixture(scope="module")
def runs(s3, ray_after_s3, corpus, tmp_path_factory):
    """The whole HuBERT pipeline, once on disk and once on S3; the S3 run's output."""
    local = tmp_path_factory.mktemp("local") / "hubert"
    assert hubert.main(_argv(local, corpus)) == 0
    assert hubert.main(_argv(REMOTE, corpus)) == 0
    return local


def _assert_same_bytes(s3, local, remote_files):
    for rel in remote_files:
        if rel.endswith(RUN_RECORDS):
            continue
        if rel.endswith("iterations.parquet"):  # Timed per iteration: compare the fit.
            fit = ["iteration", "inertia", "relative_change", "empty_clusters", "imbalance"]
            remote = storage.read_parquet(f"{REMOTE}/{rel}", columns=fit)
            here = pq.read_table(local / rel, columns=fit)
            for column in fit:  # Iteration 0 has no relative change: NaN on both sides.
                same = np.array_equal(remote[column], here[column], equal_nan=True)
                assert same, (rel, column)
            continue
        with s3.open_input_stream(f"{BUCKET}/hubert/{rel}") as f:
            assert f.read() == (local / rel).read_bytes(), rel


@pytest.mark.slow
def test_every_stage_on_s3_writes_what_the_same_run_writes_on_disk(s3, runs, capsys):
    local = runs
    remote_files = _remote_files(s3)
    local_files = _local_files(local)
    fairseq = {r for r in local_files if "/fairseq/" in r}
    assert fairseq and set(remote_files) == set(local_files) - fairseq
    assert not [r for r in remote_files if ".tmp-" in r]  # Every temporary key published.
    for stage in ("shards/", "features/mfcc/shards/", "kmeans/mfcc100/", "labels/it1/units/"):
        assert any(r.startswith(stage) for r in remote_files), stage
    _assert_same_bytes(s3, local, remote_files)
    centroids = storage.load_npy(f"{REMOTE}/kmeans/mfcc100/centroids.npy")
    assert np.array_equal(centroids, np.load(local / "kmeans" / "mfcc100" / "centroids.npy"))
    # Run records may name the root, but never a local scratch file.
    meta = storage.read_text(f"{REMOTE}/labels/it1/meta.json")
    assert atomic.scratch_dir() not in meta


@pytest.mark.slow
def test_a_rerun_on_s3_skips_every_stage_and_says_why_fairseq_is_skipped(runs, corpus, capsys):
    capsys.readouterr()
    assert hubert.main(_argv(REMOTE, corpus)) == 0
    out = capsys.readouterr().out
    for stage in ("shard", "features", "kmeans", "label"):
        assert f"== {stage}: already complete" in out
    assert "== fairseq: skipped, fairseq reads local files" in out and "aws s3 sync" in out


@pytest.mark.slow
def test_an_interrupted_run_on_s3_resumes_from_its_commit_records(s3, runs, corpus, capsys):
    """What a killed run leaves on a bucket: objects without their commit record, an object
    that does not match its record, temporary keys of uploads cut short; and the final
    records (meta.json, summary.json) not yet written."""
    local = runs
    before = _remote_files(s3)
    labels, feats, shards = "roots/hubert/labels/it1", "roots/hubert/features/mfcc", "roots/hubert"
    s3.delete_file(f"{labels}/commits/000001.json")  # Uploaded, not committed.
    s3.delete_file(f"{labels}/meta.json")
    with s3.open_output_stream(f"{labels}/units/000002.parquet") as f:
        f.write(b"an attempt that died after its upload")  # Its record says other bytes.
    with s3.open_output_stream(f"{labels}/units/.000003.parquet.tmp-99-deadbeef") as f:
        f.write(b"half")
    s3.delete_file(f"{feats}/shards/000000.commit.json")
    s3.delete_file(f"{feats}/meta.json")
    s3.delete_file(f"{shards}/manifest/parts/000004.commit.json")
    s3.delete_file(f"{shards}/manifest/summary.json")
    capsys.readouterr()
    assert hubert.main(_argv(REMOTE, corpus)) == 0
    out = capsys.readouterr().out
    assert "== shard: done" in out and "== features: done" in out and "== label: done" in out
    assert "== kmeans: already complete" in out  # Same features: the committed fit stands.
    after = _remote_files(s3)
    assert set(after) == set(before)
    _assert_same_bytes(s3, local, after)
    # Only the units that were not committed were written again (the run's record says).
    summary = json.loads(storage.read_text(f"{REMOTE}/runs/hubert-it1.json"))
    assert summary["shard"]["shards_written"] == 1
    assert summary["features"]["shards_written"] == 1
    assert summary["label"]["shards_written"] == 2


@pytest.mark.slow
def test_wav2vec_u_prepares_on_s3_exactly_as_on_disk(s3, runs):
    local = runs
    args = ["--features", "mfcc", "--name", "w", "--k", "6", "--pca-dim", "8"]
    args += ["--splits", "train=70,valid=30"]
    assert w2vu_cli.main(["--root", str(local), *args]) == 0
    assert w2vu_cli.main(["--root", REMOTE, *args]) == 0
    remote = _remote_files(s3, f"{BUCKET}/hubert/w2vu/w")
    assert {"train.npy", "valid.npy", "train.lengths", "valid.tsv"} <= set(remote)
    for rel in remote:
        if rel.endswith(RUN_RECORDS + (".tsv",)):
            continue
        with s3.open_input_stream(f"{BUCKET}/hubert/w2vu/w/{rel}") as f:
            assert f.read() == (local / "w2vu" / "w" / rel).read_bytes(), rel
    # The tsv points into the shard objects themselves (a bucket has no symlinks).
    tsv = storage.read_text(f"{REMOTE}/w2vu/w/valid.tsv").splitlines()
    assert tsv[0] == f"{REMOTE}/shards"
    name, samples = tsv[1].split("\t")
    shard, offset, size = name.rsplit(":", 2)
    with storage.open_input(f"{tsv[0]}/{shard}") as f:
        f.seek(int(offset))
        flac = f.read(int(size))
    import io

    import soundfile as sf

    assert sf.info(io.BytesIO(flac)).frames == int(samples)
