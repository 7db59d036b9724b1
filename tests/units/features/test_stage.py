"""The feature stage end to end on in-process Ray: sample, extract, store, resume."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

import shards
from shards import synthetic
from shards.core.outputs import StageError
from shards.plan import ShardingOptions
from shards.ray_sharding import run as shard
from tests.models import save_tiny
from tests.numerics import SSL_FEATURE_BOUND, assert_within, float16_bound, kaldi_bound
from units.features.extractors import ExtractorOptions
from units.features.frames import MFCC, SSL
from units.features.kaldi import KaldiMFCC
from units.features.sampling import SampleRequest
from units.features.stage import run as extract
from units.features.store import FeatureStore

pytestmark = pytest.mark.usefixtures("ray_local")

MFCC_OPTS = ExtractorOptions("mfcc")


@pytest.fixture(scope="module")
def root(tmp_path_factory, ray_local):
    corpus = tmp_path_factory.mktemp("corpus")
    synthetic.write_librispeech(
        str(corpus), speakers=2, chapters=2, utterances=4, seconds=(0.5, 2.5)
    )
    out = tmp_path_factory.mktemp("root")
    shard([str(corpus)], str(out), ShardingOptions(max_samples=4))
    return out


def _files(directory):
    return sorted(os.listdir(directory))


def test_mfcc_store_holds_the_sample_with_exact_frame_counts(root):
    meta = extract(str(root), "mfcc50", MFCC_OPTS, SampleRequest(percent=50, seed=1))
    assert meta["spec"]["extractor"] == "mfcc" and meta["spec"]["dim"] == 39
    assert meta["sample"]["utterances"] == 8 and meta["utterances"] == 8
    store = FeatureStore(str(root), "mfcc50")
    index = shards.Index(str(root))
    mfcc = KaldiMFCC()
    manifest = pq.read_table(root / "manifest" / "utterances.parquet").to_pylist()
    manifest_order = [u["key"] for u in manifest]
    keys = [k for k, _ in store]
    assert keys == [k for k in manifest_order if k in set(keys)]  # Shard order, manifest order.
    for key, feats in store:
        wav = index.get(key).waveform
        assert feats.shape == (MFCC.frames(len(wav)), 39) and feats.dtype == np.float16
        # The worker batched this utterance with its shard's others, in another process with
        # another thread count: float32 values within the computation's rounding bound, then
        # rounded to float16, which may land one float16 ulp away (seen: 3 of 9,165 values on
        # an AMD CPU). The bound is derived in tests/numerics.py.
        alone = mfcc([wav])[0]
        assert_within(feats, alone, float16_bound(alone, kaldi_bound(wav, mfcc=True)), key)
    speakers = {k.split("-")[0] for k in keys}
    assert len(speakers) == 2  # Stratified: both speakers are in the sample.
    # This run's throughput: the sample's hours and FLAC bytes, and every shard file it
    # committed (arrays, indexes, rejects, commit records).
    sampled = [u for u in manifest if u["key"] in set(keys)]
    speed = meta["throughput"]
    assert speed["hours_extracted"] == pytest.approx(sum(u["duration"] for u in sampled) / 3600)
    assert speed["bytes_read"] == sum(u["size"] for u in sampled)
    shard_files = _files(store.layout.path("shards"))
    assert {f.split(".", 1)[1] for f in shard_files} == {
        "npy", "index.parquet", "rejects.parquet", "commit.json"
    }  # fmt: skip
    sizes = [os.path.getsize(os.path.join(store.layout.path("shards"), f)) for f in shard_files]
    assert speed["bytes_written"] == sum(sizes) and speed["workers"] == 2
    per_worker = speed["audio_hours_per_second"] / speed["workers"]
    assert speed["audio_hours_per_second_per_worker"] == pytest.approx(per_worker)


def test_a_rerun_does_nothing_and_a_lost_shard_is_rewritten_identically(root):
    extract(str(root), "resume", MFCC_OPTS, SampleRequest(percent=75, seed=2))
    shards_dir = root / "features" / "resume" / "shards"
    before = {f: (shards_dir / f).read_bytes() for f in _files(shards_dir)}
    again = extract(str(root), "resume", MFCC_OPTS, SampleRequest(percent=75, seed=2))
    assert again["shards_written"] == 0
    lost = sorted(f for f in before if f.endswith(".npy"))[1]
    (shards_dir / lost).unlink()
    (shards_dir / lost.replace(".npy", ".commit.json")).unlink()
    third = extract(str(root), "resume", MFCC_OPTS, SampleRequest(percent=75, seed=2))
    assert third["shards_written"] == 1
    assert {f: (shards_dir / f).read_bytes() for f in _files(shards_dir)} == before


def test_two_runs_write_byte_identical_stores(root):
    for name in ("twin_a", "twin_b"):
        extract(str(root), name, MFCC_OPTS, SampleRequest(hours=0.002, seed=5))
    a, b = (root / "features" / n / "shards" for n in ("twin_a", "twin_b"))
    assert _files(a) == _files(b)
    for f in _files(a):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_a_tiny_hubert_from_a_local_directory_gives_its_layer(root, tmp_path):
    from units.features.ssl import SSLExtractor, load_hf

    save_tiny(tmp_path / "hubert")
    options = ExtractorOptions(f"hf:{tmp_path / 'hubert'}", layer=2)
    meta = extract(str(root), "hubert2", options, SampleRequest(percent=25, seed=0))
    assert (meta["spec"]["dim"], meta["spec"]["layer"], meta["spec"]["hop"]) == (32, 2, 320)
    assert meta["spec"]["checkpoint_sha256"]
    direct = SSLExtractor(load_hf(tmp_path / "hubert"), 2)
    index = shards.Index(str(root))
    for key, feats in FeatureStore(str(root), "hubert2"):
        wav = index.get(key).waveform
        assert len(feats) == SSL.frames(len(wav))
        alone = direct([wav])[0]  # Float32 rounding, then float16's half ulp.
        assert_within(feats, alone, float16_bound(alone, SSL_FEATURE_BOUND), key)


def test_the_driver_plans_with_the_described_spec_and_builds_no_extractor(
    root, tmp_path, monkeypatch
):
    from units.features import extractors

    directory = save_tiny(tmp_path / "hubert")
    options = ExtractorOptions(f"hf:{directory}", layer=3)
    spec = extractors.describe(options)

    def refuse(options):
        raise AssertionError("the driver built an extractor")

    # The workers are other processes: only the driver's build is refused.
    monkeypatch.setattr(extractors, "build", refuse)
    meta = extract(str(root), "hubert3", options, SampleRequest(percent=25, seed=0))
    assert meta["spec"] == spec.to_json() and meta["rows"] > 0
    plan = json.loads((root / "features" / "hubert3" / "plan.json").read_text())
    assert plan["spec"] == spec.to_json()


def test_a_worker_whose_extractor_is_not_the_planned_one_writes_nothing():
    from units.features.extractor import FBANK_SPEC, MFCC_SPEC
    from units.features.stage import FeatureWorker

    assert FeatureWorker(MFCC_OPTS, MFCC_SPEC, device="cpu").extractor.spec == MFCC_SPEC
    with pytest.raises(StageError, match="not the planned"):
        FeatureWorker(MFCC_OPTS, FBANK_SPEC, device="cpu")


def test_a_corrupt_audio_member_becomes_a_reject_and_the_stage_goes_on(root, tmp_path):
    import shutil

    copy = tmp_path / "root"
    shutil.copytree(root / "manifest", copy / "manifest")
    shutil.copytree(root / "shards", copy / "shards")
    victim = pq.read_table(copy / "manifest" / "utterances.parquet").to_pylist()[0]
    tar = copy / "shards" / f"{victim['shard']}.tar"
    data = bytearray(tar.read_bytes())
    data[victim["offset"] : victim["offset"] + victim["size"]] = bytes(victim["size"])
    tar.write_bytes(bytes(data))
    meta = extract(str(copy), "all", MFCC_OPTS, SampleRequest(percent=100))
    assert meta["rejects"] == 1 and meta["utterances"] == 15
    rejects = pq.read_table(copy / "features" / "all" / "rejects.parquet").to_pylist()
    assert [(r["key"], r["reason"]) for r in rejects] == [(victim["key"], "corrupt_audio")]


@pytest.mark.parametrize(
    "options,request_,message",
    [
        (ExtractorOptions("spectrogram"), SampleRequest(percent=10), "unknown extractor"),
        (ExtractorOptions("mfcc", layer=6), SampleRequest(percent=10), "--layer applies"),
        (
            ExtractorOptions("hf:/no/such/model", layer=6),
            SampleRequest(percent=10),
            "/no/such/model",
        ),
        (ExtractorOptions("hf:/no/such/model"), SampleRequest(percent=10), "give --layer"),
        (MFCC_OPTS, SampleRequest(hours=100), "more than the corpus holds"),
        (ExtractorOptions("mfcc", dtype="bf16"), SampleRequest(percent=10), "CUDA only"),
    ],
)
def test_bad_requests_fail_before_any_work(root, options, request_, message):
    with pytest.raises(StageError, match=message):
        extract(str(root), "bad", options, request_)
    assert not os.path.exists(root / "features" / "bad" / "shards")


def test_a_root_without_manifests_says_to_shard_first(tmp_path):
    with pytest.raises(StageError, match="pipelines.shard"):
        extract(str(tmp_path), "x", MFCC_OPTS, SampleRequest(percent=10))


def test_a_store_started_with_other_options_is_refused(root):
    extract(str(root), "fixed", MFCC_OPTS, SampleRequest(percent=25, seed=1))
    with pytest.raises(StageError, match="another extractor or sample"):
        extract(str(root), "fixed", MFCC_OPTS, SampleRequest(percent=25, seed=2))
    assert (
        json.loads((root / "features" / "fixed" / "plan.json").read_text())["request"]["seed"] == 1
    )
