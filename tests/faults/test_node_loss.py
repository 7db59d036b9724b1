"""A worker node lost in the middle of each Ray stage: the job completes, as a clean run does.

One simulated cluster (``ray.cluster_utils.Cluster``: a head without CPUs, so that all work
runs on two one-CPU worker nodes) serves the module. Each stage runs once cleanly, then once
more while a worker node is lost (its raylet and workers killed at once); the outputs must be
the same files with the same bytes (same keys, each once) and, for k-means, the same
centroids. The shard, feature and label stages must finish on the one node left (a node is
added back after them); k-means, which needs every part, gets a replacement node at once.

The stage runs in a thread (``Cluster.add_node``/``remove_node`` use signal handlers: main
thread only) and is held at a point where it is certainly mid-way (after its first unit is
committed, with the rest not yet handed out) while the node is removed. The feature and label
stages run each shard as a task on a pooled worker: the lost node is one whose worker was
caught in the middle of a shard and stopped there (SIGSTOP), so the loss always takes a shard
with it.
"""

from __future__ import annotations

import filecmp
import glob
import logging
import os
import signal
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray

import units.kmeans.transport
import units.stage
from shards import synthetic
from shards.core.atomic import read_json
from shards.plan import ShardingOptions
from shards.ray_sharding import run as shard
from tests.clusters import NODE, simulated_cluster, wait_for_cpus
from tests.processes import freeze_running, remove_whole_node
from tests.stores import frames
from units.features.extractors import ExtractorOptions
from units.features.sampling import SampleRequest
from units.features.stage import run as extract
from units.kmeans.estimator import KMeans
from units.kmeans.parts import Part
from units.kmeans.stage import StageOptions
from units.kmeans.stage import run as fit_kmeans
from units.kmeans.transport import distribute
from units.labels.stage import run as label

pytestmark = pytest.mark.slow

OPTS = ShardingOptions(max_samples=2)  # 16 utterances: 8 shards.
SHARDS = 8
KM = dict(seed=0, block_rows=512)


@pytest.fixture(scope="module")
def cluster():
    """A head with no CPU and two worker nodes of one CPU each, with the driver connected."""
    with simulated_cluster("up-nl-", 2) as made:
        yield made


class NodeLoss:
    """Runs a stage in a thread, holds it at :meth:`hold`, removes a worker node meanwhile.

    Args:
        cluster: The cluster.
        committed: Counts the units the stage has committed (at the moment of the loss).
        replace_during: Add a replacement node as soon as the stage goes on (k-means needs
            every part); otherwise the stage must finish on the one node left, and the
            replacement comes after it, for the next test.
    """

    def __init__(self, cluster, committed, *, replace_during: bool = False, task=None):
        self.cluster, self.committed = cluster, committed
        self.replace_during = replace_during
        self.task = task
        self.reached, self.resume = threading.Event(), threading.Event()
        self.committed_at_loss: int | None = None
        self.victim = None  # The node to lose: one caught running ``task``, if given.
        self.watcher: threading.Thread | None = None
        self.lost_node: str | None = None

    def hold(self) -> None:
        """Called from the stage's thread: the first call that finds its node to lose waits
        until the node is gone.

        With ``task``, a call that catches no worker running it (the shards in flight all
        finished meanwhile, as shards of one size on idle workers do together) lets the
        stage go on, and a watcher catches the next worker that starts the task: the node is
        lost while the stage goes on with the other, and the frozen shard cannot commit."""
        if self.reached.is_set() or self.watcher is not None:
            return  # Lost already, or the watcher freezes the victim: never two of them.
        if self.task is not None:
            self.victim = freeze_running(self.cluster, self.task)
            if self.victim is None:
                self._watch()
                return
        self.reached.set()
        assert self.resume.wait(timeout=120), "the node was never removed"

    def _watch(self) -> None:
        """Starts a thread that freezes the first worker it finds running ``task``."""

        def watch():
            deadline = time.monotonic() + 120
            while not self.reached.is_set() and time.monotonic() < deadline:
                victim = freeze_running(self.cluster, self.task)
                if victim is not None:
                    self.victim = victim
                    self.reached.set()
                    return
                time.sleep(0.002)

        self.watcher = threading.Thread(target=watch, daemon=True)
        self.watcher.start()

    def run(self, stage, *args, **kwargs):
        outcome: dict = {}

        def target():
            try:
                outcome["result"] = stage(*args, **kwargs)
            except BaseException as e:  # Raised again in the test's thread.
                outcome["error"] = e
            finally:
                self.reached.set()  # A stage that ends before the hold point lets run go on.

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        assert self.reached.wait(timeout=180), "the stage never reached its hold point"
        assert thread.is_alive(), f"the stage ended before the node was lost: {outcome}"
        self.committed_at_loss = self.committed()
        victim = self.victim or sorted(self.cluster.worker_nodes, key=lambda n: n.unique_id)[0]
        self.lost_node = victim.node_id
        assert remove_whole_node(self.cluster, victim), "the node has no worker to lose"
        self.resume.set()
        if self.replace_during:
            self.cluster.add_node(**NODE)
        thread.join(timeout=240)
        assert not thread.is_alive(), "the stage did not finish after the node was lost"
        if not self.replace_during:
            self.cluster.add_node(**NODE)
        wait_for_cpus(2)  # The next stage must see both nodes (and place an actor on each).
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]


