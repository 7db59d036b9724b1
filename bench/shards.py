"""Benchmark of the shard stage against a plain copy (GNU tar) and lhotse's Shar export.

Two workloads on the same synthetic corpus (default 2,000 files of 3.6 s, 2.0 audio hours):

* pass-through: 16 kHz mono 16-bit FLAC, which the shard stage copies byte for byte.
  Baseline: ``tar -cf out.tar -C DIR .``, the fastest way to put the same bytes in a tar.
* transcode: the same audio as 48 kHz 16-bit WAV, which the shard stage decodes, resamples
  to 16 kHz (soxr) and encodes to FLAC. Baseline: lhotse's ``CutSet.to_shar`` with the cuts
  resampled to 16 kHz and ``recording`` stored as FLAC.

Every run gets two cores (Ray ``num_cpus=2``; lhotse ``num_jobs=2``), a warm page cache (all
inputs are read once before each timed run) and a fresh output directory. Each timed span
goes from the corpus directory to finished shards: listing and probing the inputs is inside
it for both us and lhotse. Ray and lhotse are imported and Ray is started before any timing.

Prints ``RESULT`` lines (one per workload) and a table, for example::

    RESULT bench=shards.passthrough hours=2.00 ours_hours_per_s=... ratio_vs_tar=... target=0.5

Usage:
    python bench/shards.py                 # full size: 2,000 files, about 2 hours
    python bench/shards.py --files 200     # quick smoke run
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import gzip
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

# Before anything imports ray: no cluster checks for macOS/Windows, no token for a local head.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import soundfile as sf
import soxr

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # Run as a script from anywhere, without installing the package.

from shards.synthetic import speechlike

#: Bump when the corpus generator changes, so cached corpora are rebuilt.
CORPUS_VERSION = 1

#: Cores given to every contender.
CORES = 2

#: Targets from the issue: ours / tar for pass-through, ours / lhotse for transcoding.
TARGET_VS_TAR = 0.5
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
    """Writes file ``index`` of the corpus in both formats; returns its 16 kHz duration.

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
    """Generates the corpus under ``workdir``, or reuses one made by an earlier run.

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
    print(f"corpus: generating {files} files of {seconds:g} s in {root} ...", flush=True)
    started = time.perf_counter()
    jobs = [(flac_dir, wav_dir, i, seconds) for i in range(files)]
    with concurrent.futures.ProcessPoolExecutor(CORES) as pool:
        total = sum(pool.map(_make_file, jobs, chunksize=32))
    meta = dict(want, flac_dir=flac_dir, wav_dir=wav_dir, seconds=total)
    with open(stamp, "w") as f:
        json.dump(meta, f, indent=1)
    print(f"corpus: done in {time.perf_counter() - started:.1f} s", flush=True)
    return Corpus(flac_dir, wav_dir, files, total)


def list_files(directory: str) -> list[str]:
    return sorted(os.path.join(directory, n) for n in os.listdir(directory))


def dir_bytes(directory: str) -> int:
    return sum(os.path.getsize(p) for p in list_files(directory))


def warm_cache(directory: str) -> None:
    """Reads every file once, so each contender starts from the same (warm) page cache.

    Dropping the cache needs root; a warm cache for everyone is the fair alternative.
    """
    for path in list_files(directory):
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass


def fresh_path(path: str) -> str:
    """Removes whatever an earlier run left at ``path``; the contender creates it anew."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """Wall seconds of ``fn()`` and its result."""
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


# ---------------------------------------------------------------------------------------------
# Contenders


def run_ours(input_dir: str, root: str, shard_files: int) -> dict:
    """The shard stage, as a user calls it (Ray already started)."""
    from shards.plan import ShardingOptions
    from shards.ray_sharding import run

    # Shards are cut by file count (the same count lhotse gets), never by bytes.
    opts = ShardingOptions(layout="dir", shard_bytes=1 << 40, max_samples=shard_files)
    return run([input_dir], root, opts)


def run_tar(input_dir: str, out_tar: str, fsync: bool) -> None:
    """GNU tar of the directory; with ``fsync``, also flushes the tar to disk as we do."""
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
    return cuts.to_shar(out_dir, fields={"recording": "flac"}, shard_size=shard_files,
                        num_jobs=CORES)


# ---------------------------------------------------------------------------------------------
# Checks


def check_ours(summary: dict, corpus: Corpus, passthrough: bool) -> None:
    """Every input is one utterance of the right length, with nothing rejected."""
    problems = []
    if summary["segments"] != corpus.files or summary["files_taken"] != corpus.files:
        problems.append(f"{summary['segments']} utterances from {summary['files_taken']} files, "
                        f"expected {corpus.files}")
    if summary["rejects"]:
        problems.append(f"{summary['rejects']} rejects: {summary['rejects_by_reason']}")
    if not math.isclose(summary["seconds"], corpus.seconds, rel_tol=1e-3):
        problems.append(f"{summary['seconds']:.1f} s of audio written, expected {corpus.seconds:.1f}")
    if passthrough and summary["bytes"] < dir_bytes(corpus.flac_dir):
        problems.append("shards are smaller than the FLAC files they should hold verbatim")
    if problems:
        raise AssertionError("shard stage output is wrong: " + "; ".join(problems))


def check_passthrough_bytes(root: str, corpus: Corpus) -> None:
    """The first shard's first FLAC member is the input file, byte for byte."""
    with tarfile.open(os.path.join(root, "shards", "000000.tar")) as tar:
        member = next(m for m in tar if m.name.endswith(".flac"))
        data = tar.extractfile(member).read()
    with open(os.path.join(corpus.flac_dir, member.name), "rb") as f:
        if f.read() != data:
            raise AssertionError(f"{member.name} in the shard differs from the input file")


