"""The k-means stage on a feature store: its outputs, its PCA, its errors, a finished run kept,
and whether its workers hold their rows or stream them."""

from __future__ import annotations

import json
import logging
import os

import joblib
import numpy as np
import pyarrow.parquet as pq
import pytest
import ray

from shards.core.outputs import StageError
from tests.numerics import clear_frames
from tests.stores import K, write_store
from units.features.extractor import MFCC_SPEC
from units.features.store import FeatureStore
from units.kmeans import stage
from units.kmeans.estimator import KMeans
from units.kmeans.pca import PCA
from units.kmeans.stage import StageOptions, run, worker_memory

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    rows = write_store(root, "mfcc")
    return root, rows


def test_stage_writes_centroids_stats_and_a_fairseq_export(root):
    root, rows = root
    km = KMeans(K, seed=0, max_iter=20, block_rows=256)
    meta = run(str(root), "mfcc", "km12", km, StageOptions(fairseq_export=True, workers=2))
    out = root / "kmeans" / "km12"
    assert meta["written"] and meta["k"] == K and meta["rows"] == len(rows)
    centroids = np.load(out / "centroids.npy")
    assert centroids.dtype == np.float32 and centroids.shape == (K, 39)
    saved = json.loads((out / "kmeans.json").read_text())
    assert saved["spec"] == MFCC_SPEC.to_json() and saved["seed"] == 0
    assert saved["inertia"] == km.inertia_ and saved["iterations"] == km.n_iter_
    assert saved["features_fingerprint"] and saved["fingerprint"]
    # A 2,000-frame store fits any worker: auto holds, and says with what numbers.
    decision = saved["rows_decision"]
    assert decision == meta["rows_decision"]
    assert decision["rows"] == "hold" and decision["requested"] == "auto" and decision["fits"]
    assert decision["frames"] == len(rows) and decision["dim"] == 39 and decision["workers"] == 2
    assert decision["hold_bytes"] == len(rows) * (4 * 39 + 12)
    assert 0 < decision["hold_bytes_per_worker"] < decision["budget"]
    iterations = pq.read_table(out / "iterations.parquet").to_pylist()
    assert [r["iteration"] for r in iterations] == list(range(km.n_iter_ + 1))
    assert {"inertia", "seconds", "empty_clusters", "imbalance"} <= set(iterations[0])
    inertias = [r["inertia"] for r in iterations]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(inertias, inertias[1:], strict=False))
    # This run's accounting: the audio the store's frames cover, its feature files read,
    # every output file but kmeans.json written.
    rate = saved["throughput"]
    assert meta["throughput"] == rate
    frames = sum(FeatureStore(str(root), "mfcc").index.column("frames").to_pylist())
    assert frames == len(rows)
    assert rate["hours_clustered"] == pytest.approx(frames / saved["spec"]["frame_rate"] / 3600)
    store_files = (root / "features" / "mfcc" / "shards").glob("*.npy")
    assert rate["bytes_read"] == sum(p.stat().st_size for p in store_files)
    written = [p for p in out.rglob("*") if p.is_file() and p.name != "kmeans.json"]
    assert {p.name for p in written} >= {"centroids.npy", "kmeans.joblib", "checkpoint.npz"}
    assert rate["bytes_written"] == sum(p.stat().st_size for p in written)
    assert rate["workers"] == 2 and rate["wall_seconds"] == saved["wall_seconds"]
    assert rate["audio_hours_per_second"] == pytest.approx(
        rate["hours_clustered"] / rate["wall_seconds"]
    )
    assert rate["audio_hours_per_second_per_worker"] * 2 == pytest.approx(
        rate["audio_hours_per_second"]
    )
    # What fairseq's dump_km_label.py does with the file (ApplyKmeans, numpy path).
    model = joblib.load(out / "kmeans.joblib")
    c_np = model.cluster_centers_.transpose()
    c_norm = (c_np**2).sum(0, keepdims=True)
    x = rows.astype(np.float32)
    dist = (x**2).sum(1, keepdims=True) - 2 * np.matmul(x, c_np) + c_norm
    # Two float32 formulas for the same distances: the same centroid wherever rounding
    # cannot reorder the two nearest (tests/numerics.py), which is nearly every row.
    clear = clear_frames(x, model.cluster_centers_, 0.0)
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(np.argmin(dist, axis=1)[clear], km.predict(x)[clear])
    # And it is a fitted scikit-learn KMeans: predict gives our units, with our centres.
    from sklearn.cluster import KMeans as SklearnKMeans

    assert isinstance(model, SklearnKMeans)
    np.testing.assert_array_equal(model.cluster_centers_, km.cluster_centers_)
    np.testing.assert_array_equal(model.predict(x)[clear], km.predict(x)[clear])
    assert model.inertia_ == km.inertia_
    # Done is done; the same name with another config is refused, and nothing changes.
    before = {p: os.stat(out / p).st_mtime_ns for p in os.listdir(out)}
    again = run(str(root), "mfcc", "km12", KMeans(K, seed=0, max_iter=20, block_rows=256))
    assert not again["written"]
    with pytest.raises(StageError, match="another config"):
        run(str(root), "mfcc", "km12", KMeans(K + 1, seed=0, max_iter=20, block_rows=256))
    assert {p: os.stat(out / p).st_mtime_ns for p in os.listdir(out)} == before


