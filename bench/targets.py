"""Several label targets in one pass against one pass per target, on real speech.

``targets``: three label sets of the same features, written twice on the same local Ray
(``num_cpus=2``, two ``LabelWorker`` actors):

* separate: :func:`units.labels.stage.run` once per target, three passes, each decoding
  the audio and computing the features again;
* together: :func:`units.labels.stage.run_many` over the three targets, one pass that
  decodes each batch and computes its features once, then assigns it to every target.

Each contender runs ``--repeats`` times (default 2), taking turns and starting with the
other one each round; the best time of each counts (``speedup`` = separate / together).
Before each contender the script waits for the cores to go idle (``label.settle``).
``*_seconds`` is wall time from the call to its return (for separate, the three calls'
times added: Ray's timeline is read between them, untimed, which lets the fresh idle
workers Ray starts after a run import torch before the next run, a small advantage for
separate). ``*_task_seconds`` is the ``process_shard`` tasks' own time summed over both
actors (Ray's timeline, as ``bench/label.py`` reads it): the work per shard without the
actors' start-up (a Ray worker, the k-means and, for HuBERT, the model loaded per pass),
which separate pays three times. After each round every label file of the together pass
(``units/*.parquet`` and any ``rejects/*.parquet``) must be byte for byte the separate
pass's file of the same target; ``identical`` says whether they all were, and the files
that differ are listed.

Cases:

* ``mfcc_k100_500_2000``: the LibriSpeech sample (``../shared/data/librispeech-sample``,
  251 utterances, 52 minutes), its first ``--hours`` of audio (default 0.25; 0.87 takes all
  of it), sharded into eight shards (four per worker), MFCC features of a seeded 50% sample,
  k-means with k = 100, 500 and 2,000 (``max_iter`` = 5: the benchmark measures the label
  pass, not the fit, and the centroids' quality does not change its cost). Ideal ratio:
  below 3. Together decodes the FLAC and computes the MFCC once instead of three times, but
  every target still pays its own centroid search (k = 2,000 costs 20 times k = 100) and
  its own Parquet commit, so the ratio is about (3 x (decode + MFCC) + search(100 + 500 +
  2,000)) over (decode + MFCC + the same search), plus three start-ups against one.
* ``hubert_layers_4_8_12``: a randomly initialised HuBERT-base-shaped model
  (``transformers.HubertConfig()`` defaults: 12 blocks of 768 dims, group-norm conv front
  end; ``save_pretrained`` into the work directory, seeded), the first ``--ssl-hours`` of
  the sample (default 0.05), one feature store per layer (4, 8, 12; a seeded 50% sample)
  and k-means k = 100 on each. Separately, the passes run the conv front end three times
  and 4 + 8 + 12 = 24 blocks; together, the front end once and 12 blocks. The forward
  dominates (the search of k = 100 on 768 dims is small beside it), so the ideal ratio is
  the model FLOPs' (3 x front end + 24 blocks) / (front end + 12 blocks), between 2 and 3:
  printed as ``ideal_flops_ratio`` (:func:`units.features.flops.ssl_flops` over the
  utterances), which ``task_speedup`` should approach.

Prints, per case::

    RESULT bench=targets case=mfcc_k100_500_2000 hours=0.25 targets=3 separate_seconds=...
        together_seconds=... speedup=... identical=True separate_task_seconds=...
        together_task_seconds=... task_speedup=... utterances=... shards=... cores=2
        repeats=2 cpu="AMD EPYC"
    RESULT bench=targets case=hubert_layers_4_8_12 hours=0.05 targets=3 ...
        task_speedup=... ideal_flops_ratio=... utterances=... ...

and each round's seconds. Timings on a shared two-core machine are indicative only: the
ratio of the two in one run is the figure to read.

Usage:
    python bench/targets.py                         # both cases, about 5 minutes
    python bench/targets.py --hours 0.87            # the whole sample for the MFCC case
    python bench/targets.py --cases hubert_layers_4_8_12 --ssl-hours 0.02
    python bench/targets.py --workdir /tmp/targets --keep   # keep the roots and the model
"""

from __future__ import annotations

import argparse
import filecmp
import glob
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

from _common import REPO, prepare
from label import CORES, SHARDS_PER_WORKER, _label_spans, settle