def _held(module, loss: NodeLoss):
    """``module.map_until_failure`` that holds the stage at a finished shard (the generator
    is suspended there: no further shard is handed out until it goes on)."""
    real = module.map_until_failure

    def map_until_failure(pool, submit, items):
        for result in real(pool, submit, items):
            loss.hold()
            yield result

    return map_until_failure


def _assert_lost_a_shard(loss: NodeLoss, caplog) -> None:
    """The lost node was writing a shard (its worker was caught in it); the shard went to
    the node left."""
    assert loss.victim is not None and loss.lost_node == loss.victim.node_id
    assert "a shard lost its worker" in caplog.text and "handing it out again" in caplog.text


def _files(directory) -> list[str]:
    return sorted(
        os.path.relpath(p, directory)
        for p in glob.glob(os.path.join(directory, "**", "*"), recursive=True)
        if os.path.isfile(p)
    )


def _same_files(a, b, skip=()) -> list[str]:
    """Asserts that ``a`` and ``b`` hold the same files with the same bytes; returns them."""
    files = _files(a)
    assert files == _files(b)
    assert not [f for f in files if ".tmp" in f]  # No temporary file left visible.
    for f in files:
        if f not in skip:
            assert filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False), f
    return files


def _keys(paths) -> list[str]:
    return [k for p in paths for k in pq.read_table(p, columns=["key"]).column("key").to_pylist()]


def _count(pattern: str):
    return lambda: len(glob.glob(pattern))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    synthetic.write_librispeech(str(root), speakers=2, chapters=2, utterances=4, seconds=(1.0, 2.0))
    return root


@pytest.fixture(scope="module")
def root(cluster, corpus, tmp_path_factory):
    """The clean run of every stage: the reference of each test."""
    out = tmp_path_factory.mktemp("clean")
    shard([str(corpus)], str(out), OPTS)
    extract(str(out), "mfcc", ExtractorOptions("mfcc"), SampleRequest(percent=100, seed=0))
    fit_kmeans(str(out), "mfcc", "km", KMeans(8, **KM), StageOptions(pca=12))
    label(str(out), "km", "units")
    return out


def test_a_node_lost_while_sharding(cluster, corpus, root, tmp_path):
    out = tmp_path / "lost"
    loss = NodeLoss(cluster, _count(str(out / "manifest" / "parts" / "*.commit.json")))
    summary = loss.run(shard, [str(corpus)], str(out), OPTS, on_shard=lambda record: loss.hold())
    # The driver holds at most 2 tasks per CPU in flight: most shards were still to come.
    assert 0 < loss.committed_at_loss < SHARDS == summary["shards"]
    _same_files(root / "shards", out / "shards")
    _same_files(root / "plan", out / "plan")
    _same_files(root / "manifest", out / "manifest", skip=["summary.json"])
    clean = read_json(str(root / "manifest" / "summary.json"))
    lost = read_json(str(out / "manifest" / "summary.json"))
    assert clean.pop("throughput")["bytes_written"] == lost.pop("throughput")["bytes_written"]
    assert clean == lost  # Only its wall time and rate differ.
    keys = _keys([out / "manifest" / "utterances.parquet"])
    assert len(keys) == len(set(keys)) == 16


def test_a_node_lost_while_extracting_features(cluster, root, caplog, monkeypatch):
    store = root / "features" / "mfcc_lost"
    loss = NodeLoss(cluster, _count(str(store / "shards" / "*.commit.json")), task="process_shard")
    monkeypatch.setattr(units.stage, "map_until_failure", _held(units.stage, loss))
    with caplog.at_level(logging.WARNING, logger="shards.core.placement"):
        meta = loss.run(
            extract,
            str(root),
            "mfcc_lost",
            ExtractorOptions("mfcc"),
            SampleRequest(percent=100, seed=0),
        )
    # A shard was caught mid-way on the lost node, after one was committed: it was redone.
    assert 0 < loss.committed_at_loss < SHARDS == meta["shards_written"]
    assert meta["shards_redone"] == 1
    _assert_lost_a_shard(loss, caplog)
    _same_files(root / "features" / "mfcc", store)
    keys = _keys(glob.glob(str(store / "shards" / "*.index.parquet")))
    assert len(keys) == len(set(keys)) == 16


