"""Benchmark of the shard stage against a plain copy (GNU tar) and lhotse's Shar export.

Two workloads on the same synthetic corpus (default 2,000 files of 3.6 s, 2.0 audio hours):

* pass-through: 16 kHz mono 16-bit FLAC, which the shard stage copies byte for byte.
  Baseline: ``tar -cf out.tar -C DIR .``, the fastest way to put the same bytes in a tar.
* transcode: the same audio as 48 kHz 16-bit WAV, which the shard stage decodes, resamples
  to 16 kHz (soxr) and encodes to FLAC. Baseline: lhotse's ``CutSet.to_shar`` with the cuts
  resampled to 16 kHz and ``recording`` stored as FLAC.

Every contender gets two cores (Ray ``num_cpus=2``; lhotse ``num_jobs=2``), a warm page
cache (all inputs are read once before each timed run) and a fresh output path. A timed span
goes from the corpus directory to finished shards: listing and probing the inputs is inside
it for us and lhotse alike. Starting Ray and importing lhotse are not.

Prints one ``RESULT`` line per workload, then a table, for example::

    RESULT bench=shards.passthrough cache=warm hours=2.00 ... ratio_vs_tar=... target=0.5
    RESULT bench=shards.passthrough cache=cold hours=2.00 ... ratio_vs_tar=... target=1.0

Usage:
    python bench/shards.py                 # full size: 2,000 files, about 2 hours
    python bench/shards.py --files 200     # quick smoke run
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import gzip
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable

import soundfile as sf
import soxr
from _common import REPO, busy_cores, prepare

prepare()

from shards.synthetic import speechlike  # noqa: E402 - after the sys.path fix above.

#: Bump when the corpus generator changes, so cached corpora are made again.
CORPUS_VERSION = 1

#: Cores given to every contender.
CORES = 2

#: Targets from the issue: ours / tar for pass-through by page cache (a warm cache is a
#: memory copy for tar, while ours also hashes and fsyncs), ours / lhotse for transcoding.
TARGET_VS_TAR = {"warm": 0.5, "cold": 1.0}
TARGET_VS_LHOTSE = 2.0

WAV_RATE = 48_000
FLAC_RATE = 16_000


# ---------------------------------------------------------------------------------------------
# Corpus


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The two copies of the benchmark audio.

    Attributes:
        flac_dir: 16 kHz mono 16-bit FLAC files (pass-through input).
        wav_dir: The same audio as 48 kHz mono 16-bit WAV files (transcoding input).
        files: Files in each directory.
        seconds: Total audio seconds in each directory.
    """

    flac_dir: str
    wav_dir: str
    files: int
    seconds: float

    @property
    def hours(self) -> float:
        return self.seconds / 3600.0


def _make_file(job: tuple[str, str, int, float]) -> float:
    """Writes file ``index`` of the corpus in both formats; returns its duration in seconds.

    Speech-like audio is made at 48 kHz and downsampled with soxr for the FLAC copy, so both
    directories hold the same signal.
    """
    flac_dir, wav_dir, index, seconds = job
    audio, _ = speechlike(seconds, rate=WAV_RATE, seed=index, pitch=100.0 + (index % 7) * 15.0)
    name = f"utt{index:06d}"
    sf.write(os.path.join(wav_dir, name + ".wav"), audio, WAV_RATE, subtype="PCM_16")
    low = soxr.resample(audio, WAV_RATE, FLAC_RATE, quality="HQ")
    sf.write(os.path.join(flac_dir, name + ".flac"), low, FLAC_RATE, subtype="PCM_16")
    return len(low) / FLAC_RATE


def build_corpus(workdir: str, files: int, seconds: float) -> Corpus:
    """Makes the corpus under ``workdir``, or reuses the one an earlier run made.

    A corpus is complete once its ``corpus.json`` exists (written last); a half-made one
    from an interrupted run is thrown away and made again.
    """
    root = os.path.join(workdir, f"corpus-{files}x{seconds:g}s")
    stamp = os.path.join(root, "corpus.json")
    want = {"version": CORPUS_VERSION, "files": files, "file_seconds": seconds}
    if os.path.exists(stamp):
        with open(stamp) as f:
            meta = json.load(f)
        if {k: meta.get(k) for k in want} == want:
            print(f"corpus: reusing {root}", flush=True)
            return Corpus(meta["flac_dir"], meta["wav_dir"], files, meta["seconds"])
    shutil.rmtree(root, ignore_errors=True)
    flac_dir, wav_dir = os.path.join(root, "flac16k"), os.path.join(root, "wav48k")
    os.makedirs(flac_dir)
    os.makedirs(wav_dir)
    print(f"corpus: making {files} files of {seconds:g} s in {root} ...", flush=True)
    started = time.perf_counter()
    jobs = [(flac_dir, wav_dir, i, seconds) for i in range(files)]
    with concurrent.futures.ProcessPoolExecutor(CORES) as pool:
        total = sum(pool.map(_make_file, jobs, chunksize=32))
    meta = dict(want, flac_dir=flac_dir, wav_dir=wav_dir, seconds=total)
    with open(stamp, "w") as f:
        json.dump(meta, f, indent=1)
    print(f"corpus: made in {time.perf_counter() - started:.1f} s", flush=True)
    return Corpus(flac_dir, wav_dir, files, total)


