"""wav2vec-U preparation end to end: the CLI's files equal the steps done one at a time."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from pipelines import w2vu as cli
from shards import synthetic
from shards.core.outputs import StageError
from shards.plan import ShardingOptions
from shards.ray_sharding import run as shard
from tests.models import save_tiny
from tests.numerics import SSL_FEATURE_BOUND, UnitAgreement, assert_units_agree
from units.features.frames import SSL
from units.labels.model import KMeansModel
from units.labels.w2vu import W2VUPrep, mean_pool, merge_runs
from units.labels.w2vu_stage import W2VUOptions, run

pytestmark = pytest.mark.usefixtures("ray_local")

SPLITS = {"train": 70, "valid": 30}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random wav2vec 2.0 "large" (layer-normalised front end) saved locally."""
    return save_tiny(tmp_path_factory.mktemp("w2v"), "wav2vec2", large=True)


@pytest.fixture(scope="module")
def root(tmp_path_factory, model_dir):
    corpus = tmp_path_factory.mktemp("corpus")
    synthetic.write_librispeech(
        str(corpus), speakers=2, chapters=1, utterances=5, seconds=(0.5, 2.0)
    )
    out = tmp_path_factory.mktemp("root")
    shard([str(corpus)], str(out), ShardingOptions(max_samples=4))
    argv = ["--root", str(out), "--name", "w", "--extractor", f"hf:{model_dir}", "--layer", "2"]
    argv += ["--k", "4", "--pca-dim", "8", "--splits", "train=70,valid=30"]
    assert cli.main(argv) == 0
    return out


def _check_throughput(rate, root, out, shards):
    """The run's accounting against the manifest and the files on disk: the audio of the
    shards it prepared (``None``: all), read once; their files and the splits written."""
    manifest = pq.read_table(root / "manifest" / "utterances.parquet").to_pylist()
    read = [r for r in manifest if shards is None or r["shard"] in shards]
    assert rate["hours_prepared"] == pytest.approx(sum(r["duration"] for r in read) / 3600)
    assert rate["bytes_read"] == sum(r["size"] for r in read)
    names = {r["shard"] for r in read}
    files = [out / sub / f"{s}.{ext}" for s in names for sub, ext in _SHARD_FILES]
    files += [out / f"{split}.{ext}" for split in SPLITS for ext in ("npy", "lengths", "tsv")]
    assert rate["bytes_written"] == sum(f.stat().st_size for f in files)
    assert rate["workers"] == min(2, len(names))  # ray_local has 2 CPUs.
    assert rate["audio_hours_per_second"] == pytest.approx(
        rate["hours_prepared"] / rate["wall_seconds"]
    )
    assert rate["audio_hours_per_second_per_worker"] * rate["workers"] == pytest.approx(
        rate["audio_hours_per_second"]
    )


#: Every file a shard commits, its commit record included.
_SHARD_FILES = (
    ("features", "npy"), ("rows", "parquet"), ("rejects", "parquet"), ("commits", "json")
)  # fmt: skip


def _read_split(directory, split):
    lengths = [int(n) for n in (directory / f"{split}.lengths").read_text().split()]
    tsv = (directory / f"{split}.tsv").read_text().splitlines()
    return np.load(directory / f"{split}.npy"), lengths, tsv[0], tsv[1:]