def test_stage_with_pca_clusters_the_projection(root):
    root, rows = root
    km = KMeans(K, seed=0, max_iter=10, block_rows=256)
    meta = run(str(root), "mfcc", "pca8", km, StageOptions(pca=8, workers=2))
    out = root / "kmeans" / "pca8"
    assert np.load(out / "centroids.npy").shape == (K, 8) and meta["feature_dim"] == 39
    a, b = np.load(out / "pca" / "8_pca_A.npy"), np.load(out / "pca" / "8_pca_b.npy")
    pca = PCA(8).fit(rows.astype(np.float32))
    np.testing.assert_allclose(rows.astype(np.float32) @ a + b, pca.transform(rows), atol=1e-3)
    assert 0 < meta["pca"]["explained_variance_ratio"] <= 1
    reference = KMeans(K, seed=0, max_iter=10, block_rows=256).fit(pca.transform(rows))
    np.testing.assert_allclose(km.cluster_centers_, reference.cluster_centers_, atol=1e-4)


def test_nan_in_a_store_is_named_by_shard_and_key_and_nothing_is_written(root, tmp_path):
    root, _ = root
    write_store(tmp_path, "broken")
    array = np.load(tmp_path / "features" / "broken" / "shards" / "000002.npy", mmap_mode="r+")
    array[260, 3] = np.nan  # Frame 10 of the second utterance of shard 000002.
    array.flush()
    with pytest.raises(StageError, match=r"shard 000002, key spk-2-1, frame 10"):
        run(str(tmp_path), "broken", "km", KMeans(K, block_rows=256))
    assert not (tmp_path / "kmeans").exists()


def test_missing_empty_or_too_small_stores_are_clear_errors(tmp_path):
    with pytest.raises(StageError, match="no finished feature store 'nope'"):
        run(str(tmp_path), "nope", "km", KMeans(K))
    write_store(tmp_path, "empty", utterances_per_shard=((),))
    with pytest.raises(StageError, match="holds no frames"):
        run(str(tmp_path), "empty", "km", KMeans(K))
    write_store(tmp_path, "small", utterances_per_shard=((5, 3),))
    with pytest.raises(
        StageError, match=r"n_samples=8 frames in 'small' should be >= n_clusters=12"
    ):
        run(str(tmp_path), "small", "km", KMeans(K))
    with pytest.raises(StageError, match="--pca 40 must be between 1 and the dimension 39"):
        run(str(tmp_path), "small", "km", KMeans(2), StageOptions(pca=40))
    assert not (tmp_path / "kmeans").exists()


def test_minibatch_streaming_from_the_store_holds_no_rows_and_fits(root):
    root, rows = root
    km = KMeans(K, algorithm="minibatch", batch_size=500, seed=0, block_rows=256)
    meta = run(str(root), "mfcc", "mb", km, StageOptions(rows="stream", workers=2))
    assert meta["written"] and meta["config"]["algorithm"] == "minibatch"
    assert meta["rows_decision"]["rows"] == meta["rows_decision"]["requested"] == "stream"
    lloyd = KMeans(K, seed=0, block_rows=256).fit(rows.astype(np.float32))
    assert meta["inertia"] <= lloyd.inertia_ * 1.05  # Close to the full-batch answer.


def test_workers_get_a_share_of_their_node_s_memory():
    memory = int(ray.cluster_resources()["memory"])  # One node of 2 CPUs (conftest).
    one_per_cpu = worker_memory(None, 0)
    assert one_per_cpu == {
        "workers": 2,
        "cluster_memory": memory,
        "memory_per_worker": pytest.approx(memory // 2, abs=1),
    }
    # Four workers share the node's two CPUs, and its memory.
    assert worker_memory(4, 0)["memory_per_worker"] == pytest.approx(memory // 4, abs=1)
    # Rows of one block start one actor, whatever was asked for.
    assert worker_memory(4, 0, max_actors=1)["memory_per_worker"] == pytest.approx(memory, abs=1)


def test_auto_streams_what_would_not_fit_and_hold_is_obeyed_with_a_warning(
    root, monkeypatch, caplog
):
    root, _ = root

    def starved(workers, gpus_per_worker, max_actors=None):
        return {"workers": workers or 2, "cluster_memory": 2000, "memory_per_worker": 1000}

    monkeypatch.setattr(stage, "worker_memory", starved)
    caplog.set_level(logging.INFO, logger="units.kmeans.stage")
    km = KMeans(K, seed=0, max_iter=3, block_rows=256)
    meta = run(str(root), "mfcc", "starved", km, StageOptions(workers=2))
    decision = meta["rows_decision"]
    assert decision["rows"] == "stream" and decision["requested"] == "auto"
    assert decision["fits"] is False and decision["memory_per_worker"] == 1000
    assert decision["cluster_memory"] == 2000
    logged = [r for r in caplog.records if r.getMessage().startswith("k-means rows:")]
    assert logged[0].levelno == logging.INFO
    assert "k-means rows: stream (decided): holding takes" in logged[0].getMessage()
    assert "more than 70% of the 1000 B a worker can get" in logged[0].getMessage()
    # Streamed or held, the same centroids (the rows are the same float32s).
    caplog.clear()
    held = run(str(root), "mfcc", "forced", KMeans(K, seed=0, max_iter=3, block_rows=256),
               StageOptions(workers=2, rows="hold"))  # fmt: skip
    assert held["rows_decision"]["rows"] == "hold" and held["rows_decision"]["fits"] is False
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "workers may be killed for memory" in warned[0].getMessage()
    assert held["inertia"] == meta["inertia"]
    centroids = [np.load(root / "kmeans" / n / "centroids.npy") for n in ("starved", "forced")]
    np.testing.assert_array_equal(*centroids)


def test_rows_other_than_auto_hold_or_stream_are_refused_before_any_work(root):
    root, _ = root
    with pytest.raises(StageError, match="rows must be one of auto, hold, stream, got 'keep'"):
        run(str(root), "mfcc", "keep", KMeans(K, block_rows=256), StageOptions(rows="keep"))
    assert not (root / "kmeans" / "keep").exists()
