"""How driver costs grow with the number of utterances, stage by stage (issue 15's method).

Each step runs in a fresh interpreter per N, so its peak RSS (``VmHWM``) is its own; the
script prints, per step and N, wall seconds, driver CPU seconds and peak RSS, each per 1,000
utterances, then the growth exponent fitted over N (log time against log N; 1.0 is linear).
The target is an exponent of at most 1.05 for time; memory should be flat above a fixed base.

Steps so far (the others of issue 15 join this table as they are made flat):

* ``discover``: reading an input list (``list.csv`` of N rows: path, key, speaker) into
  sources, as ``pipelines.shard`` does before any audio is touched. No audio is needed.
* ``worker``: a feature worker's peak RSS while it writes one shard of 0.1 and of 1 audio
  hour (generated demo speech, one shard each; ``VmHWM`` reset after the worker's set-up),
  against the same measurement at ``--baseline-rev`` (a git revision with the same
  ``units.stage`` engine, checked out into a temporary worktree): the worker's memory should
  not grow with the shard.

Example:
    python bench/scale.py                       # N = 1e3, 1e4, 1e5, 1e6
    python bench/scale.py --sizes 1000 10000000 # up to Libri-light's 7M segments and beyond
    python bench/scale.py --steps worker --baseline-rev bc7b0af  # before lazy decoding
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

from _common import REPO, prepare

TARGET_EXPONENT = 1.05


def _write_list(directory: str, n: int) -> str:
    path = os.path.join(directory, f"list-{n}.csv")
    with open(path, "w") as f:
        f.write("path,key,speaker\n")
        for i in range(n):
            f.write(f"audio/{i // 1000:05d}/utt{i:08d}.flac,utt{i:08d},spk{i % 997}\n")
    return path


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(step: str, n: int, directory: str) -> None:
    """One step at one N, in this fresh process; prints its measurements as JSON."""
    prepare()
    if step != "discover":
        raise SystemExit(f"unknown step {step!r}")
    from shards.discover import discover  # Imports are not the step's cost.

    path = _write_list(directory, n)
    base_rss = _peak_rss_mb()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    found = discover(path)
    assert len(found.sources) == n, (len(found.sources), n)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    print(json.dumps({"wall": wall, "cpu": cpu, "rss": _peak_rss_mb(), "base_rss": base_rss}))


_WORKER_CHILD = """
import json, os, sys
import pyarrow.parquet as pq
from units.features.extractors import ExtractorOptions
from units.features.stage import FeatureWorker
from units.features.store import store_layout
from units.stage import ShardActor
import units.stage

root, name = sys.argv[1], sys.argv[2]
# A revision without this layout would fall through to the installed checkout's modules.
assert units.stage.__file__.startswith(os.getcwd()), units.stage.__file__
rows = pq.read_table(os.path.join(root, "manifest", "utterances.parquet")).to_pylist()
layout = store_layout(root, name)
layout.make_dirs()
actor = ShardActor(layout, FeatureWorker, (ExtractorOptions("mfcc"),), {}, "cpu")

def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024

setup = peak_mb()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # Resets VmHWM to the current RSS: what follows is the shard's work alone.
actor.process_shard(rows[0]["shard"], rows)
print(json.dumps({"setup_mb": setup, "peak_mb": peak_mb()}))
"""


def worker_memory(baseline_rev: str | None) -> None:
    """RESULT lines of a feature worker's peak RSS on a 0.1 h and a 1 h shard."""
    import ray

    from pipelines.demo.corpus import write_demo_corpus
    from shards.plan import ShardingOptions, parse_size
    from shards.ray_sharding import run as shard

    with tempfile.TemporaryDirectory() as directory:
        roots = {}
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        for minutes in (6, 60):
            corpus = os.path.join(directory, f"corpus{minutes}")
            write_demo_corpus(corpus, minutes=minutes, seed=0)
            roots[minutes] = os.path.join(directory, f"root{minutes}")
            one_shard = ShardingOptions(shard_bytes=parse_size("4GiB"), max_samples=1_000_000)
            shard([corpus], roots[minutes], one_shard)
        ray.shutdown()
        trees = {"ours": REPO}
        if baseline_rev:
            trees["baseline"] = os.path.join(directory, "baseline")
            subprocess.run(["git", "worktree", "add", "--detach", trees["baseline"], baseline_rev],
                           cwd=REPO, check=True, capture_output=True)  # fmt: skip
        try:
            for who, tree in trees.items():
                peaks = {}
                for minutes, root in roots.items():
                    out = subprocess.run(
                        [sys.executable, "-c", _WORKER_CHILD, root, f"{who}{minutes}"],
                        capture_output=True, text=True, check=True, cwd=tree,
                        env=dict(os.environ, PYTHONPATH=tree),
                    )  # fmt: skip
                    peaks[minutes] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
                    print(f"RESULT scale.worker.{who} shard_hours={minutes / 60:.1f} "
                          f"peak_rss_mb={peaks[minutes]:.0f}", flush=True)  # fmt: skip
                print(f"RESULT scale.worker.{who} peak_1h_over_0.1h={peaks[60] / peaks[6]:.3f} "
                      "target<=1.10", flush=True)  # fmt: skip
        finally:
            if baseline_rev:
                subprocess.run(["git", "worktree", "remove", "--force", trees["baseline"]],
                               cwd=REPO, capture_output=True)  # fmt: skip


def exponent(points: list[tuple[int, float]]) -> float:
    """The least-squares slope of log(value) against log(N)."""
    xs = [math.log(n) for n, _ in points]
    ys = [math.log(max(v, 1e-9)) for _, v in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", nargs="+", default=["discover"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1_000, 10_000, 100_000, 1_000_000])
    parser.add_argument("--baseline-rev", help="git revision to measure beside (worker step)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2])
        return 0
    prepare()
    for step in args.steps:
        if step == "worker":
            worker_memory(args.baseline_rev)
            continue
        points = []
        for n in args.sizes:
            with tempfile.TemporaryDirectory() as directory:
                out = subprocess.run(
                    [sys.executable, __file__, "--child", step, str(n), directory],
                    capture_output=True, text=True, cwd=REPO, check=True,
                )  # fmt: skip
            m = json.loads(out.stdout.strip().splitlines()[-1])
            points.append((n, m))
            print(
                f"RESULT scale.{step} n={n} wall_s={m['wall']:.3f} "
                f"wall_ms_per_1k={1000 * m['wall'] / n * 1000:.2f} "
                f"cpu_ms_per_1k={1000 * m['cpu'] / n * 1000:.2f} "
                f"peak_rss_mb={m['rss']:.0f} rss_kb_per_1k_above_start="
                f"{(m['rss'] - m['base_rss']) * 1024 / n * 1000:.1f}",
                flush=True,
            )
        fitted = exponent([(n, m["wall"]) for n, m in points])
        print(
            f"RESULT scale.{step} time_exponent={fitted:.3f} target<={TARGET_EXPONENT} "
            f"ratio={fitted / TARGET_EXPONENT:.3f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
