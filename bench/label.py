"""End-to-end MFCC labelling: our streaming label pass against fairseq's two-script path.

``label``: every utterance of a corpus gets one k-means unit per MFCC frame (k = 100 on
39-dim MFCC with deltas, HuBERT's first iteration), two cores for each contender:

* ours: :func:`units.labels.stage.run` on local Ray (``num_cpus=2``), ``workers=2``: one
  task per shard, two at a time, each on one of Ray's pooled worker processes, which builds
  a ``LabelWorker`` on its first shard of the run and keeps it for the run's next ones
  (:mod:`units.stage`): FLAC decoded from the shard tars, MFCC with
  :class:`units.features.kaldi.KaldiMFCC`, nearest centroid, one Parquet file of units per
  shard, committed atomically. Timed from the call to its return, with Ray already up and
  the k-means already fitted. Ray starts as the pipelines start a local Ray
  (``pipelines._ray.local_options``): its idle workers import torch and the stages before
  they take work. The untimed warm-up round is the first label run of the Ray instance: its
  workers had run only the set-up's shard tasks, and its time is printed as
  ``first_run_seconds`` (a pipeline's first label run; the timed rounds are like the label
  stage of ``pipelines.hubert``, whose workers ran the feature stage before it).
* fairseq: ``examples/hubert/simple_kmeans`` as its README runs it, ``nshard = 2`` ranks,
  each rank a fresh interpreter, first ``dump_mfcc_feature.py`` for both ranks, then
  ``dump_km_label.py`` for both:

  - ``dump_mfcc_feature.py``: ``feature_utils.get_path_iterator`` takes rank's contiguous
    slice of the tsv (``ceil(lines / nshard)`` lines), and per line
    ``MfccFeatureReader.get_feats`` reads the original FLAC file with ``soundfile.read``
    (float64) and computes ``torchaudio.compliance.kaldi.mfcc(x, sample_frequency=16000,
    use_energy=False)`` plus two ``compute_deltas``, concatenated to ``(T, 39)``.
    torchaudio is not installed here: ``bench/features.py``'s :func:`per_utterance_mfcc`, a
    step-for-step plain-torch port of those calls, stands in for it (the same function
    ``features.mfcc`` benchmarks). ``feature_utils.dump_feature`` appends each utterance's
    features to ``{split}_{rank}_{nshard}.npy`` as ``NpyAppendArray`` does (not installed
    here either: :class:`_NpyAppender` writes the same way) and its frame count to the
    ``.len`` file.
  - ``dump_km_label.py``: ``ApplyKmeans``'s numpy branch, ``dist = (x ** 2).sum(1,
    keepdims=True) - 2 * x @ C + Cnorm; argmin(1)``, per utterance of the memory-mapped
    ``.npy`` in ``.len`` order, one line of units per utterance into ``.km``. The
    centroids are ours (``ROOT/kmeans/NAME/centroids.npy``, float32 as scikit-learn's
    ``cluster_centers_`` are for float32 features) instead of a joblib model, so both
    contenders assign to the same centroids.

  Timed from starting the first rank's interpreter to the last ``.km`` written: both
  scripts' start-up (interpreter, ``import torch``) included, as ours includes its own.
  Each process runs one torch thread and one BLAS thread (``OMP_NUM_THREADS=1``), one
  core per rank, as each of our tasks does (Ray sets ``OMP_NUM_THREADS=1`` for a one-CPU
  task). fairseq's scripts set none, and torch's default, two threads in each of two ranks
  on two cores, made the per-utterance MFCC some 14x slower here (55 against 780 audio s/s
  per process): the baseline as run here is the fast configuration. tqdm's progress bars
  are left out.

The rate is audio hours per wall second per core: the corpus's hours / seconds / 2. Each
contender runs ``--repeats`` times (taking turns, after an untimed warm-up round of both);
the median counts. Start-up is a fixed cost per run that a corpus of minutes cannot
amortise and 960 hours can, so the lines also give the time without it
(``*_less_startup``): for fairseq, each script's slowest rank from the end of its imports
to its exit, both scripts added; for ours, from the start of the first ``process_shard`` task
(Ray's task timeline) to the return of ``run``. ``busy_seconds``: the ``process_shard`` tasks'
own time, summed over both worker processes; the rest of two cores' share of
``seconds_less_startup`` is Ray's dispatch and idle tails. ``first_shard_seconds`` (a worker
process's first shard of the run, which also builds its ``LabelWorker``) and
``later_shard_seconds`` (the median of the others) show what a steady worker costs per
shard. Between runs the script waits for the cores to go idle.

The units of the two must agree (same frame counts; same unit on nearly every frame: the two
MFCCs differ by ~1e-4 in float32 rounding, which can only flip a near tie). The agreement
is printed, not asserted.

``label.startup``: a fresh Ray worker's start (an actor that does nothing) and ``import torch``
in a fresh interpreter: what a stage of actors pays at the start of every run, and its tasks
do not (they take pooled workers that Ray started before).

``label.memory``: peak RSS of one label worker (``LabelWorker`` shards via ``process_shard``,
one after the other, in a fresh interpreter that receives one shard's manifest rows at a
time, as a Ray actor does) on the corpus and on a corpus four times larger (four times the
utterances, generated with the same seed, so it holds the first one; the same
``max_samples`` per shard, so four times the shards). Target: the larger one's peak within
10% of the smaller's. The peak is mostly the set-up (interpreter, torch, pyarrow, Ray's
modules), so the growth of the RSS while labelling, above the RSS after the set-up, is
printed as well (``labelling_growth_mb``: the kernel's high-water mark is reset after the
set-up): the part that streaming has to keep flat.

Prints, for example::

    RESULT bench=label case=mfcc_k100 hours=0.50 ... contender=ours seconds=...
        hours_per_second_per_core=... startup_seconds=... seconds_less_startup=...
        hours_per_second_per_core_less_startup=... busy_seconds=... first_shard_seconds=...
        later_shard_seconds=...
    RESULT bench=label case=mfcc_k100 hours=0.50 ... contender=fairseq seconds=...
        hours_per_second_per_core=... ... feature_seconds=... label_seconds=... npy_MB=...
    RESULT bench=label case=mfcc_k100 speedup_vs_fairseq=... target=3 met=...
        speedup_less_startup=... agreement=... frame_counts_equal=True frames=... repeats=3
    RESULT bench=label case=memory shards=8 shards_4x=32 ... peak_rss_mb=... peak_rss_mb_4x=...
        ratio=... target=1.1 met=... setup_rss_mb=... labelling_growth_mb=...
        labelling_growth_mb_4x=...

Set-up (untimed, kept under ``--workdir`` and reused by a later run with the same options):
a LibriSpeech-layout corpus of speech-like 16 kHz FLAC utterances of 2-20 s
(:func:`shards.synthetic.write_librispeech`), fairseq's tsv of it (as
``wav2vec_manifest.py`` writes it: the corpus directory, then ``path<TAB>samples``), the
shard stage into a root (about eight shards: four per worker), the feature stage on a 25%
sample, k-means with k = 100 (``units.kmeans.stage.run``, ``KMeans(100, seed=0)``).

Usage:
    python bench/label.py              # 0.5 audio hours: about a minute on two idle cores
    python bench/label.py --quick      # a smoke run: 40 utterances, about 7 audio minutes
    python bench/label.py --hours 4 --repeats 2 --no-memory   # start-up mostly amortised
    python bench/label.py --profile    # also cProfile one worker's process_shard in-process
    python bench/label.py --librispeech ../shared/data/librispeech-sample   # real speech
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np
from _common import REPO, busy_cores, prepare

prepare()

CORES = 2
SAMPLE_RATE = 16_000
K = 100
KMEANS = f"km{K}"
FEATURES = "mfcc"
SPLIT = "train"
#: Target from the issue: ours' rate over the fairseq path's, and the 4x corpus' peak RSS over
#: the corpus's.
TARGET_SPEEDUP = 3.0
TARGET_MEMORY_RATIO = 1.10
#: Utterance lengths (LibriSpeech's are mostly 2-20 s) and their layout in the corpus.
MIN_SECONDS, MAX_SECONDS = 2.0, 20.0
CHAPTERS, UTTERANCES_PER_CHAPTER = 2, 20
MEAN_SECONDS = (MIN_SECONDS + MAX_SECONDS) / 2
#: Shards per worker: enough that the last shard leaves a core idle only briefly.
SHARDS_PER_WORKER = 4
#: Share of the corpus the k-means is fitted on (fairseq's recipe samples ~10% of 960 h).
SAMPLE_PERCENT = 25.0


# ---------------------------------------------------------------------------------------------
# Set-up: corpus, fairseq tsv, root with a fitted k-means


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A corpus (generated, or real speech) with its fairseq tsv and its root (sharded,
    k-means fitted); ``name`` says which."""

    name: str
    directory: str
    tsv: str
    root: str
    hours: float
    utterances: int
    shards: int
    max_samples: int


