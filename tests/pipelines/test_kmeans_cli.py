"""``python -m pipelines.kmeans`` as a user runs it, including a driver killed mid-fit, and
whether its workers hold their rows or stream them."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines import kmeans
from tests.pipelines.cli_runs import exit_status
from tests.processes import kill_ray_of
from tests.stores import write_store

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit) as done:
        kmeans.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "python -m pipelines.kmeans --root" in out and "--pca 512" in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--k", "0"], "n_clusters=0 must be a positive integer"),
        (["--k", "65537"], "n_clusters=65537 must be at most 65536: units are stored as uint16"),
        (["--k", "5", "--pca", "0"], "argument --pca: must be >= 1, got 0"),
        (["--k", "5", "--max-iter", "0"], "max_iter=0 must be >= 1"),
        (["--k", "5", "--tol", "-1"], "tol=-1.0 must be >= 0"),
        (["--k", "5", "--workers", "0"], "argument --workers: must be >= 1, got 0"),
        (["--k", "5"], "no finished feature store 'mfcc'"),
        (
            ["--k", "5", "--rows", "keep"],
            "argument --rows: expected one of auto, hold, stream, got 'keep'",
        ),
        (
            ["--k", "5", "--stream", "--rows", "hold"],
            "--stream is --rows stream, and --rows hold says the opposite: give one of them",
        ),
    ],
)
def test_bad_arguments_exit_2_before_starting_ray(tmp_path, capsys, args, message):
    argv = ["--root", str(tmp_path), "--features", "mfcc", "--name", "km", *args]
    assert exit_status(kmeans.main, argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1, err


def _iterations_agree(root, run) -> None:
    """One count of k-means iterations everywhere: the DEBUG log, iterations.parquet, the
    report's inertia figure, kmeans.json and the summary. Iteration 0 is the initial
    centroids; iteration i, the centroids after i updates."""
    from units.quality.report import kmeans_iterations

    out = root / "kmeans" / "km"
    done = json.loads((out / "kmeans.json").read_text())
    n = done["iterations"]
    logged = [int(i) for i in re.findall(r"k-means iteration (\d+):", run.stderr)]
    rows = pq.read_table(out / "iterations.parquet").column("iteration").to_pylist()
    plotted, _ = kmeans_iterations(str(root), "km")
    assert 1 <= n <= 60 and logged == rows == plotted == list(range(n + 1))
    stop = "converged" if done["converged"] else "stopped at --max-iter"
    assert f", {n} iterations ({stop})" in run.stdout
    # Per-iteration lines are DEBUG, never INFO: at INFO they break the progress bar.
    assert not re.search(r" INFO .*k-means iteration", run.stderr)


def _checkpoint_iteration(path: str) -> int:
    try:
        with open(path, "rb") as f:
            data = f.read()
        with np.load(io.BytesIO(data)) as saved:
            return json.loads(str(saved["state"]))["iteration"]
    except (OSError, ValueError, KeyError, EOFError):
        return -1


@pytest.mark.slow
def test_a_driver_killed_mid_fit_resumes_to_the_uninterrupted_centroids(
    tmp_path, ray_local, capsys
):
    """The uninterrupted reference fit runs in this process (``kmeans.main``, what ``python -m
    pipelines.kmeans`` runs, on the module's Ray of 2 CPUs, as ``--num-cpus 2`` gives); the
    killed driver, its resumption and the run that finds nothing to do are fresh
    interpreters, each starting its own Ray."""
    lengths = tuple(tuple([2000] * 5) for _ in range(6))  # 60,000 frames in 6 shards.
    write_store(tmp_path / "clean", "mfcc", utterances_per_shard=lengths)
    shutil.copytree(tmp_path / "clean", tmp_path / "killed")  # The same store, unfitted.
    ray_tmp = tempfile.mkdtemp(prefix="up-ray-", dir="/tmp")
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, PYTHONPATH=REPO)

    def argv(root):
        return [
            "--root", str(root), "--features", "mfcc", "--name", "km", "--k", "64",
            "--max-iter", "60", "--tol", "0", "--num-cpus", "2",
        ]  # fmt: skip

    def command(root):
        return [sys.executable, "-m", "pipelines.kmeans", *argv(root)]

    root_logger = logging.getLogger()
    level = root_logger.level
    try:
        capsys.readouterr()
        try:
            code = kmeans.main([*argv(tmp_path / "clean"), "--log-level", "DEBUG"])
        finally:
            root_logger.setLevel(level)  # setup_logging set DEBUG for the whole process.
        captured = capsys.readouterr()
        clean = types.SimpleNamespace(stdout=captured.out, stderr=captured.err)
        assert code == 0, clean.stderr[-3000:]
        _iterations_agree(tmp_path / "clean", clean)

        out = tmp_path / "killed" / "kmeans" / "km"
        log = open(tmp_path / "driver.log", "wb")
        proc = subprocess.Popen(
            command(tmp_path / "killed"),
            env=env,
            cwd=REPO,
            start_new_session=True,
            stdout=log,
            stderr=log,
        )
        deadline = time.monotonic() + 240
        while _checkpoint_iteration(str(out / "checkpoint.npz")) < 3:
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no k-means iteration in 240 s"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kill_ray_of(ray_tmp)
        assert not (out / "kmeans.json").exists()
        killed_at = _checkpoint_iteration(str(out / "checkpoint.npz"))
        assert 3 <= killed_at < 60

        resumed = subprocess.run(
            command(tmp_path / "killed"), env=env, cwd=REPO, capture_output=True, text=True
        )
        kill_ray_of(ray_tmp)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"resuming k-means from iteration {killed_at}" in resumed.stderr
        clean_out = tmp_path / "clean" / "kmeans" / "km"
        assert (out / "centroids.npy").read_bytes() == (clean_out / "centroids.npy").read_bytes()
        stats = [pq.read_table(d / "iterations.parquet") for d in (clean_out, out)]
        assert stats[0].column("inertia").to_pylist() == stats[1].column("inertia").to_pylist()
        done = [json.loads((d / "kmeans.json").read_text()) for d in (clean_out, out)]
        assert done[0]["inertia"] == done[1]["inertia"]

        again = subprocess.run(
            [*command(tmp_path / "killed"), "-q"], env=env, cwd=REPO, capture_output=True,
            text=True,
        )  # fmt: skip
        assert again.returncode == 0 and "nothing to do" in again.stdout
        assert " INFO " not in again.stderr and " INFO " in resumed.stderr  # -q
        record = json.loads((tmp_path / "killed" / "runs" / "kmeans-km.json").read_text())
        assert record["written"] is False and record["inertia"] == done[1]["inertia"]
    finally:
        kill_ray_of(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_rows_help_agrees_with_the_library():
    """--help imports no numerics, so it spells the choices and the margin itself."""
    from units.kmeans import memory

    assert kmeans.ROWS == memory.ROWS
    margin = f"{memory.MEMORY_MARGIN:.0%}"
    assert f"at most {margin} of the memory" in kmeans.OPTIONS["rows"].help.replace("%%", "%")
    assert f"takes at most {margin} of" in kmeans.__doc__


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("rows")
    write_store(root, "mfcc")  # 2,000 frames of 39-d.
    return root


def _fit(root, name: str, *flags: str) -> dict:
    argv = [
        "--root", str(root), "--features", "mfcc", "--name", name, "--k", "12",
        "--max-iter", "3", "--workers", "2", "--no-progress", *flags,
    ]  # fmt: skip
    assert kmeans.main(argv) == 0
    return json.loads((root / "runs" / f"kmeans-{name}.json").read_text())


@pytest.mark.usefixtures("ray_local")
def test_rows_auto_holds_a_small_store_and_the_record_says_why(tiny_root, capsys):
    record = _fit(tiny_root, "auto", "--rows", "auto")
    decision = record["rows_decision"]
    assert decision["rows"] == "hold" and decision["requested"] == "auto"
    assert decision["fits"] is True and decision["frames"] == 2000 and decision["dim"] == 39
    assert decision["hold_bytes"] == 2000 * (4 * 39 + 12)
    assert 0 < decision["hold_bytes_per_worker"] <= decision["budget"]
    assert decision["memory_per_worker"] > 0 and decision["cluster_memory"] > 0
    done = capsys.readouterr()
    assert "rows hold" in done.out
    logged = re.search(
        r" INFO units\.kmeans\.stage: k-means rows: hold \(decided\): (.*)", done.err
    )
    assert logged and "within 70% of the" in logged.group(1), done.err
    assert done.err.index(logged.group(0)) < done.err.index("k-means||:")  # Before any work.
    assert " WARNING " not in done.err


@pytest.mark.usefixtures("ray_local")
def test_stream_still_streams(tiny_root, capsys):
    record = _fit(tiny_root, "stream", "--stream")
    assert record["rows_decision"]["rows"] == record["rows_decision"]["requested"] == "stream"
    done = capsys.readouterr()
    assert "k-means rows: stream (asked for)" in done.err and "rows stream" in done.out
    held = _fit(tiny_root, "hold", "--rows", "hold")
    assert held["rows_decision"]["rows"] == "hold"
    # The same rows, the same fit, held or streamed.
    assert held["inertia"] == record["inertia"]
