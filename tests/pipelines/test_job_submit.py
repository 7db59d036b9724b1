"""``ray job submit`` against a real Ray head on 127.0.0.1, as a user runs the pipeline."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from pipelines.demo.corpus import write_demo_corpus
from tests.processes import kill_ray_of

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_job_submit_runs_the_hubert_pipeline_on_a_running_head(tmp_path):
    corpus, root = tmp_path / "corpus", tmp_path / "root"
    write_demo_corpus(str(corpus), minutes=0.5, speakers=2, seed=5)
    ray_tmp = tempfile.mkdtemp(prefix="up-ray-", dir="/tmp")
    gcs, dashboard = _free_port(), _free_port()
    env = dict(
        os.environ,
        RAY_TMPDIR=ray_tmp,
        PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
        RAY_ADDRESS="",  # The job gets its address from Ray, not from this environment.
    )
    env.pop("RAY_ADDRESS")
    address = f"http://127.0.0.1:{dashboard}"
    try:
        started = subprocess.run(
            [
                os.path.join(BIN, "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
                f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                "--num-cpus=2", "--disable-usage-stats",
            ],
            env=env, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert started.returncode == 0, started.stderr[-3000:]
        entrypoint = [
            "python", "-m", "pipelines.hubert", "--config", "configs/hubert-mfcc.yaml",
            f"root={root}", f"inputs=[{corpus}]", "features.percent=50", "kmeans.k=8",
            f"report.phones={corpus / 'phones.tsv'}", "label.fairseq_splits={train: 80, valid: 20}",
        ]  # fmt: skip
        submit = [
            os.path.join(BIN, "ray"), "job", "submit", "--address", address,
            "--submission-id", "unitpipe-test", "--working-dir", REPO, "--no-wait",
            "--", *entrypoint,
        ]  # fmt: skip
        for _ in range(240):  # The head's job agent comes up some seconds after `ray start`.
            submitted = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=180)
            if "No available agent" not in submitted.stderr:
                break
            time.sleep(0.5)
        assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-2000:]
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(address)
        deadline = time.monotonic() + 420
        status = client.get_job_status("unitpipe-test")
        while not status.is_terminal() and time.monotonic() < deadline:
            time.sleep(0.25)
            status = client.get_job_status("unitpipe-test")
        logs = client.get_job_logs("unitpipe-test")
        assert status == JobStatus.SUCCEEDED, f"{status}: {logs[-3000:]}"
        # The driver joined the running head (no second Ray), and every stage ran.
        assert "started in-process local Ray" not in logs
        for stage in ("shard", "features", "kmeans", "label", "fairseq"):
            assert f"== {stage}: done" in logs
        assert "units: PNMI " in logs
        metrics = json.loads((root / "reports" / "it1" / "metrics.json").read_text())
        utterances = len((corpus / "phones.tsv").read_text().splitlines())
        assert metrics["k"] == 8 and metrics["utterances"] == utterances
        assert (root / "labels" / "it1" / "fairseq" / "train.tsv").exists()
        # The same command as a driver of its own, joining the head by --address, then by
        # RAY_ADDRESS: it finds every stage complete.
        driver = [sys.executable, *entrypoint[1:]]
        for extra, extra_env in (([f"--address=127.0.0.1:{gcs}"], {}),
                                 ([], {"RAY_ADDRESS": f"127.0.0.1:{gcs}"})):  # fmt: skip
            joined = subprocess.run(
                [*driver[:3], *extra, *driver[3:]], cwd=REPO, env=dict(env, **extra_env),
                capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            out = joined.stdout + joined.stderr
            assert joined.returncode == 0, out[-3000:]
            assert "Connecting to existing Ray cluster" in out, out[-3000:]
            assert "started in-process local Ray" not in out
            for stage in ("shard", "features", "kmeans", "label"):
                assert f"== {stage}: already complete" in out
    finally:
        kill_ray_of(ray_tmp)  # Stop the head by PID (never `ray stop`: other Rays may run).
        shutil.rmtree(ray_tmp, ignore_errors=True)