def _speakers(hours: float) -> int:
    per_speaker = CHAPTERS * UTTERANCES_PER_CHAPTER * MEAN_SECONDS
    return max(1, round(hours * 3600 / per_speaker))


def write_tsv(directory: str, tsv: str) -> None:
    """fairseq's ``wav2vec_manifest.py`` output: the root, then ``relpath<TAB>frames``."""
    import soundfile as sf

    paths = sorted(
        os.path.relpath(os.path.join(d, f), directory)
        for d, _, files in os.walk(directory)
        for f in files
        if f.endswith(".flac")
    )
    with open(tsv, "w") as f:
        print(directory, file=f)
        for rel in paths:
            print(f"{rel}\t{sf.info(os.path.join(directory, rel)).frames}", file=f)


def build_corpus(
    workdir: str,
    speakers: int,
    max_samples: int | None,
    seed: int,
    fit: bool = True,
    source: str | None = None,
) -> Corpus:
    """Makes (or reuses) the corpus, its tsv and its root; fits the k-means when ``fit``.

    ``max_samples`` (utterances per shard) defaults to the utterances over
    ``SHARDS_PER_WORKER * CORES``. ``source``: a LibriSpeech-layout directory of real
    speech to use as it is, instead of the generated corpus (``speakers`` is then unused).
    """
    import pyarrow.parquet as pq

    from shards.plan import ShardingOptions
    from shards.ray_sharding import run as shard
    from shards.synthetic import write_librispeech

    if source is None:
        utterances = speakers * CHAPTERS * UTTERANCES_PER_CHAPTER
        name = f"corpus-{speakers}spk"
    else:
        utterances = sum(f.endswith(".flac") for _, _, files in os.walk(source) for f in files)
        name = "corpus-" + os.path.basename(os.path.normpath(source))
    if max_samples is None:
        max_samples = math.ceil(utterances / (SHARDS_PER_WORKER * CORES))
    base = os.path.join(workdir, f"{name}-{max_samples}per-shard-seed{seed}")
    directory, root = source or os.path.join(base, "flac"), os.path.join(base, "root")
    tsv = os.path.join(base, f"{SPLIT}.tsv")
    ready = os.path.join(base, "ready.json")
    if not os.path.exists(ready):
        shutil.rmtree(base, ignore_errors=True)
        os.makedirs(base)
        started = time.perf_counter()
        if source is None:
            write_librispeech(
                directory,
                speakers=speakers,
                chapters=CHAPTERS,
                utterances=UTTERANCES_PER_CHAPTER,
                seconds=(MIN_SECONDS, MAX_SECONDS),
                seed=seed,
            )
        write_tsv(directory, tsv)
        shard([directory], root, ShardingOptions(layout="librispeech", max_samples=max_samples))
        with open(ready, "w") as f:
            json.dump({"speakers": speakers, "max_samples": max_samples, "seed": seed}, f)
        print(f"  made {base} in {time.perf_counter() - started:.0f} s", flush=True)
    if fit and not os.path.exists(os.path.join(root, "kmeans", KMEANS, "kmeans.json")):
        from units.features.extractors import ExtractorOptions
        from units.features.sampling import SampleRequest
        from units.features.stage import run as extract
        from units.kmeans.estimator import KMeans
        from units.kmeans.stage import StageOptions
        from units.kmeans.stage import run as fit_kmeans

        started = time.perf_counter()
        request = SampleRequest(percent=SAMPLE_PERCENT, seed=seed)
        extract(root, FEATURES, ExtractorOptions("mfcc"), request)
        fit_kmeans(root, FEATURES, KMEANS, KMeans(K, seed=seed), StageOptions())
        print(f"  fitted k-means k={K} in {time.perf_counter() - started:.0f} s", flush=True)
    manifest = pq.read_table(
        os.path.join(root, "manifest", "utterances.parquet"), columns=["shard", "duration"]
    )
    return Corpus(
        name="generated" if source is None else os.path.basename(os.path.normpath(source)),
        directory=directory,
        tsv=tsv,
        root=root,
        hours=float(sum(manifest.column("duration").to_pylist())) / 3600,
        utterances=manifest.num_rows,
        shards=len(set(manifest.column("shard").to_pylist())),
        max_samples=max_samples,
    )


