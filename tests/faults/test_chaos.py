"""A preempted cluster: the whole HuBERT run while worker nodes come and go, and a driver
killed mid-run and started again. Either way the outputs are the undisturbed run's, byte for
byte, and no committed unit is written twice.

One simulated cluster (``ray.cluster_utils.Cluster``: a head without CPUs and six one-CPU
worker nodes) serves the module. The reference is one undisturbed ``pipelines.hubert`` run on
it (shard -> features -> k-means -> labels -> fairseq export -> report, on a small generated
corpus at a path that every run shares: tar shards record their source paths). Then:

- The same run, in this process, while a chaos loop preempts worker nodes as spot instances
  go: every few seconds a random worker node (a seeded choice) is lost whole, its raylet and
  every worker killed at once, and a fresh node joins in its place. Most of a run this small
  is workers starting, so a random moment often falls between shards; once in each shard
  stage the loop also takes the node of a worker caught writing a shard (the temporary file
  names the writer's PID), so that work is certainly lost and must be redone, and once in
  the k-means stage a random node half a second in, while its actors start or fit.
- The same command as a driver process of its own, SIGKILLed once the shard stage has
  committed some of its shards but not all, then run again to the end (in this process):
  it must write only the shards that were not committed, and every later stage in full.

Outputs are compared with ``scripts/output_digest.py``'s digests, which leave out what
describes a run (timings, the root's own path); the run records under ``ROOT/runs`` describe
how a run went and are left out. The chaos test prints ``RECOMPUTE redone/total``: the shards
written again because the worker writing them was lost, as the stages count them
(``shards_redone`` in their results), over the shards the shard stages wrote.

The run goes in a thread (``Cluster.add_node``/``remove_node`` use signal handlers: main
thread only, where the chaos loop runs).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from pipelines import hubert
from pipelines.demo.corpus import write_demo_corpus
from scripts.output_digest import SKIPPED, digest
from tests.clusters import NODE, simulated_cluster, wait_for_cpus
from tests.processes import parent_of, raylet_pid, remove_whole_node

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "hubert-mfcc.yaml")
WORKERS = 6
#: One utterance per shard (shard.max_samples=1), in each shard stage. The CPU stages' shard
#: tasks start on pooled workers at once, so a run of 12 shards was short enough that as few
#: as two preemptions fell inside its stages.
SHARDS = 26
#: The stages whose unit is a shard: where a shard being written has its temporary files,
#: and where its commit record goes.
WRITING = {"shard": "shards", "features": "features/*/shards", "label": "labels/*/*"}
COMMITS = {
    "shard": "manifest/parts/{}.commit.json",
    "features": "features/*/shards/{}.commit.json",
    "label": "labels/*/commits/{}.json",
}
#: Seconds between random preemptions (adding the replacement node takes about 3 s more).
PERIOD = 4.0
#: The k-means stage has no shard to catch being written: a node is lost this many seconds
#: into the stage, once, while its actors start or fit. With the writers caught in the
#: three shard stages (each stage waits until the loop has seen it start), four
#: preemptions land inside stages whatever the stages' length: a random one every PERIOD
#: alone missed every stage of a fast run.
KMEANS_AFTER = 0.5


def _argv(corpus, root, *overrides: str) -> list[str]:
    return [
        "--config", CONFIG, f"root={root}", f"inputs=[{corpus}]", "shard.max_samples=1",
        "features.percent=100", "kmeans.k=16", f"report.phones={corpus}/phones.tsv",
        "label.fairseq_splits={train: 80, valid: 20}", *overrides, "--no-progress",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def cluster():
    """A head with no CPU and six worker nodes of one CPU each, with the driver connected."""
    with simulated_cluster("up-ch-", WORKERS) as made:
        yield made


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """26 utterances of about 5 s, two speakers, with phone alignments for the report."""
    root = tmp_path_factory.mktemp("corpus")
    write_demo_corpus(str(root), minutes=2.0, speakers=2, seed=3)
    return root


@pytest.fixture(scope="module")
def reference(cluster, corpus, tmp_path_factory):
    """The undisturbed run, on the same cluster."""
    root = tmp_path_factory.mktemp("undisturbed") / "root"
    assert hubert.main(_argv(corpus, root)) == 0
    return root


def _digests(root) -> dict[str, str]:
    """``output_digest``'s digest of every output under ``root``; not the run records."""
    root = os.path.abspath(root)
    out = {}
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            relative = os.path.relpath(path, root)
            if relative.startswith("runs" + os.sep) or name.endswith(SKIPPED):
                continue
            out[relative] = digest(path, root)
    return out


