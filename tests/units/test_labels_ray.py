"""The streaming label pass: every utterance gets the units of its exact features."""

from __future__ import annotations

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

import shards
from shards import synthetic
from shards.plan import ShardingOptions
from shards.ray_sharding import run as shard
from units import fairseq_export
from units.extractors import ExtractorOptions
from units.features_ray import run as extract
from units.frames import MFCC
from units.kaldi_features import KaldiMFCC
from units.kmeans import KMeans
from units.kmeans_ray import StageOptions
from units.kmeans_ray import run as fit_kmeans
from units.labels import KMeansModel, LabelError
from units.labels_ray import run as label
from units.sampling import SampleRequest

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def root(tmp_path_factory, ray_local):
    corpus = tmp_path_factory.mktemp("corpus")
    synthetic.write_librispeech(
        str(corpus), speakers=2, chapters=1, utterances=5, seconds=(0.5, 2.0)
    )
    out = tmp_path_factory.mktemp("root")
    shard([str(corpus)], str(out), ShardingOptions(max_samples=4))
    extract(str(out), "mfcc", ExtractorOptions("mfcc"), SampleRequest(percent=50, seed=0))
    fit_kmeans(str(out), "mfcc", "km8", KMeans(8, seed=0, block_rows=512), StageOptions())
    fit_kmeans(str(out), "mfcc", "km8pca", KMeans(8, seed=0, block_rows=512), StageOptions(pca=5))
    return out


@pytest.mark.parametrize("kmeans", ["km8", "km8pca"])
def test_every_utterance_gets_the_units_of_its_exact_features(root, kmeans):
    meta = label(str(root), kmeans, kmeans)
    manifest = pq.read_table(root / "manifest" / "utterances.parquet").to_pylist()
    assert meta["utterances"] == len(manifest) == 10 and meta["rejects"] == 0
    assert meta["kmeans"] == kmeans and meta["spec"]["extractor"] == "mfcc"
    table = ds.dataset(str(root / "labels" / kmeans / "units"), format="parquet").to_table()
    labels = {r["key"]: r for r in table.to_pylist()}
    assert len(labels) == table.num_rows  # Once each.
    assert set(labels) == {u["key"] for u in manifest}
    model = KMeansModel.load(str(root), kmeans)
    index, mfcc = shards.Index(str(root)), KaldiMFCC()
    for row in manifest:
        got = labels[row["key"]]
        assert got["frames"] == len(got["units"]) == MFCC.frames(row["num_samples"])
        assert got["frame_rate"] == 100.0
        feats = mfcc([index.get(row["key"]).waveform])[0]
        np.testing.assert_array_equal(got["units"], model.units(feats))
    again = label(str(root), kmeans, kmeans)
    assert again["shards_written"] == 0


def test_a_missing_kmeans_or_another_kmeans_under_the_same_name_is_refused(root):
    with pytest.raises(LabelError, match="no finished k-means 'nope'"):
        label(str(root), "nope", "x")
    label(str(root), "km8", "taken")
    with pytest.raises(LabelError, match="another k-means"):
        label(str(root), "km8pca", "taken")


def _fairseq_parse_path(path):
    """fairseq.data.audio.audio_utils.parse_path for a ``FILE:OFFSET:LENGTH`` path."""
    _path, *slice_ptr = path.split(":")
    return _path, [int(i) for i in slice_ptr]


def test_fairseq_export_lines_read_back_as_their_audio_with_aligned_units(root):
    import io

    import soundfile as sf

    label(str(root), "km8", "fs")
    record = fairseq_export.export(str(root), "fs", {"train": 70, "valid": 30}, seed=1)
    out = root / "labels" / "fs" / "fairseq"
    assert record["label_rate"] == 100.0 and record["k"] == 8
    assert sum(record["splits"].values()) == 10
    assert (out / "dict.km.txt").read_text().splitlines() == [f"{i} 1" for i in range(8)]
    index = shards.Index(str(root))
    labels = {
        r["key"]: r["units"]
        for r in ds.dataset(str(root / "labels" / "fs" / "units")).to_table().to_pylist()
    }
    manifest = pq.read_table(root / "manifest" / "utterances.parquet").to_pylist()
    by_member = {(r["shard"], r["offset"]): r["key"] for r in manifest}
    seen = []
    for split in ("train", "valid"):
        tsv = (out / f"{split}.tsv").read_text().splitlines()
        km = (out / f"{split}.km").read_text().splitlines()
        audio_root, lines = tsv[0], tsv[1:]
        assert len(lines) == len(km) == record["splits"][split]
        for line, units in zip(lines, km, strict=True):
            name, frames = line.split("\t")
            path, (offset, length) = _fairseq_parse_path(f"{audio_root}/{name}")
            assert path.endswith(".zip")  # HubertDataset.get_audio asserts it.
            with open(path, "rb") as f:  # read_from_stored_zip
                f.seek(offset)
                wav, rate = sf.read(io.BytesIO(f.read(length)), dtype="float32")
            key = by_member[(name.split(".zip")[0], offset)]
            assert rate == 16000 and len(wav) == int(frames)
            np.testing.assert_array_equal(wav, index.get(key).waveform)
            assert [int(u) for u in units.split()] == list(labels[key])
            seen.append(key)
    assert sorted(seen) == sorted(labels)  # Every labelled utterance once, in one split.


def test_splits_are_seeded_and_never_empty():
    rows = [{"key": f"k{i}", "speaker": f"s{i % 3}"} for i in range(30)]
    a = fairseq_export.assign_splits(rows, {"a": 50, "b": 50}, "utterance", 0)
    assert a == fairseq_export.assign_splits(list(rows), {"a": 50, "b": 50}, "utterance", 0)
    by_speaker = fairseq_export.assign_splits(rows, {"a": 60, "b": 40}, "speaker", 3)
    speakers = [{r["speaker"] for r in members} for members in by_speaker.values()]
    assert not speakers[0] & speakers[1]  # A speaker lands in one split only.
    with pytest.raises(LabelError, match="would be empty"):
        fairseq_export.assign_splits(rows[:2], {"a": 99.9, "b": 0.1}, "utterance", 0)
    with pytest.raises(LabelError, match="add up to 100"):
        fairseq_export.assign_splits(rows, {"a": 50}, "utterance", 0)


def test_a_member_that_fails_to_decode_is_a_reject_and_the_pass_goes_on(root, tmp_path):
    import shutil

    copy = tmp_path / "root"
    for sub in ("manifest", "shards", "kmeans"):
        shutil.copytree(root / sub, copy / sub)
    victim = pq.read_table(copy / "manifest" / "utterances.parquet").to_pylist()[3]
    tar = copy / "shards" / f"{victim['shard']}.tar"
    data = bytearray(tar.read_bytes())
    data[victim["offset"] : victim["offset"] + victim["size"]] = bytes(victim["size"])
    tar.write_bytes(bytes(data))
    meta = label(str(copy), "km8", "bad")
    assert meta["rejects"] == 1 and meta["utterances"] == 9
    rejects = ds.dataset(str(copy / "labels" / "bad" / "rejects")).to_table().to_pylist()
    assert [(r["key"], r["reason"]) for r in rejects] == [(victim["key"], "corrupt_audio")]
    labelled = ds.dataset(str(copy / "labels" / "bad" / "units")).to_table(columns=["key"])
    assert victim["key"] not in labelled.column("key").to_pylist()