def build_warmup(workdir: str, corpus: Corpus) -> str:
    """A directory of two FLAC and two WAV files, for the untimed first call of the stage."""
    root = os.path.join(workdir, "warmup-input")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    for directory in (corpus.flac_dir, corpus.wav_dir):
        for path in list_files(directory)[:2]:
            shutil.copy(path, root)
    return root


def list_files(directory: str) -> list[str]:
    return sorted(os.path.join(directory, n) for n in os.listdir(directory))


def dir_bytes(directory: str) -> int:
    return sum(os.path.getsize(p) for p in list_files(directory))


def warm_cache(directory: str) -> None:
    """Reads every file once, so each contender starts from the same (warm) page cache."""
    for path in list_files(directory):
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass


DROP_CACHES = "/proc/sys/vm/drop_caches"


def can_drop_cache() -> bool:
    """Dropping the page cache needs root (and a kernel that lets this container do it)."""
    try:
        with open(DROP_CACHES, "w") as f:
            f.write("1")
        return True
    except OSError:
        return False


def cold_cache(directory: str) -> None:
    """Writes dirty pages back, then drops the page cache: every input is read from disk,
    as the first pass over a corpus on network or cold local storage reads it."""
    os.sync()
    with open(DROP_CACHES, "w") as f:
        f.write("3")


CACHES = {"warm": warm_cache, "cold": cold_cache}


def fresh_path(path: str) -> str:
    """Removes whatever an earlier run left at ``path``; the contender creates it anew."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def remove(path: str) -> None:
    """Drops a finished run's output, so the disk holds one output at a time."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def timed(fn: Callable[..., object], *args) -> tuple[float, object]:
    """Wall seconds of ``fn(*args)``, and its result."""
    started = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - started, result


# ---------------------------------------------------------------------------------------------
# Contenders


def run_ours(input_dir: str, root: str, shard_files: int) -> dict:
    """The shard stage, called as a user calls it (Ray already started)."""
    from shards.plan import ShardingOptions
    from shards.ray_sharding import run

    # Shards are cut by file count, the same count lhotse gets, never by bytes.
    opts = ShardingOptions(layout="dir", shard_bytes=1 << 40, max_samples=shard_files)
    return run([input_dir], root, opts)