def _same_outputs(reference, root) -> None:
    expected, got = _digests(reference), _digests(root)
    assert not [f for f in got if ".tmp-" in f]  # No temporary file left visible.
    assert sorted(got) == sorted(expected)
    assert [f for f in sorted(got) if got[f] != expected[f]] == []
    assert len(got) > 5 * SHARDS  # Tars, manifests, features, k-means, labels, exports.


def _record(root) -> dict:
    with open(os.path.join(root, "runs", "hubert-it1.json")) as f:
        return json.load(f)


class Chaos:
    """Preempts worker nodes while a run goes on; each lost node is replaced at once.

    Args:
        cluster: The cluster.
        root: The run's root, where a shard being written shows as a temporary file.
        stage: Returns the stage running now (``None`` between stages).
        seed: Seeds the choice of the random victims.
    """

    def __init__(self, cluster, root, stage, seed: int = 0):
        self.cluster, self.root, self.stage = cluster, str(root), stage
        self.rng = random.Random(seed)
        self.kills: list[dict] = []  # Each: stage, how it was chosen, what it cost.
        #: Set once the loop has seen each stage it preempts for sure running; the stage waits
        #: for it before it starts, as the loop may be busy adding a node for seconds, longer
        #: than a small stage lasts.
        self.seen = {name: threading.Event() for name in (*WRITING, "kmeans")}

    def run(self, thread: threading.Thread, timeout: float = 300) -> None:
        """Preempts until ``thread`` ends: a random node every ``PERIOD`` seconds; in each
        shard stage, once, the node of a worker caught writing a shard; in the k-means
        stage, once, a random node ``KMEANS_AFTER`` seconds in."""
        deadline = time.monotonic() + timeout
        next_kill = time.monotonic() + PERIOD
        caught: set[str] = set()
        kmeans_started = None
        while thread.is_alive():
            assert time.monotonic() < deadline, f"the run did not end; kills: {self.kills}"
            stage = self.stage()
            if stage in self.seen:
                self.seen[stage].set()
            if stage == "kmeans" and kmeans_started is None:
                kmeans_started = time.monotonic()
            writing = self._writing(stage) if stage in WRITING and stage not in caught else None
            if writing is not None:
                node, shard = writing
                caught.add(stage)
                self._preempt(node, stage, shard=shard)
                next_kill = time.monotonic() + PERIOD
            elif (
                stage == "kmeans"
                and stage not in caught
                and time.monotonic() - kmeans_started >= KMEANS_AFTER
            ):
                caught.add(stage)
                self._preempt_random(stage)
                next_kill = time.monotonic() + PERIOD
            elif time.monotonic() >= next_kill:
                self._preempt_random(stage)
                next_kill = time.monotonic() + PERIOD
            else:
                time.sleep(0.005)

    def _writing(self, stage: str):
        """(node, shard) of a worker writing a shard of ``stage`` now, if any."""
        raylets = {raylet_pid(n): n for n in self.cluster.worker_nodes}
        for temp in glob.glob(os.path.join(self.root, WRITING[stage], ".*.tmp-*")):
            # ".NAME.tmp-PID-RANDOM", NAME the shard's and a suffix ("000003.tar").
            name, _, rest = os.path.basename(temp)[1:].partition(".tmp-")
            node = raylets.get(parent_of(int(rest.split("-")[0])))
            if node is not None:  # Not a file the driver writes (a manifest, a plan).
                return node, name.split(".")[0]
        return None

    def _preempt_random(self, stage) -> None:
        """Preempts a worker node of the seeded random choice (in a fixed order of nodes)."""
        nodes = sorted(self.cluster.worker_nodes, key=lambda n: n.unique_id)
        self._preempt(self.rng.choice(nodes), stage)

    def _preempt(self, node, stage, shard=None) -> None:
        workers = remove_whole_node(self.cluster, node)
        kill = {"stage": stage, "workers": workers, "shard": shard}
        if shard is not None:
            # Its writer is dead: a shard without its commit record now was lost mid-write,
            # and must be written again (one committed just before is not).
            commit = os.path.join(self.root, COMMITS[stage].format(shard))
            kill["lost_mid_write"] = not glob.glob(commit)
        self.kills.append(kill)
        self.cluster.add_node(**NODE)


