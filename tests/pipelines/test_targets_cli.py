"""``pipelines.bestrq``, ``pipelines.pieces`` and ``pipelines.label --kmeans A B`` as a user
runs them: each on a simulated 2-node cluster (``ray.cluster_utils``), its driver SIGKILLed
mid-way, then rerun: the output equals the clean run's, byte for byte, and the rerun does
only what the killed run had not committed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pipelines import bestrq
from tests.pipelines.cli_runs import REPO, exit_status

SHARDS = 10


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit) as done:
        bestrq.main(["--help"])
    assert done.value.code == 0
    assert "python -m pipelines.bestrq --root" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--features", "s", "--hours", "1"], "--features names the sample"),
        (["--codebook-size", "70000"], "codebook_size=70000"),
        (["--extractor", "mfcc", "--layer", "3"], "--layer applies to SSL models"),
        (["--percent", "0"], "--percent must be in (0, 100]"),
    ],
)
def test_bad_options_exit_2_before_ray(tmp_path, capsys, extra, message):
    argv = ["--root", str(tmp_path), "--name", "rq", *extra]
    assert exit_status(bestrq.main, argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1, err


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two one-CPU worker nodes and a head without CPUs; a sharded corpus (10 shards) with an
    MFCC store and k-means of k = 8 and 16 on it, made on the cluster."""
    from shards import synthetic
    from shards.plan import ShardingOptions
    from shards.ray_sharding import run as shard
    from tests.clusters import simulated_cluster
    from units.features.extractors import ExtractorOptions
    from units.features.sampling import SampleRequest
    from units.features.stage import run as extract
    from units.kmeans.estimator import KMeans
    from units.kmeans.stage import run as fit_kmeans

    corpus, root = (tmp_path_factory.mktemp(n) for n in ("corpus", "root"))
    synthetic.write_librispeech(
        str(corpus), speakers=4, chapters=1, utterances=5, seconds=(1.0, 3.0)
    )
    with simulated_cluster("up-tg-", 2) as made:
        shard([str(corpus)], str(root), ShardingOptions(max_samples=2))
        extract(str(root), "mfcc", ExtractorOptions("mfcc"), SampleRequest(percent=50))
        for k in (8, 16):
            fit_kmeans(str(root), "mfcc", f"km{k}", KMeans(k, seed=0, block_rows=512))
        yield made, root


def _killed_then_resumed(cluster, root, tmp_path, argv, ready) -> subprocess.CompletedProcess:
    """Runs ``python -m`` ``argv`` on the cluster, SIGKILLs its process group once
    ``ready()`` holds, waits for the cluster to be free again, and reruns it to the end."""
    from tests.clusters import wait_for_cpus

    env = dict(os.environ, PYTHONPATH=REPO)
    command = [sys.executable, "-m", *argv, "--address", cluster.address]
    log = open(tmp_path / "driver.log", "wb")
    proc = subprocess.Popen(
        command, env=env, cwd=REPO, start_new_session=True, stdout=log, stderr=log
    )
    deadline = time.monotonic() + 300
    while not ready():
        assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        assert time.monotonic() < deadline, f"{argv[0]} did not get there in 300 s"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_for_cpus(2)  # The killed driver's actors are gone.
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _commits(directory) -> int:
    return len(list(directory.glob("*.json"))) if directory.exists() else 0