def test_the_split_files_equal_the_steps_done_one_at_a_time(root, model_dir):
    from units.features.ssl import SSLExtractor, load_hf

    out = root / "w2vu" / "w"
    meta = (out / "meta.json").read_text()
    assert '"features": "w-layer2"' in meta and '"kmeans": "w-cls4"' in meta
    _check_throughput(json.loads(meta)["throughput"], root, out, None)
    kmeans = KMeansModel.load(str(root), "w-cls4")
    assert kmeans.pca_mean is None  # Clusters on the layer features, before the PCA.
    assert kmeans.spec.layer == 2 and kmeans.spec.normalize_waveform
    prep = W2VUPrep.load(str(out / "pca"), 8)
    extractor = SSLExtractor(load_hf(model_dir), 2)
    manifest = pq.read_table(root / "manifest" / "utterances.parquet").to_pylist()
    by_member = {(r["shard"], r["offset"]): r for r in manifest}
    stored = {r["key"]: r["clusters"] for r in pq.read_table(out / "rows").to_pylist()}
    seen = []
    agreement = UnitAgreement()
    for split in SPLITS:
        feats, lengths, audio, lines = _read_split(out, split)
        assert feats.dtype == np.float32 and feats.shape == (sum(lengths), 8)
        assert len(lines) == len(lengths)
        at = 0
        for line, n in zip(lines, lengths, strict=True):
            name, samples = line.split("\t")
            path, offset, size = f"{audio}/{name}".rsplit(":", 2)
            row = by_member[(name.split(".zip")[0], int(offset))]
            with open(path, "rb") as f:  # The tsv reads back as the utterance's audio.
                f.seek(int(offset))
                wav, _ = sf.read(io.BytesIO(f.read(int(size))), dtype="float32")
            assert len(wav) == int(samples) == row["num_samples"]
            layer = extractor([wav])[0]
            assert len(layer) == SSL.frames(len(wav))
            ids = np.asarray(stored[row["key"]])
            agreement.add(assert_units_agree(ids, layer, kmeans, SSL_FEATURE_BOUND, name))
            want = mean_pool(merge_runs(layer @ prep.pca_a + prep.pca_b, ids), 0.5)
            assert n == len(want) == -(-len(merge_runs(layer, ids)) // 2)
            np.testing.assert_allclose(feats[at : at + n], want, rtol=1e-4, atol=1e-4)
            at += n
            seen.append(row["key"])
    assert sorted(seen) == sorted(r["key"] for r in manifest)
    agreement.check()


def test_a_rerun_does_nothing_and_a_resumed_run_writes_the_same_bytes(root, tmp_path):
    assert (
        cli.main(
            [
                "--root",
                str(root),
                "--name",
                "w",
                "--features",
                "w-layer2",
                "--k",
                "4",
                "--pca-dim",
                "8",
                "--splits",
                "train=70,valid=30",
            ]
        )
        == 0
    )
    out = root / "w2vu" / "w"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    # As if killed in the pass: one shard uncommitted, the split files not yet written.
    commit = sorted((out / "commits").iterdir())[0]
    commit.unlink()
    for split in SPLITS:
        (out / f"{split}.npy").unlink()
    (out / "meta.json").unlink()
    options = W2VUOptions(k=4, pca_dim=8)
    meta = run(str(root), "w-layer2", "w", SPLITS, options=options)
    assert meta["shards_written"] == 1
    _check_throughput(meta["throughput"], root, out, {commit.stem})
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after.keys() == before.keys()
    for name in before:
        if name != "meta.json":
            assert after[name] == before[name], name


def test_splits_by_speaker_and_remove_extra(root):
    options = W2VUOptions(k=4, pca_dim=8, remove_extra=True)
    meta = run(str(root), "w-layer2", "spk", SPLITS, by="speaker", options=options)
    manifest = pq.read_table(root / "manifest" / "utterances.parquet").to_pylist()
    speaker = {(r["shard"], r["offset"]): r["speaker"] for r in manifest}
    out = root / "w2vu" / "spk"
    groups = []
    for split in SPLITS:
        _, lengths, _, lines = _read_split(out, split)
        members = [line.split("\t")[0].split(".zip:") for line in lines]
        groups.append({speaker[(s, int(o.split(":")[0]))] for s, o in members})
        assert sum(lengths) == meta["splits_written"][split]["frames"]
    assert not groups[0] & groups[1]
    # remove_extra: frames // 2 outputs where fairseq pads to ceil(frames / 2).
    padded = (
        _read_split(root / "w2vu" / "w", "train")[1] + _read_split(root / "w2vu" / "w", "valid")[1]
    )
    cut = _read_split(out, "train")[1] + _read_split(out, "valid")[1]
    assert sum(cut) < sum(padded)


def test_bad_requests_are_clear_errors_that_write_nothing(root):
    with pytest.raises(StageError, match="between 1 and the feature dimension 32"):
        run(str(root), "w-layer2", "bad", SPLITS, options=W2VUOptions(k=4, pca_dim=64))
    with pytest.raises(StageError, match="no finished feature store .nope."):
        run(str(root), "nope", "bad", SPLITS, options=W2VUOptions(k=4, pca_dim=8))
    with pytest.raises(StageError, match="would be empty"):
        run(
            str(root),
            "w-layer2",
            "bad",
            {"a": 99.99, "b": 0.01},
            options=W2VUOptions(k=4, pca_dim=8),
        )
    with pytest.raises(StageError, match="rate 0.5 only"):
        run(str(root), "w-layer2", "bad", SPLITS, options=W2VUOptions(4, 8, 0.25, True))
    assert not (root / "w2vu" / "bad").exists()
    with pytest.raises(StageError, match="other settings"):
        run(str(root), "w-layer2", "w", SPLITS, options=W2VUOptions(k=4, pca_dim=6))


def _exit_status(argv) -> int:
    """The status ``python -m pipelines.w2vu ARGV`` exits with (argparse exits by itself)."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


def test_cli_usage_errors_exit_2_before_ray(tmp_path, capsys):
    argv = ["--root", str(tmp_path), "--name", "x", "--features", "f"]
    assert _exit_status([*argv, "--splits", "train"]) == 2
    assert "is not NAME=PERCENT" in capsys.readouterr().err
    assert _exit_status([*argv, "--subsample", "0"]) == 2
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    assert "python -m pipelines.w2vu --root" in capsys.readouterr().out