def test_a_preempted_cluster_finishes_with_the_same_outputs(
    cluster, corpus, reference, tmp_path, monkeypatch, caplog, capsys
):
    root = tmp_path / "preempted"
    running: list[str | None] = [None]
    real_stage = hubert._stage

    def stage(name, args, call):
        running[0] = name
        if name in chaos.seen:
            assert chaos.seen[name].wait(60), f"the chaos loop never saw the {name} stage"
        try:
            return real_stage(name, args, call)
        finally:
            running[0] = None

    monkeypatch.setattr(hubert, "_stage", stage)
    outcome: dict = {}

    def target():
        try:
            outcome["status"] = hubert.main(_argv(corpus, root))
        except BaseException as e:  # Raised again in the test's thread.
            outcome["error"] = e

    chaos = Chaos(cluster, root, lambda: running[0], seed=15)
    thread = threading.Thread(target=target, daemon=True)
    with caplog.at_level(logging.WARNING, logger="units.kmeans.transport"):
        thread.start()
        chaos.run(thread)
        thread.join()
    wait_for_cpus(WORKERS)  # The replacements are up for the next test.
    if "error" in outcome:
        raise outcome["error"]
    assert outcome["status"] == 0, chaos.kills

    record = _record(root)
    redone = {name: record[name]["shards_redone"] for name in hubert.SHARD_STAGES}
    total = sum(record[name]["shards_written"] for name in hubert.SHARD_STAGES)
    assert total == 3 * SHARDS
    restored = caplog.text.count("giving it its state back")
    during = [k for k in chaos.kills if k["stage"] is not None]
    with capsys.disabled():
        print(
            f"\nRECOMPUTE {sum(redone.values())}/{total} shards "
            f"({', '.join(f'{n} {c}' for n, c in redone.items())}); "
            f"{len(chaos.kills)} nodes lost, {len(during)} during a stage "
            f"({', '.join(sorted({str(k['stage']) for k in during}))}); "
            f"k-means parts restored {restored} time(s)"
        )
    _same_outputs(reference, root)
    # The run was disturbed: nodes lost in the middle of its stages, shards lost mid-write.
    assert len(during) >= 4, chaos.kills
    lost_mid_write = [k for k in chaos.kills if k.get("lost_mid_write")]
    assert lost_mid_write, chaos.kills
    # Every shard lost mid-write was written again, and counted; a node (one CPU) holds one
    # shard at a time, so it cannot cost more than one.
    assert len(lost_mid_write) <= sum(redone.values()) <= len(chaos.kills)
    for name in hubert.SHARD_STAGES:
        assert redone[name] <= len([k for k in chaos.kills if k["stage"] == name])
    assert record["shards_redone"] == sum(
        record[name].get("shards_redone", 0) for name in hubert.SHARD_STAGES
    )


def test_a_driver_killed_mid_run_resumes_without_redoing_committed_work(
    cluster, corpus, reference, tmp_path, capsys
):
    root = tmp_path / "resumed"
    address = f"ray.address={cluster.address}"
    cmd = [sys.executable, "-m", "pipelines.hubert", *_argv(corpus, root, address)]
    env = dict(os.environ, PYTHONPATH=REPO)
    log = tmp_path / "driver.log"
    with open(log, "wb") as out:
        driver = subprocess.Popen(
            cmd, env=env, cwd=REPO, start_new_session=True, stdout=out, stderr=subprocess.STDOUT
        )
    commits = str(root / "manifest" / "parts" / "*.commit.json")
    deadline = time.monotonic() + 240
    while not glob.glob(commits) and driver.poll() is None:
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.005)
    assert driver.poll() is None, log.read_text()[-3000:]
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    # Ray ends a dead driver's tasks; one may commit the shard it was writing first: fine.
    wait_for_cpus(WORKERS)
    committed = sorted(glob.glob(commits))
    assert 1 <= len(committed) < SHARDS, f"{len(committed)} shards committed"
    assert not (root / "manifest" / "utterances.parquet").exists()
    # The committed units: their commit records, tars and manifest parts.
    names = [os.path.basename(c).split(".")[0] for c in committed]
    kept = [p for n in names for p in glob.glob(str(root / "shards" / f"{n}.tar"))]
    kept += [p for n in names for p in glob.glob(str(root / "manifest" / "parts" / f"{n}.*"))]
    assert len(kept) >= 2 * len(committed)
    stamps = {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in kept}

    # The same command again, to the end; in this process (already connected to the
    # cluster), which spares a second driver's start: what it skips and writes is the same.
    assert hubert.main(_argv(corpus, root, address)) == 0
    record = _record(root)
    with capsys.disabled():
        print(
            f"\nRESUMED driver killed with {len(committed)}/{SHARDS} shards committed; the "
            f"rerun skipped {record['shard']['shards_skipped']}, wrote "
            f"{record['shard']['shards_written']}"
        )
    # Exactly the shards without a commit were written; none of the others.
    assert record["shard"]["shards_skipped"] == len(committed)
    assert record["shard"]["shards_written"] == SHARDS - len(committed)
    assert record["features"]["shards_written"] == record["label"]["shards_written"] == SHARDS
    assert record["shards_redone"] == 0  # No worker was lost.
    assert {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in kept} == stamps
    _same_outputs(reference, root)