def _same_files(a, b) -> None:
    files = sorted(p.name for p in a.iterdir())
    assert len(files) == SHARDS and sorted(p.name for p in b.iterdir()) == files
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.slow
def test_bestrq_killed_mid_pass_resumes_to_the_clean_runs_bytes(cluster, tmp_path, capsys):
    from units.bestrq.quantizer import QuantizerConfig
    from units.bestrq.stage import run as run_bestrq
    from units.features.sampling import SampleRequest

    made, root = cluster
    config, sample = QuantizerConfig(codebook_size=256, seed=3), SampleRequest(50, seed=3)
    clean = run_bestrq(str(root), "clean", config=config, sample=sample, workers=2)
    assert clean["utterances"] == 20 and len(clean["shards"]) == SHARDS
    commits = root / "labels" / "killed" / "commits"
    argv = [
        "pipelines.bestrq", "--root", str(root), "--name", "killed", "--codebook-size", "256",
        "--percent", "50", "--seed", "3", "--workers", "2",
    ]  # fmt: skip
    done = _killed_then_resumed(made, root, tmp_path, argv, lambda: _commits(commits) >= 2)
    committed = (
        SHARDS - json.loads((root / "runs" / "bestrq-killed.json").read_text())["shards_written"]
    )
    assert 2 <= committed < SHARDS  # Killed mid-pass; the rerun did only the rest.
    assert "bestrq: labelled 20 utterances" in done.stdout
    record = json.loads((root / "runs" / "bestrq-killed.json").read_text())
    assert record["quantizer"]["fingerprint"] == clean["quantizer"]["fingerprint"]
    _same_files(*(root / "labels" / n / "units" for n in ("clean", "killed")))
    # Nothing left: ``bestrq.main`` (what ``python -m pipelines.bestrq`` runs) in this
    # process, already the cluster's driver.
    capsys.readouterr()
    code = bestrq.main([*argv[1:], "--address", made.address])
    again = capsys.readouterr()
    assert code == 0 and "nothing to do" in again.out, again.err[-3000:]


@pytest.mark.slow
def test_two_kmeans_in_one_pass_killed_mid_pass_resume_to_the_clean_runs_bytes(cluster, tmp_path):
    from units.labels.stage import run_many

    made, root = cluster
    run_many(str(root), ["km8", "km16"], ["clean8", "clean16"], workers=2)
    commits = root / "labels" / "killed8" / "commits"
    argv = [
        "pipelines.label", "--root", str(root), "--kmeans", "km8", "km16",
        "--name", "killed8", "killed16", "--workers", "2", "--fairseq-splits", "train=80,valid=20",
    ]  # fmt: skip
    done = _killed_then_resumed(made, root, tmp_path, argv, lambda: _commits(commits) >= 2)
    record = json.loads((root / "runs" / "label-killed8+killed16.json").read_text())
    assert 0 < record["shards_written"] <= SHARDS - 2
    assert "label: labelled 20 utterances" in done.stdout and "killed16/units" in done.stdout
    for k in (8, 16):
        _same_files(*(root / "labels" / n / "units" for n in (f"clean{k}", f"killed{k}")))
        fairseq = root / "labels" / f"killed{k}" / "fairseq"
        assert (fairseq / "train.km").exists() and (fairseq / "valid.km").exists()


@pytest.mark.slow
def test_pieces_killed_after_training_resume_with_the_same_model_to_the_same_bytes(
    cluster, tmp_path
):
    from tests.fairseq_checks import fairseq_label_checks
    from units.labels.stage import run
    from units.pieces.stage import run as run_pieces

    made, root = cluster
    run(str(root), "km8", "for-pieces", workers=2)
    clean = run_pieces(str(root), "for-pieces", "clean", vocab_size=20, workers=2)
    model = root / "pieces" / "killed" / "pieces.json"
    argv = [
        "pipelines.pieces", "--root", str(root), "--labels", "for-pieces", "--name", "killed",
        "--vocab-size", "20", "--workers", "2", "--fairseq-splits", "train=80,valid=20",
    ]  # fmt: skip
    # Killed once its model is written, before or while its actors encode.
    done = _killed_then_resumed(made, root, tmp_path, argv, model.exists)
    assert "pieces: encoded 20 utterances" in done.stdout
    killed = json.loads(model.read_text())
    assert (
        killed["sha256"]
        == json.loads((root / "pieces" / "clean" / "pieces.json").read_text())["sha256"]
    )
    assert clean["utterances"] == 20
    _same_files(*(root / "pieces" / n / "pieces" for n in ("clean", "killed")))
    out = root / "pieces" / "killed" / "fairseq"
    record = json.loads((out / "export.json").read_text())
    for split, count in record["splits"].items():
        checked = fairseq_label_checks(
            out / f"{split}.tsv", out / f"{split}.piece", out / "dict.piece.txt", 100.0
        )
        assert checked == count