prepare()  # bench/label.py's import ran it too: this directory is off sys.path from here.

DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "librispeech-sample")
MFCC_CASE = "mfcc_k100_500_2000"
SSL_CASE = "hubert_layers_4_8_12"
CASES = (MFCC_CASE, SSL_CASE)
MFCC_KS = (100, 500, 2000)
SSL_LAYERS = (4, 8, 12)
SSL_K = 100
#: Share of the corpus the k-means are fitted on, and their iterations: enough frames for
#: k = 2,000 (about 45,000 at 0.25 h), few iterations (the fit is not what is measured).
SAMPLE_PERCENT = 50.0
MAX_ITER = 5


def cpu_model() -> str:
    """The CPU's model name, from ``/proc/cpuinfo``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


# ---------------------------------------------------------------------------------------------
# Set-up: a root from the sample's first hours, feature stores, k-means


def select(hours: float) -> tuple[list[str], float]:
    """The sample's files in sorted order up to ``hours`` of audio (all of them for
    ``hours`` at or above the sample's), and their hours."""
    import soundfile as sf

    paths = sorted(glob.glob(os.path.join(DATA, "*", "*", "*.flac")))
    if not paths:
        raise SystemExit(f"no FLAC files under {DATA}")
    chosen, seconds = [], 0.0
    for path in paths:
        if seconds >= hours * 3600:
            break
        chosen.append(path)
        seconds += sf.info(path).duration
    return chosen, seconds / 3600


