"""``python -m pipelines.label`` as a user runs it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from pipelines import label
from tests.pipelines.cli_runs import exit_status
from tests.processes import kill_ray_of

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit) as done:
        label.main(["--help"])
    assert done.value.code == 0
    assert "python -m pipelines.label --root" in capsys.readouterr().out


def test_a_missing_kmeans_exits_2_before_starting_ray(tmp_path, capsys):
    assert label.main(["--root", str(tmp_path), "--kmeans", "km", "--name", "l"]) == 2
    assert "no finished k-means 'km'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "splits, message",
    [
        ("train:99", "'train:99' is not NAME=PERCENT"),
        ("train=90", "split percents train=90 add up to 90, not 100"),
        ("train=99,valid=0,test=1", "split 'valid': percent must be > 0, got 0"),
        ("train=50,train=50", "split 'train' is given twice"),
        ("train=99,../valid=1", "split name '../valid' must be letters, digits"),
    ],
)
def test_bad_splits_exit_2_before_the_label_pass(tmp_path, capsys, splits, message):
    argv = ["--root", str(tmp_path), "--kmeans", "km", "--name", "l"]
    assert exit_status(label.main, [*argv, "--fairseq-splits", splits]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1, err
    assert label.parse_splits("train=99, valid=1") == {"train": 99.0, "valid": 1.0}


@pytest.mark.slow
def test_a_driver_killed_mid_pass_resumes_to_the_uninterrupted_labels(tmp_path, capsys):
    """SIGKILL the label driver and its Ray after some shards are committed: the rerun
    labels only the rest, and every label file equals the uninterrupted run's bytes.

    The killed driver and its resumption are fresh interpreters, each starting its own Ray;
    the uninterrupted run and the run that finds nothing left to do are ``label.main``
    (what ``python -m pipelines.label`` runs) in this process, on the Ray (2 CPUs, as
    ``--num-cpus 2`` gives) that made the root."""
    import ray

    from shards import synthetic
    from shards.plan import ShardingOptions
    from shards.ray_sharding import run as shard
    from units.features.extractors import ExtractorOptions
    from units.features.sampling import SampleRequest
    from units.features.stage import run as extract
    from units.kmeans.estimator import KMeans
    from units.kmeans.stage import run as fit_kmeans

    corpus, root = tmp_path / "corpus", tmp_path / "root"
    synthetic.write_librispeech(
        str(corpus), speakers=4, chapters=1, utterances=6, seconds=(1.0, 3.0)
    )
    ray_tmp = tempfile.mkdtemp(prefix="up-ray-", dir="/tmp")
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, PYTHONPATH=REPO)

    def argv(name):
        return [
            "--root", str(root), "--kmeans", "km", "--name", name, "--workers", "1",
            "--num-cpus", "2",
        ]  # fmt: skip

    def command(name):
        return [sys.executable, "-m", "pipelines.label", *argv(name)]

    def in_process(name):
        capsys.readouterr()
        code = label.main(argv(name))
        done = capsys.readouterr()
        assert code == 0, done.err[-3000:]
        return done

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        shard([str(corpus)], str(root), ShardingOptions(max_samples=2))  # 12 shards.
        extract(str(root), "mfcc", ExtractorOptions("mfcc"), SampleRequest(percent=50))
        fit_kmeans(str(root), "mfcc", "km", KMeans(16, seed=0, block_rows=1024))
        in_process("clean")

        commits = root / "labels" / "killed" / "commits"
        log = open(tmp_path / "driver.log", "wb")
        proc = subprocess.Popen(
            command("killed"), env=env, cwd=REPO, start_new_session=True, stdout=log, stderr=log
        )
        deadline = time.monotonic() + 240
        while not commits.exists() or len(list(commits.glob("*.json"))) < 2:
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no label shard committed in 240 s"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kill_ray_of(ray_tmp)
        committed = len(list(commits.glob("*.json")))
        assert 2 <= committed < 12 and not (root / "labels" / "killed" / "meta.json").exists()

        resumed = subprocess.run(
            command("killed"), env=env, cwd=REPO, capture_output=True, text=True
        )
        kill_ray_of(ray_tmp)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        meta = json.loads((root / "runs" / "label-killed.json").read_text())  # Its record.
        assert meta["shards_written"] == 12 - committed
        assert f"labelled {meta['utterances']} utterances" in resumed.stdout
        assert f"record: {root / 'runs' / 'label-killed.json'}" in resumed.stdout
        clean, killed = (root / "labels" / n / "units" for n in ("clean", "killed"))
        files = sorted(p.name for p in clean.iterdir())
        assert len(files) == 12 and sorted(p.name for p in killed.iterdir()) == files
        for name in files:
            assert (killed / name).read_bytes() == (clean / name).read_bytes(), name
        assert "nothing to do" in in_process("killed").out
    finally:
        ray.shutdown()
        kill_ray_of(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_another_extractor_is_checked_against_the_kmeans_spec_without_loading_it(
    tmp_path, capsys, monkeypatch
):
    import numpy as np

    from tests.models import save_tiny
    from units.features import extractors
    from units.features.extractors import ExtractorOptions

    directory = save_tiny(tmp_path / "hubert")
    spec = extractors.describe(ExtractorOptions(f"hf:{directory}", layer=2))
    kmeans = tmp_path / "root" / "kmeans" / "km"
    kmeans.mkdir(parents=True)  # What the label stage reads of a finished k-means.
    (kmeans / "kmeans.json").write_text(json.dumps({"spec": spec.to_json(), "fingerprint": "f"}))
    np.save(kmeans / "centroids.npy", np.zeros((4, spec.dim), np.float32))

    def refuse(options):
        raise AssertionError("the driver built an extractor")

    monkeypatch.setattr(extractors, "build", refuse)
    argv = ["--root", str(tmp_path / "root"), "--kmeans", "km", "--name", "l"]
    assert label.main([*argv, "--extractor", f"hf:{directory}", "--layer", "3"]) == 2
    assert "layer: k-means 2, extractor 3" in capsys.readouterr().err


@pytest.mark.parametrize(
    "names, message",
    [
        (["a"], "--name gives 1 label set(s) for 2 k-means: one per k-means"),
        (["a", "a"], "--name a a: the label sets must differ"),
    ],
)
def test_names_are_one_distinct_label_set_per_kmeans(tmp_path, capsys, names, message):
    argv = ["--root", str(tmp_path), "--kmeans", "k1", "k2", "--name", *names]
    assert exit_status(label.main, argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1, err
