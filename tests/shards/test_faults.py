"""Kills in the middle of the shard stage: a Ray worker, then the driver itself.

Either way the finished root must be byte-identical to an uninterrupted run, and no shard
committed before the kill may be written again.
"""

from __future__ import annotations

import filecmp
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest
import soundfile as sf

from shards.plan import ShardingOptions
from shards.ray_sharding import run
from tests.processes import kill_ray_of

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OPTS = ShardingOptions(max_samples=1)  # One input per shard: many short, separate commits.
SECONDS = 120  # Per recording: long enough that a kill lands while a shard is being written.


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Eight 48 kHz WAVs of 2 minutes: each shard takes a visible moment to transcode (its
    temporary tar is there for a few hundred milliseconds; the kills poll every 5-10 ms)."""
    root = tmp_path_factory.mktemp("long48k")
    rng = np.random.default_rng(0)
    for i in range(8):
        x = (0.05 * rng.standard_normal(48000 * SECONDS)).astype(np.float32)
        sf.write(root / f"rec{i}.wav", x, 48000, subtype="PCM_16")
    return root


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("reference")
    run([str(corpus)], str(root), OPTS)
    return root


def _outputs(root):
    """Every file under ``root`` but the CLI's run records (``runs/``: how a run went, not
    what it made; the library run of the reference writes none)."""
    files = (os.path.relpath(p, root) for p in glob.glob(f"{root}/**/*", recursive=True))
    return sorted(
        f for f in files if os.path.isfile(os.path.join(root, f)) and not f.startswith("runs/")
    )


def _same_tree(a, b):
    files_a, files_b = _outputs(a), _outputs(b)
    assert files_a == files_b
    for f in files_a:
        if f != os.path.join("manifest", "summary.json"):
            assert filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False), f


def test_a_killed_ray_worker_is_retried_and_the_result_is_identical(
    corpus, reference, tmp_path, ray_local
):
    root = tmp_path / "root"
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run([str(corpus)], str(root), OPTS)))
    thread.start()
    killed = []
    deadline = time.monotonic() + 120
    while thread.is_alive() and not killed and time.monotonic() < deadline:
        for temp in glob.glob(str(root / "shards" / ".*.tar.tmp-*")):
            pid = int(os.path.basename(temp).split(".tmp-")[1].split("-")[0])
            try:
                os.kill(pid, signal.SIGKILL)  # The worker process writing this shard.
                killed.append((temp, pid))
            except ProcessLookupError:
                continue
            break
        time.sleep(0.005)
    thread.join(timeout=300)
    assert killed, "no shard was caught in the middle of being written"
    assert result["shards"] == 8 and result["segments"] == 8
    assert not glob.glob(str(root / "**" / ".*.tmp-*"), recursive=True)
    _same_tree(reference, root)


def test_a_killed_driver_resumes_writing_only_the_missing_shards(corpus, reference, tmp_path):
    root = tmp_path / "root"
    # Marks this driver's Ray processes, so exactly they are cleaned up; short, because Ray's
    # socket paths under it must fit in 107 bytes.
    ray_tmp = tempfile.mkdtemp(prefix="up-ray-", dir="/tmp")
    env = dict(os.environ, RAY_TMPDIR=str(ray_tmp), PYTHONPATH=REPO)
    cmd = [
        sys.executable,
        "-m",
        "pipelines.shard",
        "--input",
        str(corpus),
        "--output",
        str(root),
        "--max-samples",
        "1",
        "--num-cpus",
        "2",
        "--no-progress",
    ]
    log = open(tmp_path / "driver.log", "wb")
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True, stdout=log, stderr=log)
    commits = str(root / "manifest" / "parts" / "*.commit.json")
    deadline = time.monotonic() + 180
    while not glob.glob(commits) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kill_ray_of(ray_tmp)  # A worker may finish its shard after the driver died: fine.
    committed = sorted(glob.glob(commits))
    assert 1 <= len(committed) < 8, f"{len(committed)} shards committed when the driver died"
    assert not os.path.exists(root / "manifest" / "utterances.parquet")
    kept = {p: os.stat(p).st_mtime_ns for p in committed}
    kept.update(
        {
            p.replace("manifest/parts", "shards").replace(".commit.json", ".tar"): os.stat(
                p.replace("manifest/parts", "shards").replace(".commit.json", ".tar")
            ).st_mtime_ns
            for p in committed
        }
    )
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    kill_ray_of(ray_tmp)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resuming: {len(committed)} shards already committed" in out.stderr
    assert {p: os.stat(p).st_mtime_ns for p in kept} == kept  # Committed work is never redone.
    _same_tree(reference, root)
    again = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    kill_ray_of(ray_tmp)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert again.returncode == 0 and "nothing to do" in again.stdout