def build_root(base: str, paths: list[str]) -> tuple[str, int]:
    """Shards ``paths`` (a list file of the LibriSpeech ids) into ``BASE/root``, about
    ``SHARDS_PER_WORKER`` shards per worker; returns the root and its shard count."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from shards.plan import ShardingOptions
    from shards.ray_sharding import run as shard

    root = os.path.join(base, "root")
    os.makedirs(base, exist_ok=True)
    keys = [os.path.basename(p).rsplit(".", 1)[0] for p in paths]
    listing = os.path.join(base, "list.csv")
    pacsv.write_csv(
        pa.table({"path": paths, "key": keys, "speaker": [k.split("-")[0] for k in keys]}),
        listing,
    )
    per_shard = math.ceil(len(paths) / (SHARDS_PER_WORKER * CORES))
    summary = shard([listing], root, ShardingOptions(layout="list", max_samples=per_shard))
    if summary.get("rejects"):
        raise SystemExit(f"the shard stage rejected inputs: {summary['rejects']}")
    return root, pq.read_metadata(os.path.join(root, "manifest", "shards.parquet")).num_rows


def fit(root: str, features: str, options, names_ks: list[tuple[str, int]], seed: int) -> None:
    """A feature store ``features`` of a seeded sample, and a k-means per ``(name, k)``."""
    from units.features.sampling import SampleRequest
    from units.features.stage import run as extract
    from units.kmeans.estimator import KMeans
    from units.kmeans.stage import StageOptions
    from units.kmeans.stage import run as fit_kmeans

    extract(root, features, options, SampleRequest(percent=SAMPLE_PERCENT, seed=seed))
    for name, k in names_ks:
        km = KMeans(k, seed=seed, max_iter=MAX_ITER)
        fit_kmeans(root, features, name, km, StageOptions(workers=CORES))


def save_hubert_base(directory: str, seed: int) -> str:
    """A seeded, randomly initialised HuBERT base (``HubertConfig()``'s defaults), saved as
    a local Hugging Face directory, as ``tests/models.py`` saves its tiny models."""
    import torch
    import transformers

    if not os.path.exists(os.path.join(directory, "config.json")):
        torch.manual_seed(seed)
        transformers.HubertModel(transformers.HubertConfig()).save_pretrained(directory)
    return directory


# ---------------------------------------------------------------------------------------------
# The two contenders


def label_files(root: str, name: str) -> dict[str, str]:
    """Label set ``name``'s shard files (units and rejects) by their path inside it."""
    directory = os.path.join(root, "labels", name)
    found = glob.glob(os.path.join(directory, "units", "*.parquet"))
    found += glob.glob(os.path.join(directory, "rejects", "*.parquet"))
    return {os.path.relpath(p, directory): p for p in sorted(found)}


def differing(root: str, separate: list[str], together: list[str]) -> list[str]:
    """The label files of ``together`` that are not byte for byte those of ``separate`` (or
    that one of the two lacks), as ``NAME/PATH``."""
    out = []
    for a, b in zip(separate, together, strict=True):
        files_a, files_b = label_files(root, a), label_files(root, b)
        if not files_a:
            out.append(f"{a}/ (no label files)")
        for rel in sorted(set(files_a) | set(files_b)):
            if rel not in files_a or rel not in files_b:
                out.append(f"{b}/{rel} (only in one)")
            elif not filecmp.cmp(files_a[rel], files_b[rel], shallow=False):
                out.append(f"{b}/{rel}")
    return out


def bench_case(
    case: str,
    root: str,
    kmeans: list[str],
    hours: float,
    shards: int,
    repeats: int,
    cpu: str,
    extra: str = "",
) -> None:
    """Times the separate passes and the one pass over ``kmeans`` in turns; prints RESULT."""
    from units.labels.stage import run, run_many

    separate_names = [f"separate_{k}" for k in kmeans]
    together_names = [f"together_{k}" for k in kmeans]
    utterances = []

    def clear(names: list[str]) -> None:
        for name in names:
            shutil.rmtree(os.path.join(root, "labels", name), ignore_errors=True)

    def timed(call: Callable[[], list[dict]]) -> tuple[float, float]:
        """``call``'s wall seconds and its ``process_shard`` tasks' summed seconds."""
        started = time.time()  # Epoch seconds, as Ray's timeline's.
        metas = call()
        finished = time.time()
        for meta in metas:
            utterances.append(meta["utterances"])
            if meta.get("rejects"):
                print(f"  warning: {meta['rejects']} rejects in a label set", flush=True)
        spans = _label_spans(started, finished, shards)
        return finished - started, sum(end - begin for begin, end, _ in spans)

    def separate() -> tuple[float, float]:
        runs = [
            timed(lambda k=k, n=n: [run(root, k, n, workers=CORES)])
            for k, n in zip(kmeans, separate_names, strict=True)
        ]
        return sum(w for w, _ in runs), sum(b for _, b in runs)

    def together() -> tuple[float, float]:
        return timed(lambda: run_many(root, kmeans, together_names, workers=CORES))

    contenders = {
        "separate": (separate, separate_names),
        "together": (together, together_names),
    }
    seconds: dict[str, list[float]] = {"separate": [], "together": []}
    busy: dict[str, list[float]] = {"separate": [], "together": []}
    different: list[str] = []
    for i in range(repeats):
        order = ["separate", "together"] if i % 2 == 0 else ["together", "separate"]
        for which in order:
            call, names = contenders[which]
            clear(names)
            settle(f"{case} {which}, round {i}")
            wall, tasks = call()
            seconds[which].append(wall)
            busy[which].append(tasks)
        print(
            f"  {case} round {i}: separate {seconds['separate'][-1]:.2f} s"
            f" (tasks {busy['separate'][-1]:.2f} s), together {seconds['together'][-1]:.2f} s"
            f" (tasks {busy['together'][-1]:.2f} s)",
            flush=True,
        )
        different += [f"round {i}: {d}" for d in differing(root, separate_names, together_names)]
        clear(separate_names + together_names)
    if len(set(utterances)) != 1:
        print(f"  warning: label sets of different sizes: {sorted(set(utterances))}", flush=True)
    for line in different:
        print(f"  differs: {line}", flush=True)
    best = {which: min(seconds[which]) for which in seconds}
    best_busy = {which: min(busy[which]) for which in busy}
    print(
        f"RESULT bench=targets case={case} hours={hours:.3f} targets={len(kmeans)}"
        f" separate_seconds={best['separate']:.2f} together_seconds={best['together']:.2f}"
        f" speedup={best['separate'] / best['together']:.2f} identical={not different}"
        f" separate_task_seconds={best_busy['separate']:.2f}"
        f" together_task_seconds={best_busy['together']:.2f}"
        f" task_speedup={best_busy['separate'] / best_busy['together']:.2f}"
        f"{extra} utterances={utterances[0]} shards={shards} cores={CORES} repeats={repeats}"
        f' cpu="{cpu}"',
        flush=True,
    )


def mfcc_case(workdir: str, hours: float, repeats: int, seed: int, cpu: str) -> None:
    from units.features.extractors import ExtractorOptions

    started = time.perf_counter()
    paths, hours = select(hours)
    root, shards = build_root(os.path.join(workdir, "mfcc"), paths)
    kmeans = [f"mfcc_km{k}" for k in MFCC_KS]
    fit(root, "mfcc", ExtractorOptions("mfcc"), list(zip(kmeans, MFCC_KS, strict=True)), seed)
    print(
        f"setup {MFCC_CASE}: {len(paths)} utterances, {hours:.3f} audio hours, {shards} shards,"
        f" k-means k={','.join(map(str, MFCC_KS))} (max_iter={MAX_ITER}) in"
        f" {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    bench_case(MFCC_CASE, root, kmeans, hours, shards, repeats, cpu)


def ssl_case(workdir: str, hours: float, repeats: int, seed: int, cpu: str) -> None:
    from units.features.extractors import ExtractorOptions

    started = time.perf_counter()
    paths, hours = select(hours)
    model = save_hubert_base(os.path.join(workdir, "hubert-base"), seed)
    root, shards = build_root(os.path.join(workdir, "hubert"), paths)
    kmeans = []
    for layer in SSL_LAYERS:
        name = f"hubert_l{layer}_km{SSL_K}"
        options = ExtractorOptions("hf", layer=layer, checkpoint=model)
        fit(root, f"hubert_l{layer}", options, [(name, SSL_K)], seed)
        kmeans.append(name)
    print(
        f"setup {SSL_CASE}: {len(paths)} utterances, {hours:.3f} audio hours, {shards} shards,"
        f" HuBERT base (random weights), k-means k={SSL_K} on layers"
        f" {','.join(map(str, SSL_LAYERS))} in {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    ideal = f" ideal_flops_ratio={ssl_flops_ratio(root):.2f}"
    bench_case(SSL_CASE, root, kmeans, hours, shards, repeats, cpu, ideal)


def ssl_flops_ratio(root: str) -> float:
    """The model FLOPs of the separate passes over the together pass's, on ``root``'s
    utterances (:func:`units.features.flops.ssl_flops`: the front end and the blocks up to
    each layer; HuBERT base's group-norm front end runs each utterance unpadded)."""
    import pyarrow.parquet as pq
    import transformers

    from units.features.flops import ssl_flops

    model = transformers.HubertModel(transformers.HubertConfig())  # Its shapes only.
    manifest = os.path.join(root, "manifest", "utterances.parquet")
    samples = pq.read_table(manifest, columns=["num_samples"]).column(0).to_pylist()
    separate = sum(ssl_flops(model, n, layer) for n in samples for layer in SSL_LAYERS)
    return separate / sum(ssl_flops(model, n, max(SSL_LAYERS)) for n in samples)


# ---------------------------------------------------------------------------------------------
# Driver


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--hours",
        type=float,
        default=0.25,
        help="MFCC case: audio hours from the sample (0.87: all of it; default %(default)s)",
    )
    parser.add_argument(
        "--ssl-hours",
        type=float,
        default=0.05,
        help="HuBERT case: audio hours from the sample (default %(default)s)",
    )
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--repeats", type=int, default=2, help="rounds (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="roots and model go here (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.workdir:
        workdir = os.path.abspath(args.workdir)
        os.makedirs(workdir, exist_ok=True)
    else:
        workdir = tempfile.mkdtemp(prefix="bench-targets-")
    os.chdir(REPO)  # Ray puts the current directory on its workers' sys.path.
    import ray

    # Ray's sockets live under its temp dir: a short private one, removed at the end.
    ray_tmp = tempfile.mkdtemp(prefix="targets-ray-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = ray_tmp
    from pipelines._ray import local_options

    cpu = cpu_model()
    print(f"cpu: {cpu}, {os.cpu_count()} cores; workdir {workdir}", flush=True)
    # As the pipelines start a local Ray: idle workers import torch and the stages first.
    ray.init(
        address="local",
        num_cpus=CORES,
        include_dashboard=False,
        log_to_driver=False,
        **local_options(),
    )
    try:
        if MFCC_CASE in args.cases:
            mfcc_case(workdir, args.hours, args.repeats, args.seed, cpu)
        if SSL_CASE in args.cases:
            ssl_case(workdir, args.ssl_hours, args.repeats, args.seed, cpu)
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"bench targets took {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