def run_tar(input_dir: str, out_tar: str, fsync: bool) -> None:
    """GNU tar of the directory; with ``fsync``, the tar is also flushed to disk, as ours is."""
    subprocess.run(["tar", "-cf", out_tar, "-C", input_dir, "."], check=True)
    if fsync:
        fd = os.open(out_tar, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def run_lhotse(wav_dir: str, out_dir: str, shard_files: int) -> dict:
    """lhotse from the directory scan to a finished Shar export at 16 kHz FLAC."""
    from lhotse import CutSet, RecordingSet

    recordings = RecordingSet.from_dir(wav_dir, "*.wav", num_jobs=CORES)
    cuts = CutSet.from_manifests(recordings=recordings).resample(FLAC_RATE)
    return cuts.to_shar(
        out_dir, fields={"recording": "flac"}, shard_size=shard_files, num_jobs=CORES
    )


def lhotse_child(wav_dir: str, out_dir: str, shard_files: int) -> None:
    """Entry point of the lhotse subprocess: times :func:`run_lhotse`, prints JSON.

    lhotse forks worker pools, and a fork of a process that holds Ray's gRPC threads can
    hang, so lhotse runs in a process of its own. The clock starts after its imports, as
    ours starts after ``ray.init``.
    """
    import lhotse  # noqa: F401 - imported before the clock starts.

    seconds, paths = timed(run_lhotse, wav_dir, out_dir, shard_files)
    print(json.dumps({"seconds": seconds, "paths": paths}), flush=True)


def run_lhotse_subprocess(wav_dir: str, out_dir: str, shard_files: int) -> tuple[float, dict]:
    """Runs :func:`lhotse_child` in a fresh interpreter; returns its seconds and output paths."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--lhotse-child",
        wav_dir,
        out_dir,
        str(shard_files),
    ]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"lhotse failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["seconds"], result["paths"]


# ---------------------------------------------------------------------------------------------
# Checks


def check_ours(summary: dict, corpus: Corpus, passthrough: bool) -> None:
    """Every input became one utterance of the same length, and nothing was rejected."""
    problems = []
    if summary["segments"] != corpus.files or summary["files_taken"] != corpus.files:
        problems.append(
            f"{summary['segments']} utterances from {summary['files_taken']} files, "
            f"expected {corpus.files}"
        )
    if summary["rejects"]:
        problems.append(f"{summary['rejects']} rejects: {summary['rejects_by_reason']}")
    if not math.isclose(summary["seconds"], corpus.seconds, rel_tol=1e-3):
        problems.append(
            f"{summary['seconds']:.1f} s of audio written, expected {corpus.seconds:.1f}"
        )
    if passthrough and summary["bytes"] < dir_bytes(corpus.flac_dir):
        problems.append("shards are smaller than the FLAC files they should hold verbatim")
    if problems:
        raise AssertionError("shard stage output is wrong: " + "; ".join(problems))


def _first_flac(tar_path: str) -> tuple[str, bytes]:
    with tarfile.open(tar_path) as tar:
        member = next(m for m in tar if m.name.endswith(".flac"))
        return os.path.basename(member.name), tar.extractfile(member).read()


def check_16k_flac(name: str, data: bytes, who: str) -> None:
    """A stored member really is 16 kHz mono FLAC (the resampling was done)."""
    info = sf.info(io.BytesIO(data))
    if (info.format, info.samplerate, info.channels) != ("FLAC", FLAC_RATE, 1):
        raise AssertionError(
            f"{who}: {name} is {info.format} {info.samplerate} Hz "
            f"{info.channels} ch, expected FLAC {FLAC_RATE} Hz mono"
        )


def check_ours_shards(root: str, corpus: Corpus, passthrough: bool) -> None:
    """The first shard's first member is 16 kHz FLAC; with pass-through, the input's bytes."""
    name, data = _first_flac(os.path.join(root, "shards", "000000.tar"))
    check_16k_flac(name, data, "ours")
    if passthrough:
        with open(os.path.join(corpus.flac_dir, name), "rb") as f:
            if f.read() != data:
                raise AssertionError(f"{name} in the shard differs from the input file")


def check_tar(out_tar: str, corpus: Corpus) -> None:
    with tarfile.open(out_tar) as tar:
        n = sum(1 for m in tar if m.isfile())
    if n != corpus.files:
        raise AssertionError(f"tar holds {n} files, expected {corpus.files}")


def check_lhotse(out_dir: str, paths: dict, corpus: Corpus, shard_files: int) -> None:
    """lhotse wrote every shard, its cut manifests list every file, and it stored 16 kHz."""
    expected = math.ceil(corpus.files / shard_files)
    tars = sorted(p for p in paths.get("recording", []) if os.path.exists(p))
    manifests = sorted(
        n for n in os.listdir(out_dir) if n.startswith("cuts.") and n.endswith(".jsonl.gz")
    )
    if len(tars) != expected or len(manifests) != expected:
        raise AssertionError(
            f"lhotse wrote {len(tars)} recording tars and {len(manifests)} cut "
            f"manifests, expected {expected} of each"
        )
    cuts = 0
    seconds = 0.0
    for name in manifests:
        with gzip.open(os.path.join(out_dir, name), "rt") as f:
            for line in f:
                cuts += 1
                seconds += json.loads(line)["duration"]
    if cuts != corpus.files or not math.isclose(seconds, corpus.seconds, rel_tol=1e-3):
        raise AssertionError(
            f"lhotse manifests list {cuts} cuts ({seconds:.1f} s), expected "
            f"{corpus.files} ({corpus.seconds:.1f} s)"
        )
    check_16k_flac(*_first_flac(tars[0]), "lhotse")


# ---------------------------------------------------------------------------------------------
# Workloads


def warm_up(workdir: str, corpus: Corpus) -> float:
    """One untimed call of the stage on four files; returns its seconds.

    The first task a Ray worker runs imports the project (numpy, soundfile, pyarrow, ...);
    that is paid once per cluster, not once per corpus, so it is kept out of the timed runs
    and reported on its own.
    """
    source = build_warmup(workdir, corpus)
    root = fresh_path(os.path.join(workdir, "runs", "warmup"))
    seconds, _ = timed(run_ours, source, root, 1)
    remove(root)
    shutil.rmtree(source)
    return seconds


def bench_passthrough(
    corpus: Corpus, workdir: str, shard_files: int, repeats: int, cache: str = "warm"
) -> dict:
    """Times the stage, tar and tar + fsync on the FLAC directory, taking turns.

    Each round runs every contender once, so a load that comes and goes on the machine
    falls on all of them; each contender's median run is reported. ``cache`` says whether
    each run starts from a warm or a dropped page cache.
    """
    prepare = CACHES[cache]
    out = os.path.join(workdir, "runs")
    times: dict[str, list[float]] = {"ours": [], "tar": [], "tar_fsync": []}
    for _ in range(repeats):
        root = fresh_path(os.path.join(out, "passthrough-ours"))
        prepare(corpus.flac_dir)
        seconds, summary = timed(run_ours, corpus.flac_dir, root, shard_files)
        check_ours(summary, corpus, passthrough=True)
        check_ours_shards(root, corpus, passthrough=True)
        remove(root)
        times["ours"].append(seconds)
        for name, fsync in (("tar", False), ("tar_fsync", True)):
            target = fresh_path(os.path.join(out, "passthrough.tar"))
            prepare(corpus.flac_dir)
            seconds, _ = timed(run_tar, corpus.flac_dir, target, fsync)
            check_tar(target, corpus)
            remove(target)
            times[name].append(seconds)
    return {"in_bytes": dir_bytes(corpus.flac_dir), "times": times, "cache": cache}


def bench_transcode(corpus: Corpus, workdir: str, shard_files: int, repeats: int) -> dict:
    """Times the stage and lhotse on the WAV directory, taking turns (see above)."""
    out = os.path.join(workdir, "runs")
    times: dict[str, list[float]] = {"ours": [], "lhotse": []}
    sizes: dict[str, int] = {}
    for _ in range(repeats):
        root = fresh_path(os.path.join(out, "transcode-ours"))
        warm_cache(corpus.wav_dir)
        seconds, summary = timed(run_ours, corpus.wav_dir, root, shard_files)
        check_ours(summary, corpus, passthrough=False)
        check_ours_shards(root, corpus, passthrough=False)
        remove(root)
        times["ours"].append(seconds)
        sizes["ours"] = summary["bytes"]

        shar = fresh_path(os.path.join(out, "transcode-lhotse"))
        warm_cache(corpus.wav_dir)
        seconds, paths = run_lhotse_subprocess(corpus.wav_dir, shar, shard_files)
        check_lhotse(shar, paths, corpus, shard_files)
        sizes["lhotse"] = sum(os.path.getsize(p) for p in paths["recording"])
        remove(shar)
        times["lhotse"].append(seconds)
    return {"in_bytes": dir_bytes(corpus.wav_dir), "times": times, "sizes": sizes}


# ---------------------------------------------------------------------------------------------
# Report


def report(
    corpus: Corpus,
    shard_files: int,
    warmup_s: float,
    passthroughs: list[dict],
    transcode: dict | None,
) -> None:
    """Prints the RESULT lines, then a table for people."""
    h = corpus.hours
    rows = []
    for passthrough in passthroughs:
        cache = passthrough["cache"]
        mb = passthrough["in_bytes"] / 1e6
        s = {k: statistics.median(v) for k, v in passthrough["times"].items()}
        print(
            f"RESULT bench=shards.passthrough cache={cache} hours={h:.2f} "
            f"ours_hours_per_s={h / s['ours']:.3f} tar_hours_per_s={h / s['tar']:.3f} "
            f"ours_MBps={mb / s['ours']:.1f} tar_MBps={mb / s['tar']:.1f} "
            f"ratio_vs_tar={s['tar'] / s['ours']:.3f} "
            f"tar_fsync_hours_per_s={h / s['tar_fsync']:.3f} "
            f"ratio_vs_tar_fsync={s['tar_fsync'] / s['ours']:.3f} target={TARGET_VS_TAR[cache]}"
        )
        for key, label in (
            ("ours", "ours (shard stage)"),
            ("tar", "GNU tar"),
            ("tar_fsync", "GNU tar + fsync"),
        ):
            rows.append((f"pass-thr/{cache}", label, passthrough["times"][key], h, mb))
    if transcode:
        mb = transcode["in_bytes"] / 1e6
        s = {k: statistics.median(v) for k, v in transcode["times"].items()}
        print(
            f"RESULT bench=shards.transcode hours={h:.2f} "
            f"ours_hours_per_s={h / s['ours']:.3f} lhotse_hours_per_s={h / s['lhotse']:.3f} "
            f"ours_MBps={mb / s['ours']:.1f} lhotse_MBps={mb / s['lhotse']:.1f} "
            f"ratio_vs_lhotse={s['lhotse'] / s['ours']:.3f} target={TARGET_VS_LHOTSE}"
        )
        for key, label in (("ours", "ours (shard stage)"), ("lhotse", "lhotse to_shar")):
            rows.append(("transcode", label, transcode["times"][key], h, mb))

    print()
    print(
        f"{corpus.files} files, {h:.2f} audio hours, {shard_files} files per shard, "
        f"{CORES} cores per contender; transcoding from a warm page cache; median of the runs"
    )
    print(
        f"{'workload':<13} {'contender':<19} {'median s':>9} {'audio-h/s':>10} "
        f"{'input MB/s':>11}  runs (s)"
    )
    for workload, label, runs, hours, mb in rows:
        med = statistics.median(runs)
        each = " ".join(f"{r:.2f}" for r in runs)
        print(
            f"{workload:<13} {label:<19} {med:>9.2f} {hours / med:>10.3f} {mb / med:>11.1f}  {each}"
        )
    if transcode:
        sizes = transcode["sizes"]
        print(
            f"transcoded FLAC: ours {sizes['ours'] / 1e6:.1f} MB of shards, lhotse "
            f"{sizes['lhotse'] / 1e6:.1f} MB of recording tars"
        )
    print(
        f"first call of the stage (Ray workers import the project; untimed above): {warmup_s:.2f} s"
    )


# ---------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workdir",
        default=os.path.join(REPO, "bench-output"),
        help="corpus cache and scratch outputs (default: %(default)s)",
    )
    parser.add_argument(
        "--files", type=int, default=2000, help="files in the corpus (default: %(default)s)"
    )
    parser.add_argument(
        "--seconds", type=float, default=3.6, help="seconds per file (default: %(default)s)"
    )
    parser.add_argument(
        "--shard-files",
        type=int,
        default=None,
        help="files per shard, for us and lhotse alike (default: a quarter of "
        "the files per core, so both cores stay busy to the end)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="timed runs of each contender; the median is reported (default: %(default)s)",
    )
    parser.add_argument(
        "--only", choices=("passthrough", "transcode"), default=None, help="run one workload only"
    )
    parser.add_argument(
        "--lhotse-child", nargs=3, metavar=("WAV_DIR", "OUT", "SHARD_FILES"), help=argparse.SUPPRESS
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.lhotse_child:
        wav_dir, out_dir, shard_files = args.lhotse_child
        lhotse_child(wav_dir, out_dir, int(shard_files))
        return 0
    workdir = os.path.abspath(args.workdir)
    os.chdir(REPO)  # Ray puts the current directory on its workers' sys.path (see above).
    shard_files = args.shard_files or max(1, math.ceil(args.files / (4 * CORES)))
    corpus = build_corpus(workdir, args.files, args.seconds)
    busy = busy_cores()
    if busy > 0.3:
        print(
            f"warning: {busy:.1f} cores were busy with other work just before the benchmark; "
            "the numbers will be noisy",
            flush=True,
        )

    import ray

    # address="local": a fresh instance of our own, never a cluster that another program
    # started on this machine (ray.init would join it, with its CPUs and its load).
    # Started as the pipelines start a local Ray (idle workers preload the project).
    from pipelines._ray import local_options

    ray.init(
        address="local",
        num_cpus=CORES,
        include_dashboard=False,
        log_to_driver=False,
        **local_options(),
    )
    try:
        warmup_s = warm_up(workdir, corpus)
        passthrough, transcode = [], None
        if args.only in (None, "passthrough"):
            caches = ["warm", "cold"] if can_drop_cache() else ["warm"]
            if "cold" not in caches:
                print("cannot drop the page cache here (needs root): warm cache only", flush=True)
            for cache in caches:
                print(f"timing pass-through, {cache} cache ...", flush=True)
                passthrough.append(
                    bench_passthrough(corpus, workdir, shard_files, args.repeats, cache)
                )
        if args.only in (None, "transcode"):
            print("timing transcoding ...", flush=True)
            transcode = bench_transcode(corpus, workdir, shard_files, args.repeats)
    finally:
        ray.shutdown()
    report(corpus, shard_files, warmup_s, passthrough, transcode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
