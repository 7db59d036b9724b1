"""The BEST-RQ stage: a quantizer from a sample's statistics, then every utterance labelled."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

import shards
from shards import synthetic
from shards.core.outputs import StageError
from shards.plan import ShardingOptions
from shards.ray_sharding import run as shard
from tests.fairseq_checks import fairseq_label_checks
from units.bestrq.quantizer import (
    QuantizerConfig,
    RandomProjectionQuantizer,
    Statistics,
    stack_frames,
)
from units.bestrq.stage import run as bestrq
from units.features.extractors import ExtractorOptions
from units.features.kaldi import KaldiFbank
from units.features.sampling import SampleRequest
from units.features.stage import run as extract
from units.features.store import FeatureStore
from units.labels import fairseq as fairseq_export

pytestmark = pytest.mark.usefixtures("ray_local")

#: Two codebooks of 512: the multi-codebook columns and exports are exercised, quickly.
CONFIG = QuantizerConfig(codebook_size=512, codebooks=2, seed=5)


@pytest.fixture(scope="module")
def root(tmp_path_factory, ray_local):
    corpus = tmp_path_factory.mktemp("corpus")
    synthetic.write_librispeech(
        str(corpus), speakers=2, chapters=1, utterances=5, seconds=(0.3, 2.0)
    )
    out = tmp_path_factory.mktemp("root")
    shard([str(corpus)], str(out), ShardingOptions(max_samples=4))
    return out


@pytest.fixture(scope="module")
def labelled(root):
    """Quantizer and label set ``rq``, made once for the module."""
    return bestrq(str(root), "rq", config=CONFIG, sample=SampleRequest(percent=60, seed=5))


def test_every_utterance_gets_the_codes_of_its_fbank_frames_at_25hz(root, labelled):
    manifest = pq.read_table(root / "manifest" / "utterances.parquet").to_pylist()
    assert labelled["utterances"] == len(manifest) == 10 and labelled["rejects"] == 0
    assert labelled["frame_rate"] == 25.0 and labelled["k"] == 512
    assert labelled["target"] == "bestrq" and labelled["codebooks"] == 2
    table = ds.dataset(str(root / "labels" / "rq" / "units"), format="parquet").to_table()
    labels = {r["key"]: r for r in table.to_pylist()}
    assert set(labels) == {u["key"] for u in manifest} and len(labels) == table.num_rows
    quantizer = RandomProjectionQuantizer.load(str(root / "bestrq" / "rq"), "rq")
    index, fbank = shards.Index(str(root)), KaldiFbank()
    agree = total = 0
    for row in manifest:
        got = labels[row["key"]]
        # The stacked contract: floor((N - 880) / 640) + 1 labels, 0 below 880 samples.
        n = row["num_samples"]
        assert got["frames"] == len(got["units"]) == len(got["units_1"])
        assert got["frames"] == (0 if n < 880 else (n - 880) // 640 + 1)
        codes = quantizer.codes(fbank([index.get(row["key"]).waveform])[0])
        # Alone here, batched with its shard in the worker: float32 rounding may move a
        # near tie, so agreement, not identity (DESIGN.md, invariant 3).
        agree += int((codes[:, 0] == got["units"]).sum() + (codes[:, 1] == got["units_1"]).sum())
        total += 2 * len(codes)
    assert total > 0 and agree / total >= 0.99
    assert (
        any(labels[k]["frames"] == 0 for k in labels)
        or min(u["num_samples"] for u in manifest) >= 880
    )  # A short utterance, if any, has no labels and is not a reject.


def test_the_quantizer_records_statistics_of_its_sample_and_its_lineage(root, labelled):
    meta = json.loads((root / "bestrq" / "rq" / "quantizer.json").read_text())
    config = {"stack": 4, "dim": 16, "codebook_size": 512, "codebooks": 2, "seed": 5}
    assert meta["config"] == config
    assert (meta["window"], meta["hop"], meta["frame_rate"]) == (880, 640, 25.0)
    assert meta["lineage"]["features"] == "bestrq-rq"
    assert meta["lineage"]["sample"] == {"percent": 60.0, "hours": None, "seed": 5}
    assert labelled["quantizer"]["fingerprint"] == labelled["bestrq_fingerprint"]
    # The statistics are those of the store's stacked frames, summed in float64.
    store, stats = FeatureStore(str(root), "bestrq-rq"), Statistics(320)
    for _, feats in store:
        stats.update(stack_frames(feats, 4))
    mean, std = stats.mean_std()
    quantizer = RandomProjectionQuantizer.load(str(root / "bestrq" / "rq"), "rq")
    assert meta["lineage"]["frames"] == stats.count > 0
    assert np.allclose(quantizer.mean, mean, rtol=1e-6) and np.allclose(quantizer.std, std)


def test_a_rerun_does_nothing_and_a_lost_quantizer_and_shards_come_back_the_same(root, labelled):
    again = bestrq(str(root), "rq", config=CONFIG, sample=SampleRequest(percent=60, seed=5))
    assert again["shards_written"] == 0
    reference = {p.name: p.read_bytes() for p in (root / "labels" / "rq" / "units").iterdir()}
    shutil.copytree(root / "bestrq" / "rq", root / "bestrq" / "cut")
    shutil.copytree(root / "labels" / "rq", root / "labels" / "cut")
    cut, labels = root / "bestrq" / "cut", root / "labels" / "cut"
    # Killed after the plan and the store but before quantizer.json; label shards lost.
    for name in ("quantizer.json", "codebooks.npy"):
        (cut / name).unlink()
    first, second = sorted(reference)[:2]
    (labels / "commits" / first.replace(".parquet", ".json")).unlink()
    (labels / "units" / second).unlink()
    (labels / "meta.json").unlink()
    # The copies stand for a run named "cut" from the start: their plans say so.
    shutil.copytree(root / "features" / "bestrq-rq", root / "features" / "bestrq-cut")
    for plan, key, value in ((cut, "features", "bestrq-cut"), (labels, "bestrq", "cut")):
        saved = json.loads((plan / "plan.json").read_text())
        saved[key] = value
        (plan / "plan.json").write_text(json.dumps(saved, indent=1, sort_keys=True))
    resumed = bestrq(str(root), "cut", config=CONFIG, sample=SampleRequest(percent=60, seed=5))
    assert resumed["shards_written"] == 2
    assert resumed["bestrq_fingerprint"] == labelled["bestrq_fingerprint"]
    assert {p.name: p.read_bytes() for p in (labels / "units").iterdir()} == reference


def test_the_fairseq_export_passes_fairseqs_label_checks_for_every_codebook(root, labelled):
    record = fairseq_export.export(str(root), "rq", {"train": 70, "valid": 30}, seed=1)
    assert record["label_rate"] == 25.0 and record["label_files"] == ["km", "km1"]
    assert record["target"] == "bestrq" and record["bestrq"] == "rq"
    out = root / "labels" / "rq" / "fairseq"
    total = 0
    for split in record["splits"]:
        for ext in record["label_files"]:
            count = fairseq_label_checks(
                out / f"{split}.tsv", out / f"{split}.{ext}", out / f"dict.{ext}.txt", 25.0
            )
        total += count
    assert total == 10
    assert len((out / "dict.km1.txt").read_text().splitlines()) == 512


def test_other_options_under_the_same_name_and_a_store_of_other_features_are_refused(
    root, labelled
):
    with pytest.raises(StageError, match="was started with other options"):
        bestrq(str(root), "rq", config=QuantizerConfig(seed=6))
    extract(str(root), "mfcc", ExtractorOptions("mfcc"), SampleRequest(percent=20, seed=0))
    with pytest.raises(StageError, match="holds mfcc features"):
        bestrq(str(root), "from-mfcc", features="mfcc")
    with pytest.raises(StageError, match="codebook_size=70000"):
        bestrq(str(root), "big", config=QuantizerConfig(codebook_size=70000))
    assert not (root / "bestrq" / "big").exists()


def test_a_quantizer_and_a_kmeans_of_the_same_fbank_label_in_one_pass(root, labelled):
    """``label --kmeans fb8 bestrq:rq``: one filterbank computation per batch for both, and
    each label set the bytes a pass of its own writes."""
    from units.kmeans.estimator import KMeans
    from units.kmeans.stage import run as fit_kmeans
    from units.labels.stage import run as label
    from units.labels.stage import run_many

    # A k-means of the quantizer's own sample of filterbank features: a store of fbank's spec.
    fit_kmeans(str(root), "bestrq-rq", "fb8", KMeans(8, seed=0, block_rows=512))
    label(str(root), "fb8", "alone-fb8")
    both = run_many(str(root), ["fb8", "bestrq:rq"], ["both-fb8", "both-rq"])
    assert both[1]["bestrq"] == "rq" and both[1]["frame_rate"] == 25.0
    for alone, together in (("alone-fb8", "both-fb8"), ("rq", "both-rq")):
        a, b = (root / "labels" / n / "units" for n in (alone, together))
        files = sorted(p.name for p in a.iterdir())
        assert files and sorted(p.name for p in b.iterdir()) == files
        for f in files:
            assert (a / f).read_bytes() == (b / f).read_bytes(), (together, f)
