"""How driver costs grow with the number of utterances, stage by stage (issue 15's method).

Each step runs in a fresh interpreter per N, so its peak RSS (``VmHWM``, reset before each
stage through ``/proc/self/clear_refs``) is its own; the script prints, per stage and N,
wall seconds, driver CPU seconds and the driver's peak RSS above its RSS at the stage's
start, each per 1,000 utterances, the peak RSS of Ray's worker processes (sampled), then
per stage the growth exponents fitted over N (log cost against log N; 1.0 is linear, the
target is at most 1.05: flat per utterance).

Steps:

* ``discover``: reading an input list (``list.csv`` of N rows: path, key, speaker) into
  sources, as ``pipelines.shard`` does before any audio is touched. No audio: up to 1e7.
* ``plan``: deduping, ordering and packing N probed inputs into shards and saving the plan
  (``shards.plan.make_plan`` and ``save``, the driver's part of the shard stage after the
  probe tasks). No audio: up to 1e7. ``plan_vad`` is Libri-light's shape: N segments from
  N/32 files (220k files make 7M segments), each planned row a file with 32 VAD segments.
* ``export``: the fairseq export (``.tsv``/``.km``, streamed shard by shard) of a label set
  of N utterances of 5 frames each, in shards of 2,000 (synthetic manifests and units, no
  audio). Up to 1e7.
* ``stages``: the whole pipeline on N tiny utterances (0.1 s each, ``--seconds`` for
  others, e.g. 30 as Libri-light's segments; from a list of 100 generated FLAC files,
  shards of 500 as in the issue): shard, features (MFCC, 10%), k-means (k=16,
  5 iterations), label, fairseq export, report; each stage measured apart.
* ``worker``: a feature worker's and a label worker's peak RSS while they write one shard
  of 0.1 GiB and of 1 GiB (generated demo speech, repeated under new keys; ``VmHWM`` reset
  after the worker's set-up), against the same measurement at ``--baseline-rev`` (a git
  revision with the same ``units.stage`` engine, checked out into a temporary worktree):
  the worker's memory should not grow with the shard.

Example:
    python bench/scale.py --steps discover plan export --sizes 10000 100000 1000000 10000000
    python bench/scale.py --steps stages --sizes 10000 100000 1000000
    python bench/scale.py --steps stages --sizes 1000 4000 --seconds 30
    python bench/scale.py --steps worker --baseline-rev bc7b0af  # before lazy decoding
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

from _common import REPO, prepare

TARGET_EXPONENT = 1.05

#: Utterances per shard where the step makes its own shards (Libri-light: ~1,750).
EXPORT_SHARD = 2_000


def _write_list(directory: str, n: int, audio_files: int | None = None) -> str:
    """``list.csv`` of N rows; with ``audio_files`` its paths cycle over that many files
    (``audio/aI.flac``), else each row names its own (absent) file."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    def text(values: np.ndarray, width: int = 0) -> pa.Array:
        strings = pa.array(values).cast(pa.string())
        return pc.utf8_lpad(strings, width, "0") if width else strings

    index = np.arange(n)
    digits = text(index, 8)
    if audio_files:
        audio = pc.binary_join_element_wise("audio/a", text(index % audio_files), ".flac", "")
    else:
        audio = pc.binary_join_element_wise(
            "audio/", text(index // 1000, 5), "/utt", digits, ".flac", ""
        )
    table = pa.table({
        "path": audio,
        "key": pc.binary_join_element_wise("utt", digits, ""),
        "speaker": pc.binary_join_element_wise("spk", text(index % 997), ""),
    })  # fmt: skip
    path = os.path.join(directory, f"list-{n}.csv")
    pacsv.write_csv(table, path)
    return path


def _status_mb(field: str, pid: str = "self") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _descendants(root: int) -> list[str]:
    """Processes under ``root`` (this driver's local Ray: its raylet and workers), not
    those of another Ray on the same machine."""
    children = collections.defaultdict(list)
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    parent = f.read().rsplit(")", 1)[1].split()[1]
                children[parent].append(pid)
            except (OSError, IndexError):
                continue
    found, todo = [], [str(root)]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


class _WorkerPeak:
    """The largest RSS of any Ray worker process (``ray::`` in its command line) seen while
    it runs, sampled every 0.2 s (a worker's own high-water mark dies with it)."""

    def __init__(self):
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            for pid in _descendants(os.getpid()):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if not f.read(5).startswith(b"ray::"):
                            continue
                    self.peak_mb = max(self.peak_mb, _status_mb("VmRSS", pid))
                except (OSError, ValueError):
                    continue  # Gone meanwhile.

    def __enter__(self) -> _WorkerPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _measure(stage: str, fn) -> dict:
    """Runs ``fn`` and prints its wall and CPU seconds and peak RSS as a JSON line."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS now: the peak that follows is this stage's.
    base = _status_mb("VmRSS")
    cpu0, wall0 = time.process_time(), time.perf_counter()
    with _WorkerPeak() as workers:
        fn()
    m = {
        "stage": stage,
        "wall": time.perf_counter() - wall0,
        "cpu": time.process_time() - cpu0,
        "rss": _status_mb("VmHWM"),
        "base_rss": base,
        "worker_rss": workers.peak_mb,
    }
    print(json.dumps(m), flush=True)
    return m


def _discover_step(n: int, directory: str) -> None:
    from shards.discover import discover  # Imports are not the step's cost.

    path = _write_list(directory, n)
    found = []
    _measure("discover", lambda: found.append(discover(path)))
    assert found[0].table.num_rows == n, (found[0].table.num_rows, n)


def _plan_step(n: int, directory: str) -> None:
    """Whole files (N rows), then Libri-light's shape: N/32 files of 32 VAD segments each."""
    _plan_rows(n, directory, "plan", segments=1)
    _plan_rows(n, directory, "plan_vad", segments=32)


def _plan_rows(n_segments: int, directory: str, stage: str, segments: int) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    from shards import plan as planning
    from shards.root import RootLayout

    n = n_segments // segments
    digits = pc.utf8_lpad(pa.array(range(n), pa.int64()).cast(pa.string()), 8, "0")
    key = pc.binary_join_element_wise("utt", digits, "")
    # Reversed: the plan sorts them.
    key = key.take(pa.array(range(n - 1, -1, -1), pa.int64()))
    source = pc.binary_join_element_wise("/corpus/audio/", key, ".flac", "")
    const = {
        "sidecar": pa.nulls(n, pa.string()), "speaker": pc.utf8_slice_codeunits(key, 0, 7),
        "group": pa.nulls(n, pa.string()), "text": pa.nulls(n, pa.string()),
        "frames": pa.repeat(16000, n), "sample_rate": pa.repeat(16000, n),
        "channels": pa.repeat(1, n), "format": pa.repeat("FLAC", n),
        "subtype": pa.repeat("PCM_16", n), "file_bytes": pa.repeat(30000, n),
        "passthrough": pa.repeat(segments == 1, n),
        "est_bytes": pa.repeat(32048 * segments, n), "est_samples": pa.repeat(segments, n),
    }  # fmt: skip
    rows = pa.table({"key": key, "source": source, **const}).cast(planning.PROBED)
    layout = RootLayout(os.path.join(directory, stage))
    layout.make_dirs()
    opts = planning.ShardingOptions(
        segment="vad" if segments > 1 else "none", max_samples=EXPORT_SHARD
    )

    def plan() -> None:
        made = planning.make_plan(rows, [], opts, {"files": n})
        planning.save(layout, made)
        per_shard = EXPORT_SHARD // segments
        assert made.meta["planned"] == n and len(made.shards) == -(-n // per_shard)

    _measure(stage, plan)


def _export_step(n: int, directory: str) -> None:
    import io
    import tarfile

    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import soundfile as sf

    from shards.core.atomic import write_atomic
    from shards.root import RootLayout
    from shards.schemas import UTTERANCES
    from units.labels import fairseq
    from units.labels.model import label_layout
    from units.schemas import LABELS

    root = RootLayout(os.path.join(directory, "root"))
    root.make_dirs()
    labels = label_layout(root.root, "units")
    os.makedirs(os.path.dirname(labels.shard_path("units", "000000")), exist_ok=True)
    frames = 5
    samples = frames * 320 + 80  # 5 frames at 50 Hz.
    # The export reads every line back (seek, read, decode) as fairseq would: every row of a
    # shard points at the one real FLAC member of one small tar, which all shards share
    # (10 million real members would be 25 GB of disk for the same per-row driver work).
    member = io.BytesIO()
    sf.write(member, np.sin(np.arange(samples) / 5.0) * 0.3, 16000, format="FLAC")
    shared_tar = os.path.join(directory, "one-member.tar")
    with tarfile.open(shared_tar, "w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("x.flac")
        info.size = len(member.getvalue())
        member.seek(0)
        tar.addfile(info, member)
    offset, size = 512, info.size  # The data of a tar's first member follows its header.
    with pq.ParquetWriter(root.manifest("utterances.parquet"), UTTERANCES) as manifest:
        for first in range(0, n, EXPORT_SHARD):
            m = min(EXPORT_SHARD, n - first)
            shard = f"{first // EXPORT_SHARD:06d}"
            index = pa.array(np.arange(first, first + m))
            key = pc.binary_join_element_wise(
                "utt", pc.utf8_lpad(index.cast(pa.string()), 8, "0"), ""
            )
            os.symlink(shared_tar, root.shard_path(first // EXPORT_SHARD))
            manifest.write_table(pa.table({
                "key": key, "shard": pa.repeat(shard, m),
                "offset": pa.repeat(offset, m), "size": pa.repeat(size, m),
                "num_samples": pa.repeat(samples, m), "sample_rate": pa.repeat(16000, m),
                "duration": pa.repeat(samples / 16000, m),
                "source": pc.binary_join_element_wise("/corpus/", key, ".flac", ""),
                "start": pa.repeat(0.0, m), "end": pa.repeat(samples / 16000, m),
                "speaker": pa.repeat("s", m), "group": pa.nulls(m, pa.string()),
                "sha256": pa.repeat("0" * 64, m), "original_sample_rate": pa.repeat(16000, m),
                "original_channels": pa.repeat(1, m), "passthrough": pa.repeat(True, m),
            }, schema=UTTERANCES))  # fmt: skip
            units = pa.ListArray.from_arrays(
                pa.array(np.arange(0, (m + 1) * frames, frames, dtype=np.int32)),
                pa.array((np.arange(m * frames) % 100).astype(np.uint16)),
            )
            pq.write_table(pa.table({
                "key": key, "shard": pa.repeat(shard, m), "units": units,
                "frames": pa.repeat(frames, m).cast(pa.int32()),
                "frame_rate": pa.repeat(50.0, m).cast(pa.float32()),
            }, schema=LABELS), labels.shard_path("units", shard))  # fmt: skip
    write_atomic(labels.path("meta.json"), json.dumps(
        {"k": 100, "kmeans": "km", "frame_rate": 50.0}).encode())  # fmt: skip
    record = []
    splits = {"train": 99, "valid": 1}
    _measure("export", lambda: record.append(fairseq.export(root.root, "units", splits)))
    assert sum(record[0]["splits"].values()) == n, record


def _write_tiny_audio(directory: str, files: int, seconds: float) -> None:
    import numpy as np
    import soundfile as sf

    os.makedirs(os.path.join(directory, "audio"), exist_ok=True)
    t = np.arange(round(seconds * 16000)) / 16000
    rng = np.random.default_rng(0)
    for i in range(files):
        wav = 0.3 * np.sin(2 * np.pi * (120 + 37 * i) * t) + 0.02 * rng.standard_normal(len(t))
        sf.write(os.path.join(directory, "audio", f"a{i}.flac"), wav, 16000, subtype="PCM_16")


def _stages_step(n: int, directory: str, seconds: float) -> None:
    import ray

    from shards.plan import ShardingOptions
    from shards.ray_sharding import run as shard
    from units.features.extractors import ExtractorOptions
    from units.features.sampling import SampleRequest
    from units.features.stage import run as extract
    from units.kmeans.estimator import KMeans
    from units.kmeans.stage import StageOptions
    from units.kmeans.stage import run as fit
    from units.labels import fairseq
    from units.labels.stage import run as label
    from units.quality import report

    _write_tiny_audio(directory, 100, seconds)
    path = _write_list(directory, n, audio_files=100)
    root = os.path.join(directory, "root")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        _measure("shard", lambda: shard([path], root, ShardingOptions(max_samples=500)))
        _measure("features", lambda: extract(root, "mfcc", ExtractorOptions("mfcc"),
                                             SampleRequest(percent=10)))  # fmt: skip
        _measure("kmeans", lambda: fit(root, "mfcc", "km", KMeans(16, max_iter=5, seed=0),
                                       StageOptions()))  # fmt: skip
        _measure("label", lambda: label(root, "km", "units"))
        _measure("export", lambda: fairseq.export(root, "units", {"train": 99, "valid": 1}))
        _measure("report", lambda: report.write(report.build(root, "units"),
                                                os.path.join(directory, "report")))  # fmt: skip
    finally:
        ray.shutdown()


STEPS = {
    "discover": _discover_step,
    "plan": _plan_step,
    "export": _export_step,
    "stages": _stages_step,
}


def child(step: str, n: int, directory: str, seconds: float) -> None:
    """One step at one N, in this fresh process; prints one JSON line per stage measured."""
    prepare()
    if step == "stages":
        _stages_step(n, directory, seconds)
    else:
        STEPS[step](n, directory)


_WORKER_CHILD = """
import json, os, sys
import pyarrow.parquet as pq
from units.stage import ShardActor
import units.stage

root, kind, name = sys.argv[1], sys.argv[2], sys.argv[3]
# A revision without this layout would fall through to the installed checkout's modules.
assert units.stage.__file__.startswith(os.getcwd()), units.stage.__file__
rows = pq.read_table(os.path.join(root, "manifest", "utterances.parquet"))
shard = rows.column("shard")[0].as_py()
if not hasattr(units.stage, "as_rows"):  # A revision whose actors take rows as dicts only.
    rows = rows.to_pylist()
if kind == "features":
    from units.features.extractors import ExtractorOptions
    from units.features.stage import FeatureWorker
    from units.features.store import store_layout
    layout = store_layout(root, name)
    actor = ShardActor(layout, FeatureWorker, (ExtractorOptions("mfcc"),), {}, "cpu")
else:
    from units.labels.model import label_layout
    from units.labels.stage import LabelWorker
    layout = label_layout(root, name)
    actor = ShardActor(layout, LabelWorker, (root, "km"), {}, "cpu")
layout.make_dirs()

def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024

setup = peak_mb()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # Resets VmHWM to the current RSS: what follows is the shard's work alone.
actor.process_shard(shard, rows)
print(json.dumps({"setup_mb": setup, "peak_mb": peak_mb()}))
"""

#: The two shard sizes of the worker step, GiB of stored FLAC.
WORKER_SHARDS_GIB = (0.1, 1.0)


def _one_shard_root(directory: str, corpus: str, gib: float) -> str:
    """A root whose one shard holds ``gib`` GiB: the corpus's files repeated under new keys
    (a list), stored as they are; with a small k-means for the label worker."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from shards.plan import ShardingOptions, parse_size
    from shards.ray_sharding import run as shard
    from units.features.extractors import ExtractorOptions
    from units.features.sampling import SampleRequest
    from units.features.stage import run as extract
    from units.kmeans.estimator import KMeans
    from units.kmeans.stage import StageOptions
    from units.kmeans.stage import run as fit

    files = pq.read_table(os.path.join(corpus, "manifest", "utterances.parquet"),
                          columns=["source", "key"]).to_pylist()  # fmt: skip
    sizes = [os.path.getsize(f["source"]) for f in files]
    repeats = max(1, round(gib * 2**30 / sum(sizes)))
    rows = [{"path": f["source"], "key": f"{f['key']}_r{r}", "speaker": "s"}
            for r in range(repeats) for f in files]  # fmt: skip
    listed = os.path.join(directory, f"list-{gib}.csv")
    pacsv.write_csv(pa.Table.from_pylist(rows), listed)
    root = os.path.join(directory, f"root-{gib}")
    one_shard = ShardingOptions(shard_bytes=parse_size("8GiB"), max_samples=10**7)
    shard([listed], root, one_shard)
    extract(root, "mfcc", ExtractorOptions("mfcc"), SampleRequest(hours=0.05))
    fit(root, "mfcc", "km", KMeans(8, max_iter=3, seed=0), StageOptions())
    return root


def worker_memory(baseline_rev: str | None) -> None:
    """RESULT lines of a feature and a label worker's peak RSS on a 0.1 and a 1 GiB shard."""
    import ray

    from pipelines.demo.corpus import write_demo_corpus
    from shards.ray_sharding import run as shard

    with tempfile.TemporaryDirectory() as directory:
        corpus = os.path.join(directory, "corpus")
        write_demo_corpus(corpus, minutes=6, seed=0)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        base = os.path.join(directory, "base")
        shard([corpus], base)  # Its manifest lists the corpus's files and keys.
        roots = {gib: _one_shard_root(directory, base, gib) for gib in WORKER_SHARDS_GIB}
        ray.shutdown()
        trees = {"ours": REPO}
        if baseline_rev:
            trees["baseline"] = os.path.join(directory, "baseline")
            subprocess.run(["git", "worktree", "add", "--detach", trees["baseline"], baseline_rev],
                           cwd=REPO, check=True, capture_output=True)  # fmt: skip
        try:
            for kind in ("features", "labels"):
                for who, tree in trees.items():
                    peaks = {}
                    for gib, root in roots.items():
                        out = subprocess.run(
                            [sys.executable, "-c", _WORKER_CHILD, root, kind, f"{who}{gib}"],
                            capture_output=True, text=True, check=True, cwd=tree,
                            env=dict(os.environ, PYTHONPATH=tree),
                        )  # fmt: skip
                        peaks[gib] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
                        print(f"RESULT scale.worker.{kind}.{who} shard_gib={gib} "
                              f"peak_rss_mb={peaks[gib]:.0f}", flush=True)  # fmt: skip
                    small, large = WORKER_SHARDS_GIB
                    print(f"RESULT scale.worker.{kind}.{who} "
                          f"peak_{large}GiB_over_{small}GiB={peaks[large] / peaks[small]:.3f} "
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


#: Driver memory below this, above the stage's start, is noise (allocator arenas, imports
#: done lazily): the fitted memory exponent counts growth above it.
MEMORY_FLOOR_MB = 8.0


def _report(n: int, m: dict) -> None:
    above = m["rss"] - m["base_rss"]
    print(
        f"RESULT scale.{m['stage']} n={n} wall_s={m['wall']:.3f} "
        f"wall_ms_per_1k={1e6 * m['wall'] / n:.2f} cpu_ms_per_1k={1e6 * m['cpu'] / n:.2f} "
        f"driver_peak_rss_mb={m['rss']:.0f} driver_rss_above_start_mb={above:.1f} "
        f"driver_kb_per_1k={above * 1024 / n * 1000:.1f} "
        f"worker_peak_rss_mb={m['worker_rss']:.0f}",
        flush=True,
    )


def _fit(stage: str, points: list[tuple[int, dict]]) -> None:
    if len(points) < 2:
        return
    wall = exponent([(n, m["wall"]) for n, m in points])
    cpu = exponent([(n, m["cpu"]) for n, m in points])
    memory = exponent([(n, max(m["rss"] - m["base_rss"], MEMORY_FLOOR_MB)) for n, m in points])
    worst = max(wall, cpu, memory)
    print(
        f"RESULT scale.{stage} time_exponent={wall:.3f} cpu_exponent={cpu:.3f} "
        f"memory_exponent={memory:.3f} target<={TARGET_EXPONENT} "
        f"ratio={worst / TARGET_EXPONENT:.3f}",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", nargs="+", default=["discover", "plan", "export"],
                        choices=[*STEPS, "worker"])  # fmt: skip
    parser.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--baseline-rev", help="git revision to measure beside (worker step)")
    parser.add_argument(
        "--seconds",
        type=float,
        default=0.1,
        help="utterance length of the stages step (0.1; 30 for Libri-light's)",
    )
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2], float(args.child[3]))
        return 0
    prepare()
    for step in args.steps:
        if step == "worker":
            worker_memory(args.baseline_rev)
            continue
        points: dict[str, list] = collections.defaultdict(list)
        for n in args.sizes:
            with tempfile.TemporaryDirectory() as directory:
                out = subprocess.run(
                    [sys.executable, __file__, "--child", step, str(n), directory,
                     str(args.seconds)],
                    capture_output=True, text=True, cwd=REPO,
                )  # fmt: skip
            if out.returncode:
                sys.stderr.write(out.stderr[-4000:])
                raise SystemExit(f"step {step} at n={n} failed")
            for line in out.stdout.splitlines():
                if line.startswith("{"):
                    m = json.loads(line)
                    if step == "stages" and args.seconds != 0.1:  # Apart from the tiny ones.
                        m["stage"] += f"_{args.seconds:g}s"
                    points[m["stage"]].append((n, m))
                    _report(n, m)
        for stage, measured in points.items():
            _fit(stage, measured)
    return 0


if __name__ == "__main__":
    sys.exit(main())