# ---------------------------------------------------------------------------------------------
# Baseline: fairseq's dump_mfcc_feature.py and dump_km_label.py, one process per rank


class _NpyAppender:
    """Writes a ``.npy`` file the way ``npy_append_array.NpyAppendArray`` does.

    That package is not installed here, and its few lines of work are easy to repeat: a
    header with room for the shape to grow, each array appended at the end of the file, and
    the header rewritten in place after every append, so the file is a valid ``.npy`` at
    every step.
    """

    HEADER_BYTES = 128  # Magic, version, length, the dict padded with spaces, a newline.

    def __init__(self, path: str):
        self._file = open(path, "wb")
        self._rows, self._dim, self._dtype = 0, 0, None

    def append(self, array: np.ndarray) -> None:
        if self._dtype is None:
            self._dim, self._dtype = array.shape[1], array.dtype
            self._write_header()
        self._file.seek(0, io.SEEK_END)
        self._file.write(np.ascontiguousarray(array, dtype=self._dtype).tobytes())
        self._rows += len(array)
        self._write_header()

    def _write_header(self) -> None:
        header = {
            "descr": np.lib.format.dtype_to_descr(self._dtype),
            "fortran_order": False,
            "shape": (self._rows, self._dim),
        }
        text = repr(header).ljust(self.HEADER_BYTES - 10 - 1) + "\n"
        self._file.seek(0)
        self._file.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode())

    def close(self) -> None:
        self._file.close()


def _fairseq_path_iterator(tsv: str, nshard: int, rank: int):
    """``feature_utils.get_path_iterator``: rank's contiguous slice of the tsv lines."""
    with open(tsv) as f:
        root = f.readline().rstrip()
        lines = [line.rstrip() for line in f]
        shard_size = math.ceil(len(lines) / nshard)
        start, end = rank * shard_size, min((rank + 1) * shard_size, len(lines))
        assert start < end, f"start={start}, end={end}"
        lines = lines[start:end]

    def iterate():
        for line in lines:
            subpath, nsample = line.split("\t")
            yield f"{root}/{subpath}", int(nsample)

    return iterate, len(lines)