def check_tar(out_tar: str, corpus: Corpus) -> None:
    with tarfile.open(out_tar) as tar:
        n = sum(1 for m in tar if m.isfile())
    if n != corpus.files:
        raise AssertionError(f"tar holds {n} files, expected {corpus.files}")


def check_lhotse(out_dir: str, paths: dict, corpus: Corpus, shard_files: int) -> None:
    """lhotse wrote the expected number of shards, and its cut manifests list every file."""
    expected = math.ceil(corpus.files / shard_files)
    tars = [p for p in paths.get("recording", []) if os.path.exists(p)]
    manifests = sorted(n for n in os.listdir(out_dir) if n.startswith("cuts.") and n.endswith(".jsonl.gz"))
    if len(tars) != expected or len(manifests) != expected:
        raise AssertionError(f"lhotse wrote {len(tars)} recording tars and {len(manifests)} cut "
                             f"manifests, expected {expected} of each")
    cuts = 0
    seconds = 0.0
    for name in manifests:
        with gzip.open(os.path.join(out_dir, name), "rt") as f:
            for line in f:
                cut = json.loads(line)
                cuts += 1
                seconds += cut["duration"]
    if cuts != corpus.files or not math.isclose(seconds, corpus.seconds, rel_tol=1e-3):
        raise AssertionError(f"lhotse manifests list {cuts} cuts ({seconds:.1f} s), expected "
                             f"{corpus.files} ({corpus.seconds:.1f} s)")


# ---------------------------------------------------------------------------------------------
# Workloads


def _median_run(fn: Callable[[int], float], repeats: int) -> tuple[float, list[float]]:
    times = [fn(i) for i in range(repeats)]
    return statistics.median(times), times


def bench_passthrough(corpus: Corpus, workdir: str, shard_files: int, repeats: int) -> dict:
    """Times the shard stage and tar on the FLAC directory; median of ``repeats`` runs each."""
    out = os.path.join(workdir, "runs")
    in_bytes = dir_bytes(corpus.flac_dir)

    def ours(i: int) -> float:
        root = fresh_path(os.path.join(out, f"passthrough-ours-{i}"))
        warm_cache(corpus.flac_dir)
        seconds, summary = timed(lambda: run_ours(corpus.flac_dir, root, shard_files))
        check_ours(summary, corpus, passthrough=True)
        check_passthrough_bytes(root, corpus)
        shutil.rmtree(root)
        return seconds

    def tar(i: int, fsync: bool = False) -> float:
        target = fresh_path(os.path.join(out, f"passthrough-tar-{i}.tar"))
        warm_cache(corpus.flac_dir)
        seconds, _ = timed(lambda: run_tar(corpus.flac_dir, target, fsync))
        check_tar(target, corpus)
        os.unlink(target)
        return seconds

    ours_s, ours_all = _median_run(ours, repeats)
    tar_s, tar_all = _median_run(tar, repeats)
    tar_sync_s, _ = _median_run(lambda i: tar(i, fsync=True), repeats)
    return {
        "in_bytes": in_bytes, "ours_s": ours_s, "ours_all": ours_all, "tar_s": tar_s,
        "tar_all": tar_all, "tar_sync_s": tar_sync_s,
    }


def bench_lhotse(corpus: Corpus, workdir: str, shard_files: int) -> dict:
    """Times lhotse's Shar export of the WAV directory (one run)."""
    shar = fresh_path(os.path.join(workdir, "runs", "transcode-lhotse"))
    warm_cache(corpus.wav_dir)
    seconds, paths = timed(lambda: run_lhotse(corpus.wav_dir, shar, shard_files))
    check_lhotse(shar, paths, corpus, shard_files)
    nbytes = sum(os.path.getsize(p) for p in paths["recording"])
    shutil.rmtree(shar)
    return {"lhotse_s": seconds, "lhotse_bytes": nbytes}


def bench_ours_transcode(corpus: Corpus, workdir: str, shard_files: int) -> dict:
    """Times the shard stage on the WAV directory (one run)."""
    root = fresh_path(os.path.join(workdir, "runs", "transcode-ours"))
    warm_cache(corpus.wav_dir)
    seconds, summary = timed(lambda: run_ours(corpus.wav_dir, root, shard_files))
    check_ours(summary, corpus, passthrough=False)
    shutil.rmtree(root)
    return {"in_bytes": dir_bytes(corpus.wav_dir), "ours_s": seconds, "ours_bytes": summary["bytes"]}