def test_a_node_lost_while_fitting_kmeans(cluster, root, caplog, monkeypatch):
    out = root / "kmeans" / "km_lost"
    lloyd = []
    # Iterations done before the loss; every part is needed: the lost one restarts on a new node.
    loss = NodeLoss(cluster, lambda: len(lloyd) - 1, replace_during=True)
    real = units.kmeans.transport.RayParts.map

    def held(parts, method, *args):
        if method is Part.stats:
            lloyd.append(method)
            if len(lloyd) == 3:  # Two Lloyd iterations done and checkpointed.
                loss.hold()
        return real(parts, method, *args)

    monkeypatch.setattr(units.kmeans.transport.RayParts, "map", held)
    with caplog.at_level(logging.WARNING, logger="units.kmeans.transport"):
        meta = loss.run(
            fit_kmeans, str(root), "mfcc", "km_lost", KMeans(8, **KM), StageOptions(pca=12)
        )
    clean = read_json(str(root / "kmeans" / "km" / "kmeans.json"))
    assert 0 < loss.committed_at_loss < meta["iterations"] == clean["iterations"]
    # The part on the lost node was restarted from its rows and given its PCA projection.
    assert "giving it its state back" in caplog.text
    centroids = np.load(out / "centroids.npy")
    assert np.array_equal(centroids, np.load(root / "kmeans" / "km" / "centroids.npy"))
    assert meta["inertia"] == clean["inertia"] and meta["pca"] == clean["pca"]
    timeless = ["iteration", "inertia", "relative_change", "empty_clusters", "imbalance"]
    np.testing.assert_equal(  # NaN == NaN (the first relative change).
        pq.read_table(out / "iterations.parquet", columns=timeless).to_pylist(),
        pq.read_table(root / "kmeans" / "km" / "iterations.parquet", columns=timeless).to_pylist(),
    )
    _same_files(root / "kmeans" / "km" / "pca", out / "pca")


def test_a_node_lost_while_labelling(cluster, root, caplog, monkeypatch):
    out = root / "labels" / "units_lost"
    loss = NodeLoss(cluster, _count(str(out / "commits" / "*.json")), task="process_shard")
    monkeypatch.setattr(units.stage, "map_until_failure", _held(units.stage, loss))
    with caplog.at_level(logging.WARNING, logger="shards.core.placement"):
        meta = loss.run(label, str(root), "km", "units_lost")
    assert 0 < loss.committed_at_loss < SHARDS == meta["shards_written"]
    assert meta["shards_redone"] == 1
    _assert_lost_a_shard(loss, caplog)
    _same_files(root / "labels" / "units", out)
    keys = _keys(glob.glob(str(out / "units" / "*.parquet")))
    assert len(keys) == len(set(keys)) == meta["utterances"] == 16


def test_a_kmeans_part_restarted_while_seeding_gets_its_distances_back(cluster, caplog):
    # k-means|| keeps per-row distances in the parts between calls: a restarted part gets
    # them back by replaying its seed_update calls (its process killed, not a whole node:
    # the same path, cheaper).
    x = frames(3000, seed=5)
    clean = KMeans(8, **KM).fit(x)  # In this process: the same centroids, any parts.
    parts = distribute(x, workers=2, block_rows=KM["block_rows"])
    real, calls = parts.map, []

    def map_(method, *args):
        calls.append(method)
        if method is Part.seed_sample and calls.count(method) == 2:  # After two seed_updates.
            pid = ray.get(parts.actors[1].__ray_call__.remote(lambda part: os.getpid()))
            os.kill(pid, signal.SIGKILL)
            while _alive(pid):
                time.sleep(0.01)
        return real(method, *args)

    parts.map = map_
    try:
        with caplog.at_level(logging.WARNING, logger="units.kmeans.transport"):
            km = KMeans(8, **KM).fit(parts)
    finally:
        parts.shutdown()
    assert "a k-means part was lost during seed_sample" in caplog.text
    assert np.array_equal(km.cluster_centers_, clean.cluster_centers_)
    assert km.n_iter_ == clean.n_iter_


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a killed child of another process stays a zombie a while)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