def fairseq_dump_mfcc(tsv: str, nshard: int, rank: int, feat_dir: str) -> None:
    """``dump_mfcc_feature.py TSV_DIR SPLIT NSHARD RANK FEAT_DIR`` in this process."""
    import soundfile as sf
    import torch

    # torchaudio's calls, ported (see the module docstring). By path: prepare() takes this
    # directory off sys.path (bench/shards.py would shadow the shards package).
    per_utterance_mfcc = _bench_module("features").per_utterance_mfcc
    torch.set_num_threads(1)
    ready = time.time()

    def get_feats(path: str, ref_len: int) -> np.ndarray:  # MfccFeatureReader.get_feats
        wav, sr = sf.read(path)  # float64, as fairseq reads it
        assert sr == SAMPLE_RATE, sr
        if wav.ndim == 2:
            wav = wav.mean(-1)
        assert wav.ndim == 1, wav.ndim
        if ref_len is not None and abs(ref_len - len(wav)) > 160:
            print(f"ref {ref_len} != read {len(wav)} ({path})", file=sys.stderr)
        return per_utterance_mfcc(wav)  # .float(), mfcc, deltas, cat, (T, 39)

    generator, _num = _fairseq_path_iterator(tsv, nshard, rank)
    feat_path = f"{feat_dir}/{SPLIT}_{rank}_{nshard}.npy"
    leng_path = f"{feat_dir}/{SPLIT}_{rank}_{nshard}.len"
    os.makedirs(feat_dir, exist_ok=True)
    if os.path.exists(feat_path):
        os.remove(feat_path)
    feat_f = _NpyAppender(feat_path)
    with open(leng_path, "w") as leng_f:
        for path, nsample in generator():
            feat = get_feats(path, nsample)
            feat_f.append(feat)
            leng_f.write(f"{len(feat)}\n")
    feat_f.close()
    print(json.dumps({"ready": ready, "done": time.time()}), flush=True)


def fairseq_dump_label(feat_dir: str, centroids: str, nshard: int, rank: int, lab_dir: str) -> None:
    """``dump_km_label.py FEAT_DIR SPLIT KM_PATH NSHARD RANK LAB_DIR`` in this process."""
    import torch  # noqa: F401 - dump_km_label.py imports it (ApplyKmeans keeps torch copies).

    ready = time.time()
    # ApplyKmeans: C_np = cluster_centers_.T, Cnorm_np = (C_np ** 2).sum(0, keepdims=True).
    c_np = np.load(centroids).astype(np.float32).T
    cnorm_np = (c_np**2).sum(0, keepdims=True)
    feat_path = f"{feat_dir}/{SPLIT}_{rank}_{nshard}.npy"
    leng_path = f"{feat_dir}/{SPLIT}_{rank}_{nshard}.len"
    with open(leng_path) as f:  # get_feat_iterator
        lengs = [int(line.rstrip()) for line in f]
        offsets = [0] + np.cumsum(lengs[:-1]).tolist()
    feat = np.load(feat_path, mmap_mode="r")
    assert feat.shape[0] == (offsets[-1] + lengs[-1])
    os.makedirs(lab_dir, exist_ok=True)
    with open(f"{lab_dir}/{SPLIT}_{rank}_{nshard}.km", "w") as f:
        for offset, leng in zip(offsets, lengs, strict=True):
            x = feat[offset : offset + leng]
            dist = (x**2).sum(1, keepdims=True) - 2 * np.matmul(x, c_np) + cnorm_np
            lab = np.argmin(dist, axis=1).tolist()
            f.write(" ".join(map(str, lab)) + "\n")
    print(json.dumps({"ready": ready, "done": time.time()}), flush=True)