# ---------------------------------------------------------------------------------------------
# Report


def report(corpus: Corpus, passthrough: dict | None, transcode: dict | None) -> None:
    """Prints the RESULT lines, then a table for people."""
    h = corpus.hours
    rows = []
    if passthrough:
        p = passthrough
        mb = p["in_bytes"] / 1e6
        print(f"RESULT bench=shards.passthrough hours={h:.2f} "
              f"ours_hours_per_s={h / p['ours_s']:.3f} tar_hours_per_s={h / p['tar_s']:.3f} "
              f"ours_MBps={mb / p['ours_s']:.1f} tar_MBps={mb / p['tar_s']:.1f} "
              f"ratio_vs_tar={p['tar_s'] / p['ours_s']:.3f} "
              f"tar_fsync_hours_per_s={h / p['tar_sync_s']:.3f} "
              f"ratio_vs_tar_fsync={p['tar_sync_s'] / p['ours_s']:.3f} "
              f"target={TARGET_VS_TAR}")
        rows += [
            ("pass-through", "ours (shard stage)", p["ours_s"], h / p["ours_s"], mb / p["ours_s"]),
            ("pass-through", "GNU tar", p["tar_s"], h / p["tar_s"], mb / p["tar_s"]),
            ("pass-through", "GNU tar + fsync", p["tar_sync_s"], h / p["tar_sync_s"],
             mb / p["tar_sync_s"]),
        ]
    if transcode:
        t = transcode
        mb = t["in_bytes"] / 1e6
        print(f"RESULT bench=shards.transcode hours={h:.2f} "
              f"ours_hours_per_s={h / t['ours_s']:.3f} lhotse_hours_per_s={h / t['lhotse_s']:.3f} "
              f"ratio_vs_lhotse={t['lhotse_s'] / t['ours_s']:.3f} target={TARGET_VS_LHOTSE}")
        rows += [
            ("transcode", "ours (shard stage)", t["ours_s"], h / t["ours_s"], mb / t["ours_s"]),
            ("transcode", "lhotse to_shar", t["lhotse_s"], h / t["lhotse_s"], mb / t["lhotse_s"]),
        ]
    print()
    print(f"corpus: {corpus.files} files, {h:.2f} audio hours; {CORES} cores each; warm page cache")
    print(f"{'workload':<13} {'contender':<20} {'seconds':>8} {'audio-h/s':>10} {'input MB/s':>11}")
    for workload, name, seconds, hps, mbps in rows:
        print(f"{workload:<13} {name:<20} {seconds:>8.2f} {hps:>10.3f} {mbps:>11.1f}")
    if passthrough:
        runs = ", ".join(f"{s:.2f}" for s in passthrough["ours_all"])
        print(f"pass-through runs of ours (s): {runs}; median reported")
    if transcode:
        print(f"transcoded FLAC bytes: ours {transcode['ours_bytes'] / 1e6:.1f} MB, "
              f"lhotse {transcode['lhotse_bytes'] / 1e6:.1f} MB")


# ---------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=os.path.join(REPO, "bench-output"),
                        help="corpus cache and scratch outputs (default: %(default)s)")
    parser.add_argument("--files", type=int, default=2000, help="files in the corpus (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=3.6,
                        help="seconds per file (default: %(default)s)")
    parser.add_argument("--shard-files", type=int, default=None,
                        help="files per shard, for us and lhotse alike (default: files / 8, so "
                             "both cores stay busy)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per pass-through contender; the median is reported "
                             "(default: %(default)s)")
    parser.add_argument("--only", choices=("passthrough", "transcode"), default=None,
                        help="run one workload only")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = os.path.abspath(args.workdir)
    shard_files = args.shard_files or max(1, math.ceil(args.files / 8))
    corpus = build_corpus(workdir, args.files, args.seconds)
    print(f"corpus: {corpus.files} files, {corpus.hours:.3f} h; {shard_files} files per shard",
          flush=True)

    lhotse_part = None
    if args.only in (None, "transcode"):
        # lhotse forks its worker processes, so it runs before Ray starts: a fork of a process
        # that holds Ray's gRPC threads can hang. Importing it first keeps imports untimed,
        # as Ray's start is for us.
        import lhotse  # noqa: F401

        lhotse_part = bench_lhotse(corpus, workdir, shard_files)

    import ray

    ray.init(num_cpus=CORES, include_dashboard=False, log_to_driver=False)
    passthrough = transcode = None
    try:
        if args.only in (None, "passthrough"):
            passthrough = bench_passthrough(corpus, workdir, shard_files, args.repeats)
        if lhotse_part is not None:
            transcode = dict(lhotse_part, **bench_ours_transcode(corpus, workdir, shard_files))
    finally:
        ray.shutdown()
    report(corpus, passthrough, transcode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
