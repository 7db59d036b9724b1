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