def _bench_module(name: str):
    """Imports ``bench/NAME.py`` by its path, as ``bench_NAME``."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _child_env() -> dict:
    # One core per process: see the module docstring.
    return dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _run_ranks(script_args: list[list[str]]) -> tuple[float, float, float]:
    """Starts one interpreter per rank and waits for all.

    Returns:
        ``(wall seconds, slowest rank's work seconds after its imports, slowest start-up)``.
    """
    env = _child_env()
    started = time.time()
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--child", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for args in script_args
    ]
    outs = [p.communicate() for p in procs]
    wall = time.time() - started
    for p, (_, err) in zip(procs, outs, strict=True):
        if p.returncode != 0:
            raise SystemExit(f"fairseq rank failed (exit {p.returncode}):\n{err[-4000:]}")
    times = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    work = max(t["done"] - t["ready"] for t in times)
    startup = max(t["ready"] - started for t in times)
    return wall, work, startup


@dataclasses.dataclass
class Timing:
    """One run of a contender: wall seconds, start-up, the rest, and named parts."""

    seconds: float
    startup: float
    less_startup: float
    parts: dict[str, float]


def run_fairseq(corpus: Corpus, out: str) -> Timing:
    """The fairseq path into ``out``: both ranks' features, then both ranks' labels."""
    shutil.rmtree(out, ignore_errors=True)
    feat_dir, lab_dir = os.path.join(out, "feat"), os.path.join(out, "lab")
    centroids = os.path.join(corpus.root, "kmeans", KMEANS, "centroids.npy")
    ranks = [str(r) for r in range(CORES)]
    nshard = str(CORES)
    f_wall, f_work, f_start = _run_ranks([["mfcc", corpus.tsv, nshard, r, feat_dir] for r in ranks])
    l_wall, l_work, l_start = _run_ranks(
        [["km", feat_dir, centroids, nshard, r, lab_dir] for r in ranks]
    )
    return Timing(
        seconds=f_wall + l_wall,
        startup=f_start + l_start,
        less_startup=f_work + l_work,
        parts={"feature_seconds": f_wall, "label_seconds": l_wall},
    )


def fairseq_units(corpus: Corpus, out: str) -> dict[str, list[int]]:
    """The ``.km`` lines of every rank, by utterance key (the file's stem)."""
    with open(corpus.tsv) as f:
        f.readline()
        names = [os.path.basename(line.split("\t")[0])[: -len(".flac")] for line in f]
    shard_size = math.ceil(len(names) / CORES)
    units = {}
    for rank in range(CORES):
        keys = names[rank * shard_size : (rank + 1) * shard_size]
        with open(os.path.join(out, "lab", f"{SPLIT}_{rank}_{CORES}.km")) as f:
            lines = f.read().splitlines()
        assert len(lines) == len(keys), (len(lines), len(keys))
        units.update(
            {k: [int(u) for u in line.split()] for k, line in zip(keys, lines, strict=True)}
        )
    return units


# ---------------------------------------------------------------------------------------------
# Ours: the label pass on Ray


def run_ours(corpus: Corpus, name: str) -> Timing:
    """Our label pass into ``ROOT/labels/NAME``.

    Its start-up is read from Ray's task timeline: the time until the first
    ``process_shard`` task starts (reading the manifest, planning, sending the tasks); the
    rest is the work, to the call's return.
    """
    from units.labels.stage import run

    # A label set left by an interrupted benchmark would make the run do nothing.
    shutil.rmtree(os.path.join(corpus.root, "labels", name), ignore_errors=True)
    started = time.time()  # Epoch seconds, as the timeline's.
    meta = run(corpus.root, KMEANS, name, workers=CORES)
    finished = time.time()
    if meta["utterances"] != corpus.utterances or meta["rejects"]:
        raise SystemExit(f"ours labelled {meta['utterances']} of {corpus.utterances} utterances")
    spans = _label_spans(started, finished, corpus.shards)
    first = min(begin for begin, _, _ in spans)
    by_worker: dict[str, list[float]] = {}
    for begin, end, worker in sorted(spans):
        by_worker.setdefault(worker, []).append(end - begin)
    later = [s for shards in by_worker.values() for s in shards[1:]]
    parts = {
        "busy_seconds": sum(end - begin for begin, end, _ in spans),
        # A worker's first shard of the run also builds its LabelWorker (and, in a process
        # new to the stage, pays for lazy set-up: numba's kernel, first torch calls).
        "first_shard_seconds": statistics.mean(s[0] for s in by_worker.values()),
        "later_shard_seconds": statistics.median(later) if later else math.nan,
    }
    return Timing(finished - started, first - started, finished - first, parts)


def _label_spans(started: float, finished: float, shards: int) -> list[tuple[float, float, str]]:
    """``(start, end, worker)`` of each ``process_shard`` task run in ``[started, finished]``
    (epoch seconds), from ``ray.timeline()`` (workers report their events about once a
    second)."""
    import logging

    import ray

    # ray.timeline() warns that it will read from the dashboard in future Ray versions.
    logging.getLogger("ray._private.state").setLevel(logging.ERROR)
    deadline = time.time() + 30
    while True:
        spans = [
            (e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6, e["tid"])
            for e in ray.timeline()
            # A task's event is named after its module (units.stage.process_shard).
            if e.get("name", "").rpartition(".")[2] == "process_shard"
            and e.get("ph") == "X"
            and started <= e["ts"] / 1e6 <= finished
        ]
        if len(spans) >= shards or time.time() > deadline:
            break
        time.sleep(0.5)
    if len(spans) != shards:
        raise SystemExit(f"Ray's timeline holds {len(spans)} process_shard tasks, not {shards}")
    return spans


def our_units(root: str, name: str) -> dict[str, list[int]]:
    import pyarrow.dataset as ds

    table = ds.dataset(os.path.join(root, "labels", name, "units"), format="parquet").to_table(
        columns=["key", "units"]
    )
    return dict(
        zip(table.column("key").to_pylist(), table.column("units").to_pylist(), strict=True)
    )


def agreement(ours: dict[str, list[int]], theirs: dict[str, list[int]]) -> tuple[float, bool, int]:
    """``(share of frames with the same unit, every frame count equal, frames)``."""
    if sorted(ours) != sorted(theirs):
        raise SystemExit("ours and the fairseq path labelled different utterances")
    same = frames = 0
    counts_equal = True
    for key, mine in ours.items():
        a, b = np.asarray(mine), np.asarray(theirs[key])
        if len(a) != len(b):
            counts_equal = False
            continue
        same += int((a == b).sum())
        frames += len(a)
    return same / max(frames, 1), counts_equal, frames


# ---------------------------------------------------------------------------------------------
# Memory: one worker's peak RSS over a corpus and over one four times larger


def _status_kb(field: str) -> int:
    """A ``VmRSS``/``VmHWM``-like line of ``/proc/self/status``, in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def memory_child(root: str, kmeans: str, name: str) -> None:
    """One label worker in this fresh process; one shard's rows per stdin line.

    Prints the process's peak RSS (``ru_maxrss``), its RSS after the worker's set-up, and
    the peak while labelling alone: the set-up (imports, extractor) peaks higher than one
    shard's work, so the whole-life peak alone would hide any growth. The labelling peak
    comes from resetting the kernel's high-water mark after the set-up (``clear_refs``).
    """
    from units.labels.model import label_layout
    from units.labels.stage import LabelWorker
    from units.stage import ShardActor

    layout = label_layout(root, name)
    worker = ShardActor(layout, LabelWorker, (root, kmeans), {}, "cpu")
    layout.make_dirs()  # run() makes them before any worker starts
    setup_peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    setup_kb = _status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Resets VmHWM to the current RSS.
        reset = True
    except OSError:
        reset = False
    shards = 0
    for line in sys.stdin:
        task = json.loads(line)
        worker.process_shard(task["shard"], task["rows"])
        shards += 1
    labelling_peak_kb = _status_kb("VmHWM") if reset else None
    peak_kb = max(setup_peak_kb, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    result = {
        "peak_kb": max(peak_kb, labelling_peak_kb or 0),
        "setup_kb": setup_kb,
        "labelling_peak_kb": labelling_peak_kb,
        "shards": shards,
    }
    print(json.dumps(result), flush=True)


def worker_peak_rss(root: str) -> dict:
    """Runs :func:`memory_child` over every shard of ``root``; returns its RSS figures."""
    import pyarrow.parquet as pq

    from units.labels.stage import _MANIFEST_COLUMNS

    name = "memory"
    shutil.rmtree(os.path.join(root, "labels", name), ignore_errors=True)
    rows = pq.read_table(
        os.path.join(root, "manifest", "utterances.parquet"), columns=_MANIFEST_COLUMNS
    ).to_pylist()
    by_shard: dict[str, list[dict]] = {}
    for row in rows:
        by_shard.setdefault(row["shard"], []).append(row)
    tasks = "".join(json.dumps({"shard": s, "rows": by_shard[s]}) + "\n" for s in sorted(by_shard))
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", "memory", root, KMEANS, name],
        input=tasks,
        capture_output=True,
        text=True,
        env=_child_env(),
    )
    if done.returncode != 0:
        raise SystemExit(f"memory worker failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["shards"] != len(by_shard):
        raise SystemExit(f"memory worker labelled {result['shards']} of {len(by_shard)} shards")
    shutil.rmtree(os.path.join(root, "labels", name), ignore_errors=True)
    return result


def build_memory_corpus(corpus: Corpus, workdir: str, speakers: int, seed: int) -> Corpus:
    """The corpus with four times the utterances (same seed: it holds the first one), the
    same utterances per shard, and the first one's k-means. Ray must be up (sharding)."""
    big = build_corpus(workdir, 4 * speakers, corpus.max_samples, seed, fit=False)
    # The same k-means (a worker reads only kmeans.json and centroids.npy): the 4x corpus
    # differs in audio only.
    kmeans_dir = os.path.join(big.root, "kmeans", KMEANS)
    if not os.path.exists(kmeans_dir):
        shutil.copytree(os.path.join(corpus.root, "kmeans", KMEANS), kmeans_dir)
    return big


def bench_memory(corpus: Corpus, big: Corpus) -> None:
    """``label.memory``: one worker's peak RSS on the corpus and on the 4x one."""
    small, large = worker_peak_rss(corpus.root), worker_peak_rss(big.root)
    ratio = large["peak_kb"] / small["peak_kb"]
    fields = {
        "shards": corpus.shards,
        "shards_4x": big.shards,
        "hours": f"{corpus.hours:.2f}",
        "hours_4x": f"{big.hours:.2f}",
        "peak_rss_mb": f"{small['peak_kb'] / 1024:.0f}",
        "peak_rss_mb_4x": f"{large['peak_kb'] / 1024:.0f}",
        "ratio": f"{ratio:.3f}",
        "target": f"{TARGET_MEMORY_RATIO:g}",
        "met": ratio <= TARGET_MEMORY_RATIO,
        "setup_rss_mb": f"{small['setup_kb'] / 1024:.0f}",
    }
    if small["labelling_peak_kb"] and large["labelling_peak_kb"]:
        growth = (small["labelling_peak_kb"] - small["setup_kb"]) / 1024
        growth_4x = (large["labelling_peak_kb"] - large["setup_kb"]) / 1024
        fields["labelling_growth_mb"] = f"{growth:.1f}"
        fields["labelling_growth_mb_4x"] = f"{growth_4x:.1f}"
    print(
        "RESULT bench=label case=memory " + " ".join(f"{k}={v}" for k, v in fields.items()),
        flush=True,
    )


# ---------------------------------------------------------------------------------------------
# Profile of one worker, in process


def profile_worker(corpus: Corpus, shards: int = 2, top: int = 25) -> None:
    """cProfile of a ``LabelWorker``'s ``process_shard`` over the first ``shards`` shards,
    one thread."""
    import cProfile
    import pstats

    import pyarrow.parquet as pq
    import torch

    from units.labels.model import label_layout
    from units.labels.stage import _MANIFEST_COLUMNS, LabelWorker
    from units.stage import ShardActor

    torch.set_num_threads(1)  # as in a one-CPU actor
    rows = pq.read_table(
        os.path.join(corpus.root, "manifest", "utterances.parquet"), columns=_MANIFEST_COLUMNS
    ).to_pylist()
    names = sorted({r["shard"] for r in rows})[:shards]
    name = "profile"
    shutil.rmtree(os.path.join(corpus.root, "labels", name), ignore_errors=True)
    layout = label_layout(corpus.root, name)
    worker = ShardActor(layout, LabelWorker, (corpus.root, KMEANS), {}, "cpu")
    layout.make_dirs()
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    for s in names:
        worker.process_shard(s, [r for r in rows if r["shard"] == s])
    profiler.disable()
    seconds = time.perf_counter() - started
    hours = sum(r["duration"] for r in rows if r["shard"] in names) / 3600
    print(
        f"profile: process_shard over {len(names)} shards ({hours * 3600:.0f} audio s) in"
        f" {seconds:.2f} s under cProfile: {hours / seconds:.3f} audio h/s on one core",
        flush=True,
    )
    stats = pstats.Stats(profiler, stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    shutil.rmtree(os.path.join(corpus.root, "labels", name), ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Driver


def settle(what: str, limit: float = 20.0) -> None:
    """Waits for the cores to go idle before ``what``; warns after ``limit`` seconds.

    Ray may start fresh idle workers after a run (when actors exit, or a worker was lost),
    which keeps both cores busy for a second or two after ``run`` returns: without the
    wait, that would fall on whichever contender runs next.
    """
    deadline = time.monotonic() + limit
    while (busy := busy_cores(0.5)) > 0.3:
        if time.monotonic() > deadline:
            print(f"warning: {busy:.1f} cores busy with other work before {what}; noisy")
            return


def _report(head: str, name: str, runs: list[Timing], hours: float, extra: str = "") -> tuple:
    """Prints a contender's RESULT line (medians); returns its seconds with and without
    start-up."""

    def median(field: str) -> float:
        return statistics.median(getattr(r, field) for r in runs)

    def rate(seconds: float) -> float:
        return hours / seconds / CORES

    seconds, less = median("seconds"), median("less_startup")
    parts = {k: statistics.median(r.parts[k] for r in runs) for k in runs[0].parts}
    print(
        f"{head} contender={name} seconds={seconds:.2f}"
        f" hours_per_second_per_core={rate(seconds):.4f}"
        f" startup_seconds={median('startup'):.2f} seconds_less_startup={less:.2f}"
        f" hours_per_second_per_core_less_startup={rate(less):.4f}"
        + "".join(f" {k}={v:.2f}" for k, v in parts.items())
        + extra,
        flush=True,
    )
    return seconds, less


def bench_label(corpus: Corpus, workdir: str, repeats: int) -> None:
    """``label``: ours and the fairseq path in turns; prints the RESULT lines."""
    fairseq_out = os.path.join(workdir, "runs", "fairseq")
    # Untimed warm-up of both: page cache, Ray's idle workers, .pyc files.
    run_fairseq(corpus, fairseq_out)
    first_run = run_ours(corpus, "warmup")
    ours, fairseq = [], []
    for i in range(repeats):
        settle(f"ours, round {i}")
        ours.append(run_ours(corpus, f"ours{i}"))
        settle(f"fairseq, round {i}")
        fairseq.append(run_fairseq(corpus, fairseq_out))
        print(f"  round {i}: ours {ours[-1].seconds:.2f} s, fairseq {fairseq[-1].seconds:.2f} s")
    share, counts_equal, frames = agreement(
        our_units(corpus.root, "ours0"), fairseq_units(corpus, fairseq_out)
    )
    npy_mb = (
        sum(
            os.path.getsize(os.path.join(fairseq_out, "feat", f))
            for f in os.listdir(os.path.join(fairseq_out, "feat"))
        )
        / 1e6
    )
    for i in range(repeats):
        shutil.rmtree(os.path.join(corpus.root, "labels", f"ours{i}"), ignore_errors=True)
    shutil.rmtree(os.path.join(corpus.root, "labels", "warmup"), ignore_errors=True)

    head = (
        f"RESULT bench=label case=mfcc_k{K} corpus={corpus.name} hours={corpus.hours:.2f}"
        f" utterances={corpus.utterances} shards={corpus.shards} k={K} cores={CORES}"
    )
    ours_s, ours_less = _report(
        head, "ours", ours, corpus.hours, f" first_run_seconds={first_run.seconds:.2f}"
    )
    fs_s, fs_less = _report(head, "fairseq", fairseq, corpus.hours, f" npy_MB={npy_mb:.0f}")
    speedup, speedup_less = fs_s / ours_s, fs_less / ours_less
    print(
        f"RESULT bench=label case=mfcc_k{K} corpus={corpus.name}"
        f" speedup_vs_fairseq={speedup:.2f}"
        f" target={TARGET_SPEEDUP:g} met={speedup >= TARGET_SPEEDUP}"
        f" speedup_less_startup={speedup_less:.2f} agreement={share:.5f}"
        f" frame_counts_equal={counts_equal} frames={frames} repeats={repeats}",
        flush=True,
    )
    print(
        "  seconds per round: ours "
        + " ".join(f"{r.seconds:.2f}" for r in ours)
        + "; fairseq "
        + " ".join(f"{r.seconds:.2f}" for r in fairseq),
        flush=True,
    )
    shutil.rmtree(fairseq_out, ignore_errors=True)
    report_startup()


class _Empty:
    """An actor that does nothing: what starting one costs is Ray's worker start alone."""


def report_startup() -> None:
    """``label.startup``: what one run's start-up is made of, on this Ray and machine.

    ``fresh_worker_seconds``: from creating an actor that does nothing to its being ready.
    An actor never takes a worker that has run a task: every run of a stage of actors
    starts their processes anew, each importing what the pipelines preload (torch and the
    stages). ``import_torch_seconds``: ``import torch`` in a fresh interpreter, most of that.
    Printed as what the label pass's tasks save by taking pooled workers instead.
    """
    import ray

    from pipelines._ray import WORKER_PRELOAD

    settle("start-up")
    started = time.perf_counter()
    actor = ray.remote(num_cpus=1)(_Empty).remote()
    ray.get(actor.__ray_ready__.remote())
    fresh = time.perf_counter() - started
    ray.kill(actor)
    code = "import time; t = time.perf_counter(); import torch; print(time.perf_counter() - t)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    print(
        f"RESULT bench=label case=startup fresh_worker_seconds={fresh:.2f}"
        f" import_torch_seconds={float(done.stdout):.2f} preload={','.join(WORKER_PRELOAD)}",
        flush=True,
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--hours", type=float, default=0.5, help="audio in the corpus (default: %(default)s)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one speaker (40 utterances, about 7 audio minutes), 1 repeat",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="skip label.memory")
    parser.add_argument(
        "--librispeech",
        metavar="DIR",
        help="label this LibriSpeech-layout directory of real speech (the repository's sample:"
        " ../shared/data/librispeech-sample) instead of a generated corpus; no label.memory",
    )
    parser.add_argument("--profile", action="store_true", help="cProfile one worker in-process")
    parser.add_argument(
        "--workdir",
        default=os.path.join(REPO, "bench-output", "label"),
        help="corpora are kept here and reused (default: %(default)s)",
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.hours = min(args.hours, 0.05)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    return args


def child(argv: list[str]) -> None:
    """Entry point of the subprocesses: a fairseq script for one rank, or the memory worker."""
    stage, *rest = argv
    if stage == "mfcc":
        tsv, nshard, rank, feat_dir = rest
        fairseq_dump_mfcc(tsv, int(nshard), int(rank), feat_dir)
    elif stage == "km":
        feat_dir, centroids, nshard, rank, lab_dir = rest
        fairseq_dump_label(feat_dir, centroids, int(nshard), int(rank), lab_dir)
    elif stage == "memory":
        memory_child(*rest)
    else:
        raise SystemExit(f"unknown child {stage!r}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    started = time.perf_counter()
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    os.chdir(REPO)  # Ray puts the current directory on its workers' sys.path.
    import ray

    # Ray's sockets live under its temp dir: a short private one, removed at the end.
    ray_tmp = tempfile.mkdtemp(prefix="label-ray-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = ray_tmp
    from pipelines._ray import local_options

    # As the pipelines start a local Ray: idle workers import torch and the stages first.
    ray.init(num_cpus=CORES, include_dashboard=False, log_to_driver=False, **local_options())
    try:
        speakers = _speakers(args.hours)
        corpus = build_corpus(workdir, speakers, None, args.seed, source=args.librispeech)
        print(
            f"setup: {corpus.hours:.3f} audio hours, {corpus.utterances} utterances"
            + (
                f" of {args.librispeech}"
                if args.librispeech
                else f" of {MIN_SECONDS:g}-{MAX_SECONDS:g} s"
            )
            + f", {corpus.shards} shards of"
            f" {corpus.max_samples} utterances, k={K}, cores={CORES} (ours: {CORES} Ray"
            f" tasks at a time; fairseq: nshard={CORES}), repeats={args.repeats}",
            flush=True,
        )
        bench_label(corpus, workdir, args.repeats)
        if args.profile:
            profile_worker(corpus)
        # The memory check needs a corpus four times larger: generated ones only.
        memory = not args.no_memory and args.librispeech is None
        big = build_memory_corpus(corpus, workdir, speakers, args.seed) if memory else None
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if big is not None:  # Ray is down: nothing else runs beside the worker.
        bench_memory(corpus, big)
    print(f"bench label took {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
