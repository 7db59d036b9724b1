"""``python -m pipelines.bestrq`` as a user runs it: on a 2-node cluster, killed and resumed."""

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


@pytest.mark.slow
def test_on_a_two_node_cluster_a_killed_driver_resumes_to_the_clean_runs_bytes(tmp_path):
    """The clean run and a run whose driver is SIGKILLed after two label shards, then
    rerun, all on a simulated 2-node cluster: same quantizer, same label files, byte for
    byte, and the rerun labels only what the killed one had not committed."""
    from shards import synthetic
    from shards.plan import ShardingOptions
    from shards.ray_sharding import run as shard
    from tests.clusters import simulated_cluster, wait_for_cpus
    from units.bestrq.quantizer import QuantizerConfig
    from units.bestrq.stage import run as run_bestrq
    from units.features.sampling import SampleRequest

    corpus, root = tmp_path / "corpus", tmp_path / "root"
    synthetic.write_librispeech(
        str(corpus), speakers=4, chapters=1, utterances=5, seconds=(1.0, 3.0)
    )
    options = ["--codebook-size", "256", "--percent", "50", "--seed", "3", "--workers", "2"]
    with simulated_cluster("up-rq-", 2) as cluster:
        shard([str(corpus)], str(root), ShardingOptions(max_samples=2))  # 10 shards.
        config, sample = QuantizerConfig(codebook_size=256, seed=3), SampleRequest(50, seed=3)
        clean = run_bestrq(str(root), "clean", config=config, sample=sample, workers=2)
        assert clean["utterances"] == 20 and len(clean["shards"]) == 10

        env = dict(os.environ, PYTHONPATH=REPO)
        command = [
            sys.executable, "-m", "pipelines.bestrq", "--root", str(root), "--name", "killed",
            *options, "--address", cluster.address,
        ]  # fmt: skip
        commits = root / "labels" / "killed" / "commits"
        log = open(tmp_path / "driver.log", "wb")
        proc = subprocess.Popen(
            command, env=env, cwd=REPO, start_new_session=True, stdout=log, stderr=log
        )
        deadline = time.monotonic() + 300
        while not commits.exists() or len(list(commits.glob("*.json"))) < 2:
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no label shard committed in 300 s"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        committed = len(list(commits.glob("*.json")))
        assert 2 <= committed < 10 and not (root / "labels" / "killed" / "meta.json").exists()
        wait_for_cpus(2)  # The killed driver's actors are gone.

        done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "bestrq: labelled 20 utterances" in done.stdout
        record = json.loads((root / "runs" / "bestrq-killed.json").read_text())
        assert record["shards_written"] == 10 - committed
        assert record["quantizer"]["fingerprint"] == clean["quantizer"]["fingerprint"]
        a, b = (root / "labels" / n / "units" for n in ("clean", "killed"))
        files = sorted(p.name for p in a.iterdir())
        assert len(files) == 10 and sorted(p.name for p in b.iterdir()) == files
        for name in files:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
        again = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
        assert "nothing to do" in again.stdout, again.stderr[-3000:]
