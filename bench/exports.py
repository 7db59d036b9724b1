"""Label-set exports and the streaming trainer dataset against the by-hand ways, on real speech.

Set-up (untimed; kept in ``--workdir``, default ``bench-output/exports``, and reused by a
later run of the same ``--hours``): the LibriSpeech sample (``../shared/data/
librispeech-sample``, 251 utterances, 52 minutes), its first ``--hours`` (default: all of
it), sharded by the shard stage into eight shards (``bench/targets.py``'s ``build_root``),
MFCC features of a seeded 50% sample, k-means k = 100 (5 iterations: the units' quality does
not change what is measured) and the label pass, on a local Ray of two CPUs. Ray is shut
down before anything is timed: every contender runs in this process, one after another
(one torch thread; no worker processes), over the same root.

Cases (``--cases``; each contender writes to a fresh directory per run; contenders take
turns for ``--repeats`` rounds (default 3), starting with the other one each round; the
best run of each counts, which leaves out the first run's imports):

* ``lhotse``: ``units.exports.lhotse.export_shard`` over every shard, then ``finish``,
  against lhotse's own way to a Shar of the same label set, as a user writes it by hand:
  for every labelled utterance (the shard tars read with ``tarfile``, the label Parquet and
  the manifest with pyarrow), ``Recording.from_bytes`` of its FLAC member, ``to_cut()``
  with a supervision holding the speaker (ours writes one too) and
  ``attach_tensor("units", units, frame_shift=1 / rate, temporal_dim=0)``; then
  ``CutSet(cuts).to_shar(out, fields={"recording": "flac", "units": "numpy"},
  shard_size=...)`` with as many utterances per Shar shard as our shards hold.
  Not the same work: lhotse's ``recording`` field decodes every recording and encodes it
  again as FLAC (its writer has no pass-through), ours copies the FLAC bytes as stored,
  fsyncs each shard's files and writes commit records. ``identical``: both read back with
  ``CutSet.from_shar`` give the same cut ids (every labelled key), and for every cut the
  same ``load_audio()`` samples, and ``load_units()`` equal to the label set's units.
* ``hf``: ``units.exports.hf.export_shard`` over every shard, then ``finish``, against
  ``datasets.Dataset.from_generator`` (the same rows, read by hand as above: key,
  ``{"bytes": FLAC member, "path": "KEY.flac"}``, uint16 units, frames, speaker; into a
  fresh Arrow cache per run, as a first run makes it), ``cast_column("audio",
  Audio(sampling_rate=16000))`` and ``to_parquet``: the natural way to a Parquet with the
  audio in it, typed ``Audio``. The generator's features give ``audio`` as a struct of
  binary and string, and the cast types it afterwards, because ``datasets`` encodes every
  ``Audio`` value through torchcodec (``Audio.encode_example`` imports it even for bytes),
  which is not installed here; with torchcodec a user would give ``Audio`` directly and
  ``datasets`` would pass the bytes through as they are, the same work. ``identical``: both
  outputs, read back with ``load_dataset("parquet", ...)``, type ``audio`` as ``Audio`` and
  hold the same rows (every labelled key; same FLAC bytes, units, frames and speaker).
* ``streaming``: every sample of ``units.labels.streaming.unit_pipeline(root, labels)``
  against ``units.labels.torch_dataset.UnitDataset(root, labels)``, no crop, shard order
  and shuffles off, through ``DataLoader(batch_size=None, num_workers=0)``, over the local
  root (each pass builds its dataset: the commit records are read inside the timed span).
  Then the root's first shards up to ``--s3-hours`` of audio (default 0.25: unbuffered, moto
  serves the sample at 40-50 s per audio hour here), uploaded with pyarrow to a real
  S3-compatible server (moto on loopback, started as ``tests/conftest.py``'s ``s3_server``
  fixture starts it): ``unit_pipeline("s3://...")`` as it is (the shard tars read through
  ``shards.core.storage.open_stream``, a 1 MiB read buffer) against the same pipeline with
  its opener replaced, in this script only, by an unbuffered ``storage.open_input`` (each
  small read of ``tarfile`` a ranged GET). ``gets_*``: the GET requests moto logged during a
  run. UnitDataset reads local roots only. ``identical`` (local): both yield every labelled
  key once, with the same waveform and units (a digest of each sample, from an untimed pass
  of each); (s3): the bucket's pipeline yields the local samples of its shards (the same
  digests), and the unbuffered passes the same number of samples and audio samples.

Prints, per case::

    RESULT bench=exports case=lhotse hours=0.87 utterances=251 shards=8 ours_seconds=...
        lhotse_seconds=... speedup=... ours_hours_per_s=... lhotse_hours_per_s=...
        identical=True repeats=... busy_cores=...
    RESULT bench=exports case=hf hours=0.87 ... ours_seconds=... datasets_seconds=...
        speedup=... identical=True ...
    RESULT bench=exports case=streaming root=local hours=0.87 samples=251
        unit_pipeline_samples_per_s=... unit_pipeline_hours_per_s=...
        unit_dataset_samples_per_s=... unit_dataset_hours_per_s=...
        ratio_vs_unit_dataset=... identical=True ...
    RESULT bench=exports case=streaming root=s3 hours=... samples=... buffered_samples_per_s=...
        buffered_hours_per_s=... unbuffered_samples_per_s=... unbuffered_hours_per_s=...
        ratio_vs_unbuffered=... gets_buffered=... gets_unbuffered=... identical=True ...

``speedup`` and ``ratio_*``: the baseline's best seconds over ours (above 1: ours is
faster). ``busy_cores``: cores busy with other work just before the case (from
``/proc/stat``); timings next to other work are noisy: the ratio within one run is the
figure to read, not the absolute times.

Usage:
    python bench/exports.py                          # every case on the whole sample
    python bench/exports.py --hours 0.25 --cases lhotse hf
    python bench/exports.py --s3-hours 0.87          # the whole sample from the bucket too
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence

from _common import REPO, busy_cores, prepare
from targets import CORES, build_root, fit, select, settle

prepare()  # bench/label.py's import ran it too: this directory is off sys.path from here.

CASES = ("lhotse", "hf", "streaming")
K = 100
FEATURES = "mfcc"
KMEANS = f"km{K}"
LABELS = f"km{K}"
SAMPLE_RATE = 16_000
BUCKET = "bench-exports"


# ---------------------------------------------------------------------------------------------
# Set-up: a labelled root from the sample's first hours


@dataclasses.dataclass(frozen=True)
class Root:
    """A labelled root and what it holds."""

    path: str
    hours: float
    utterances: int
    shards: int


def build(workdir: str, hours: float, seed: int) -> Root:
    """The root of the sample's first ``hours``, labelled with k-means k = 100 on MFCC; a
    root that an earlier run built for the same ``hours`` and ``seed`` is reused."""
    base = os.path.join(workdir, "setup")
    record = os.path.join(workdir, "setup.json")
    wanted = {"hours": hours, "seed": seed, "labels": LABELS}
    with contextlib.suppress(OSError, ValueError):
        with open(record) as f:
            found = json.load(f)
        if {k: found.get(k) for k in wanted} == wanted:
            return Root(found["root"], found["audio_hours"], found["utterances"], found["shards"])
    shutil.rmtree(base, ignore_errors=True)
    started = time.perf_counter()
    paths, audio_hours = select(hours)
    os.chdir(REPO)  # Ray puts the current directory on its workers' sys.path.
    import ray

    # Ray's sockets live under its temp dir: a short private one, removed at the end.
    ray_tmp = tempfile.mkdtemp(prefix="exports-ray-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = ray_tmp
    from pipelines._ray import local_options
    from units.features.extractors import ExtractorOptions
    from units.labels.stage import run as label

    ray.init(
        address="local",
        num_cpus=CORES,
        include_dashboard=False,
        log_to_driver=False,
        **local_options(),
    )
    try:
        root, shards = build_root(base, paths)
        fit(root, FEATURES, ExtractorOptions("mfcc"), [(KMEANS, K)], seed)
        meta = label(root, KMEANS, LABELS, workers=CORES)
    finally:
        ray.shutdown()  # Nothing of Ray runs beside the timed contenders.
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if meta.get("rejects"):
        print(f"  warning: the label pass rejected {meta['rejects']} utterances", flush=True)
    found = dict(
        wanted,
        root=root,
        audio_hours=audio_hours,
        utterances=meta["utterances"],
        shards=shards,
    )
    with open(record, "w") as f:
        json.dump(found, f)
    print(
        f"setup: {len(paths)} utterances, {audio_hours:.3f} audio hours, {shards} shards, MFCC,"
        f" k-means k={K}, labels in {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    return Root(root, audio_hours, meta["utterances"], shards)


# ---------------------------------------------------------------------------------------------
# What the baselines read: the root by hand, as a user without this project would


@dataclasses.dataclass(frozen=True)
class Labelled:
    """One labelled utterance as the baselines read it."""

    key: str
    flac: bytes
    units: object  # np.ndarray of uint16
    speaker: str | None


def labelled_by_hand(root: str) -> Iterator[Labelled]:
    """Every labelled utterance of ``root``, shard by shard in stored order: the label
    Parquet and the manifest read with pyarrow, the shard tars with ``tarfile``."""
    import numpy as np
    import pyarrow.parquet as pq

    manifest = pq.read_table(
        os.path.join(root, "manifest", "utterances.parquet"), columns=["key", "speaker"]
    )
    speakers = dict(zip(*(manifest.column(c).to_pylist() for c in ("key", "speaker")), strict=True))
    for path in sorted(glob.glob(os.path.join(root, "labels", LABELS, "units", "*.parquet"))):
        table = pq.read_table(path, columns=["key", "units"])
        units = {
            key: np.asarray(values, dtype=np.uint16)
            for key, values in zip(
                table.column("key").to_pylist(),
                table.column("units").to_numpy(zero_copy_only=False),
                strict=True,
            )
        }
        shard = os.path.basename(path).split(".")[0]
        with tarfile.open(os.path.join(root, "shards", f"{shard}.tar")) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if ext == "flac" and key in units:
                    data = tar.extractfile(member).read()
                    yield Labelled(key, data, units.pop(key), speakers[key])


def label_units(root: str) -> dict:
    """The label set's units by key (uint16 arrays), for the checks."""
    return {item.key: item.units for item in labelled_by_hand(root)}


def frame_shift(root: str) -> float:
    with open(os.path.join(root, "labels", LABELS, "meta.json")) as f:
        return 1.0 / float(json.load(f)["frame_rate"])


def shard_names(root: str) -> list[str]:
    with open(os.path.join(root, "labels", LABELS, "meta.json")) as f:
        return list(json.load(f)["shards"])


# ---------------------------------------------------------------------------------------------
# Taking turns


def turns(
    contenders: dict[str, Callable[[str], None]], runs_dir: str, repeats: int, keep: str
) -> dict[str, list[float]]:
    """Runs each contender ``repeats`` times in turns, each into a fresh directory under
    ``runs_dir``; returns their seconds. The last run of each is kept in ``runs_dir/keep/
    NAME`` for the checks, the others removed."""
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for i in range(repeats):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            out = os.path.join(runs_dir, f"{name}-{i}")
            shutil.rmtree(out, ignore_errors=True)
            settle(f"{name}, round {i}", limit=2.0)
            started = time.perf_counter()
            contenders[name](out)
            seconds[name].append(time.perf_counter() - started)
            final = os.path.join(runs_dir, keep, name)
            shutil.rmtree(final, ignore_errors=True)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.rename(out, final)
        print(
            f"  round {i}: " + ", ".join(f"{n} {seconds[n][-1]:.2f} s" for n in names),
            flush=True,
        )
    return seconds


def ratio_line(seconds: dict[str, list[float]], hours: float, ours: str, theirs: str) -> str:
    best = {name: min(values) for name, values in seconds.items()}
    return (
        f" ours_seconds={best[ours]:.2f} {theirs}_seconds={best[theirs]:.2f}"
        f" speedup={best[theirs] / best[ours]:.2f} ours_hours_per_s={hours / best[ours]:.3f}"
        f" {theirs}_hours_per_s={hours / best[theirs]:.3f}"
    )


# ---------------------------------------------------------------------------------------------
# lhotse


def ours_lhotse(root: str, out: str) -> None:
    from units.exports import lhotse as export

    results = [export.export_shard(root, LABELS, shard, out) for shard in shard_names(root)]
    export.finish(root, LABELS, out, results)


def lhotse_by_hand(root: str, out: str, shard_size: int) -> None:
    """A Shar of the label set as a lhotse user writes one: in-memory recordings of the FLAC
    members, the units attached as a temporal array, ``CutSet.to_shar``."""
    from lhotse import CutSet, Recording, SupervisionSegment, fastcopy

    shift = frame_shift(root)
    cuts = []
    for item in labelled_by_hand(root):
        recording = Recording.from_bytes(item.flac, recording_id=item.key)
        cut = recording.to_cut()
        supervision = SupervisionSegment(
            id=item.key,
            recording_id=item.key,
            start=0.0,
            duration=recording.duration,
            channel=0,
            speaker=item.speaker,
        )
        cut = fastcopy(cut, supervisions=[supervision])
        cuts.append(cut.attach_tensor("units", item.units, frame_shift=shift, temporal_dim=0))
    os.makedirs(out)  # to_shar does not make it.
    CutSet(cuts).to_shar(out, fields={"recording": "flac", "units": "numpy"}, shard_size=shard_size)


def same_shars(ours: str, theirs: str, units: dict) -> tuple[bool, list[str]]:
    """Both Shar directories read back with ``CutSet.from_shar``: the same cut ids (the
    labelled keys), and per cut the same samples and the label set's units."""
    import numpy as np
    from lhotse import CutSet

    problems = []
    a = {cut.id: cut for cut in CutSet.from_shar(in_dir=ours)}
    b = {cut.id: cut for cut in CutSet.from_shar(in_dir=theirs)}
    if set(a) != set(units) or set(b) != set(units):
        problems.append(f"cut ids: ours {len(a)}, lhotse {len(b)}, labelled {len(units)}")
    for key in sorted(set(a) & set(b) & set(units)):
        if not np.array_equal(a[key].load_audio(), b[key].load_audio()):
            problems.append(f"{key}: audio differs")
        for name, cut in (("ours", a[key]), ("lhotse", b[key])):
            if not np.array_equal(np.asarray(cut.load_units()), units[key]):
                problems.append(f"{key}: {name}'s units differ from the label set's")
    return not problems, problems


def lhotse_case(root: Root, runs_dir: str, repeats: int) -> None:
    import lhotse

    shard_size = -(-root.utterances // root.shards)
    contenders = {
        "ours": lambda out: ours_lhotse(root.path, out),
        "lhotse": lambda out: lhotse_by_hand(root.path, out, shard_size),
    }
    busy = busy_cores()
    seconds = turns(contenders, runs_dir, repeats, "lhotse")
    kept = os.path.join(runs_dir, "lhotse")
    identical, problems = same_shars(
        os.path.join(kept, "ours", "shar"), os.path.join(kept, "lhotse"), label_units(root.path)
    )
    for problem in problems[:10]:
        print(f"  differs: {problem}", flush=True)
    print(
        f"RESULT bench=exports case=lhotse hours={root.hours:.3f} utterances={root.utterances}"
        f" shards={root.shards}{ratio_line(seconds, root.hours, 'ours', 'lhotse')}"
        f" identical={identical} repeats={repeats} busy_cores={busy:.1f}"
        f" lhotse_version={lhotse.__version__}",
        flush=True,
    )


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets


def ours_hf(root: str, out: str) -> None:
    from units.exports import hf as export

    results = [export.export_shard(root, LABELS, shard, out) for shard in shard_names(root)]
    export.finish(root, LABELS, out, results)


def hf_rows(root: str) -> Iterator[dict]:
    """The rows of the by-hand dataset (module level: ``datasets`` hashes the generator)."""
    for item in labelled_by_hand(root):
        yield {
            "key": item.key,
            "audio": {"bytes": item.flac, "path": f"{item.key}.flac"},
            "units": item.units,
            "frames": len(item.units),
            "speaker": item.speaker,
        }


def datasets_by_hand(root: str, out: str) -> None:
    """The label set as a ``datasets`` user writes it: ``Dataset.from_generator`` into a
    fresh Arrow cache, ``Audio`` cast on, ``to_parquet``."""
    from datasets import Audio, Dataset, Features, List, Value

    features = Features(
        {
            "key": Value("string"),
            # Audio's own storage type; typed Audio by the cast below (see the docstring).
            "audio": {"bytes": Value("binary"), "path": Value("string")},
            "units": List(Value("uint16")),
            "frames": Value("int32"),
            "speaker": Value("string"),
        }
    )
    ds = Dataset.from_generator(
        hf_rows,
        features=features,
        gen_kwargs={"root": root},
        cache_dir=os.path.join(out, "cache"),
    )
    ds = ds.cast_column("audio", Audio(sampling_rate=SAMPLE_RATE))
    ds.to_parquet(os.path.join(out, "data", "train.parquet"))


def same_parquet(ours: str, theirs: str, cache: str, units: dict) -> tuple[bool, list[str]]:
    """Both datasets read back with ``load_dataset("parquet", ...)``: ``audio`` typed
    ``Audio``, the same rows by key, the label set's units."""
    import numpy as np
    from datasets import Audio, load_dataset

    problems = []
    rows = {}
    for name, directory in (("ours", ours), ("datasets", theirs)):
        files = sorted(glob.glob(os.path.join(directory, "data", "*.parquet")))
        ds = load_dataset("parquet", data_files=files, split="train", cache_dir=cache)
        if not isinstance(ds.features["audio"], Audio):
            problems.append(f"{name}: audio is {ds.features['audio']}, not Audio")
        table = ds.data.table
        audio = table.column("audio").combine_chunks()
        rows[name] = {
            key: (data, frames, speaker)
            for key, data, frames, speaker in zip(
                table.column("key").to_pylist(),
                audio.field("bytes").to_pylist(),
                table.column("frames").to_pylist(),
                table.column("speaker").to_pylist(),
                strict=True,
            )
        }
        unit_values = table.column("units").to_pylist()
        for key, values in zip(table.column("key").to_pylist(), unit_values, strict=True):
            if key in units and not np.array_equal(np.asarray(values), units[key]):
                problems.append(f"{name}: {key}'s units differ from the label set's")
        if set(rows[name]) != set(units):
            problems.append(f"{name}: {len(rows[name])} rows, {len(units)} labelled")
    for key in sorted(set(rows["ours"]) & set(rows["datasets"])):
        if rows["ours"][key] != rows["datasets"][key]:
            problems.append(f"{key}: audio bytes, frames or speaker differ")
    return not problems, problems


def hf_case(root: Root, runs_dir: str, repeats: int) -> None:
    import datasets

    datasets.disable_progress_bars()
    contenders = {
        "ours": lambda out: ours_hf(root.path, out),
        "datasets": lambda out: datasets_by_hand(root.path, out),
    }
    busy = busy_cores()
    seconds = turns(contenders, runs_dir, repeats, "hf")
    kept = os.path.join(runs_dir, "hf")
    identical, problems = same_parquet(
        os.path.join(kept, "ours"),
        os.path.join(kept, "datasets"),
        os.path.join(runs_dir, "hf-read-cache"),
        label_units(root.path),
    )
    for problem in problems[:10]:
        print(f"  differs: {problem}", flush=True)
    print(
        f"RESULT bench=exports case=hf hours={root.hours:.3f} utterances={root.utterances}"
        f" shards={root.shards}{ratio_line(seconds, root.hours, 'ours', 'datasets')}"
        f" identical={identical} repeats={repeats} busy_cores={busy:.1f}"
        f" datasets_version={datasets.__version__}",
        flush=True,
    )


# ---------------------------------------------------------------------------------------------
# Streaming


def pass_over(data) -> tuple[int, int]:
    """Samples and audio samples of one pass over ``data`` through a single-process
    DataLoader, as a trainer reads it."""
    from torch.utils.data import DataLoader

    count = audio = 0
    for sample in DataLoader(data, batch_size=None, num_workers=0):
        count += 1
        audio += len(sample["waveform"])
    return count, audio


def digests(data) -> dict[str, str]:
    """Each sample's key -> a digest of its waveform and units (one untimed pass); a key
    seen twice maps to ``"twice"``."""
    from torch.utils.data import DataLoader

    out = {}
    for sample in DataLoader(data, batch_size=None, num_workers=0):
        digest = hashlib.blake2b(sample["waveform"].numpy().tobytes(), digest_size=16)
        digest.update(sample["units"].numpy().tobytes())
        key = sample["key"]
        out[key] = "twice" if key in out else digest.hexdigest()
    return out


def rate_fields(name: str, seconds: list[float], counts: tuple[int, int]) -> str:
    best = min(seconds)
    samples, audio = counts
    hours = audio / SAMPLE_RATE / 3600
    return (
        f" {name}_seconds={best:.2f} {name}_samples_per_s={samples / best:.1f}"
        f" {name}_hours_per_s={hours / best:.3f}"
    )


def timed_passes(
    contenders: dict[str, Callable[[], tuple[int, int]]],
    repeats: int,
    counter: Callable[[], int] | None = None,
) -> tuple[dict[str, list[float]], dict[str, tuple[int, int]], dict[str, list[int]]]:
    """Runs each contender's pass ``repeats`` times in turns; their seconds, (samples, audio
    samples) of a pass, and ``counter()``'s increase over each run (requests)."""
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    increase: dict[str, list[int]] = {name: [] for name in contenders}
    counts: dict[str, tuple[int, int]] = {}
    names = list(contenders)
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            settle(f"{name}, round {i}", limit=2.0)
            before = counter() if counter else 0
            started = time.perf_counter()
            counts[name] = contenders[name]()
            seconds[name].append(time.perf_counter() - started)
            increase[name].append((counter() if counter else 0) - before)
        print(
            f"  round {i}: " + ", ".join(f"{n} {seconds[n][-1]:.2f} s" for n in names),
            flush=True,
        )
    return seconds, counts, increase


@contextlib.contextmanager
def unbuffered_reads():
    """``unit_pipeline`` opening its shard tars with ``storage.open_input`` (no read
    buffer) instead of ``storage.open_stream``, for this script only."""
    from shards.core import storage
    from units.labels import streaming

    saved = streaming.open_stream
    streaming.open_stream = storage.open_input
    try:
        yield
    finally:
        streaming.open_stream = saved


class Moto:
    """A moto S3 server on loopback (as ``tests/conftest.py``'s ``s3_server`` starts it),
    its request log in ``log_path``; sets the S3 environment of this process."""

    def __init__(self, workdir: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        self.log_path = os.path.join(workdir, "moto.log")
        self._log = open(self.log_path, "wb")
        server = os.path.join(os.path.dirname(sys.executable), "moto_server")
        self.proc = subprocess.Popen(
            [server, "-H", "127.0.0.1", "-p", str(port)], stdout=self._log, stderr=self._log
        )
        for _ in range(100):
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        os.environ.update(
            AWS_ENDPOINT_URL=self.endpoint,
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_DEFAULT_REGION="us-east-1",
        )

    def gets(self) -> int:
        """GET requests logged so far."""
        self._log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().count(b"GET /")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self._log.close()


def upload(root: str, endpoint: str, shards: list[str] | None) -> str:
    """Copies what a reader of the label set needs (the manifest, the label set, the shard
    tars; ``shards`` only, where given) to the bucket with pyarrow; returns the root URL."""
    import pyarrow.fs as pafs

    s3 = pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True)
    s3.create_dir(BUCKET)
    local = pafs.LocalFileSystem()
    prefix = f"{BUCKET}/root"
    pafs.copy_files(
        os.path.join(root, "manifest"), f"{prefix}/manifest", local, s3, use_threads=True
    )
    labels = os.path.join(root, "labels", LABELS)
    for name in sorted(os.listdir(labels)):
        path = os.path.join(labels, name)
        if os.path.isfile(path):
            pafs.copy_files(path, f"{prefix}/labels/{LABELS}/{name}", local, s3)
            continue
        for entry in sorted(os.listdir(path)):
            shard = entry.split(".")[0]
            if shards is None or shard in shards or name not in ("units", "commits", "rejects"):
                pafs.copy_files(
                    os.path.join(path, entry), f"{prefix}/labels/{LABELS}/{name}/{entry}", local, s3
                )
    for shard in sorted(shards or shard_names(root)):
        tar = os.path.join(root, "shards", f"{shard}.tar")
        pafs.copy_files(tar, f"{prefix}/shards/{shard}.tar", local, s3)
    return f"s3://{prefix}"


def s3_shards(root: Root, s3_hours: float | None) -> list[str] | None:
    """The first shards whose audio reaches ``s3_hours`` (all for None)."""
    if s3_hours is None or s3_hours >= root.hours:
        return None
    import pyarrow.parquet as pq

    table = pq.read_table(
        os.path.join(root.path, "manifest", "utterances.parquet"), columns=["shard", "num_samples"]
    )
    seconds: dict[str, float] = {}
    columns = (table.column(c).to_pylist() for c in ("shard", "num_samples"))
    for shard, n in zip(*columns, strict=True):
        seconds[shard] = seconds.get(shard, 0.0) + n / SAMPLE_RATE
    chosen, total = [], 0.0
    for shard in sorted(seconds):
        if total >= s3_hours * 3600:
            break
        chosen.append(shard)
        total += seconds[shard]
    return chosen


def streaming_case(root: Root, workdir: str, repeats: int, s3_hours: float | None) -> None:
    from units.labels.streaming import unit_pipeline
    from units.labels.torch_dataset import UnitDataset

    def pipeline(where: str):
        return unit_pipeline(where, LABELS, shuffle_shards=False)

    def dataset():
        return UnitDataset(root.path, LABELS, shuffle=False)

    labelled = set(label_units(root.path))
    reference = digests(dataset())  # Untimed: the samples every contender must yield.
    problems = []
    if set(reference) != labelled or "twice" in reference.values():
        problems.append(f"UnitDataset: {len(reference)} keys, {len(labelled)} labelled")
    if digests(pipeline(root.path)) != reference:
        problems.append("unit_pipeline (local) differs from UnitDataset")
    busy = busy_cores()
    seconds, counts, _ = timed_passes(
        {
            "unit_pipeline": lambda: pass_over(pipeline(root.path)),
            "unit_dataset": lambda: pass_over(dataset()),
        },
        repeats,
    )
    if counts["unit_dataset"] != counts["unit_pipeline"]:
        problems.append(f"counts differ: {counts}")
    for problem in problems:
        print(f"  differs: {problem}", flush=True)
    samples, audio = counts["unit_pipeline"]
    best = {name: min(values) for name, values in seconds.items()}
    print(
        f"RESULT bench=exports case=streaming root=local hours={audio / SAMPLE_RATE / 3600:.3f}"
        f" samples={samples}"
        f"{rate_fields('unit_pipeline', seconds['unit_pipeline'], counts['unit_pipeline'])}"
        f"{rate_fields('unit_dataset', seconds['unit_dataset'], counts['unit_dataset'])}"
        f" ratio_vs_unit_dataset={best['unit_dataset'] / best['unit_pipeline']:.2f}"
        f" identical={not problems} repeats={repeats} busy_cores={busy:.1f}",
        flush=True,
    )

    moto = Moto(workdir)
    try:
        shards = s3_shards(root, s3_hours)
        url = upload(root.path, moto.endpoint, shards)
        expected = pipeline(url).utterances  # The labelled utterances of the uploaded shards.

        def unbuffered() -> tuple[int, int]:
            with unbuffered_reads():
                return pass_over(pipeline(url))

        on_s3 = digests(pipeline(url))
        problems = []
        if len(on_s3) != expected or any(reference.get(k) != d for k, d in on_s3.items()):
            problems.append("unit_pipeline on s3 differs from UnitDataset on the local root")
        busy = busy_cores()
        seconds, counts, gets = timed_passes(
            {"buffered": lambda: pass_over(pipeline(url)), "unbuffered": unbuffered},
            repeats,
            moto.gets,
        )
        if counts["unbuffered"] != counts["buffered"] or counts["buffered"][0] != expected:
            problems.append(f"counts differ: {counts}, {expected} labelled")
        for problem in problems:
            print(f"  differs: {problem}", flush=True)
        samples, audio = counts["buffered"]
        best = {name: min(values) for name, values in seconds.items()}
        print(
            f"RESULT bench=exports case=streaming root=s3 hours={audio / SAMPLE_RATE / 3600:.3f}"
            f" samples={samples} shards={len(shards or shard_names(root.path))}"
            f"{rate_fields('buffered', seconds['buffered'], counts['buffered'])}"
            f"{rate_fields('unbuffered', seconds['unbuffered'], counts['unbuffered'])}"
            f" ratio_vs_unbuffered={best['unbuffered'] / best['buffered']:.2f}"
            f" gets_buffered={min(gets['buffered'])} gets_unbuffered={min(gets['unbuffered'])}"
            f" identical={not problems} repeats={repeats} busy_cores={busy:.1f} server=moto",
            flush=True,
        )
    finally:
        moto.stop()


# ---------------------------------------------------------------------------------------------
# Driver


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--hours",
        type=float,
        default=0.87,
        help="audio hours from the sample (default %(default)s: all of it)",
    )
    parser.add_argument(
        "--s3-hours",
        type=float,
        default=0.25,
        help="streaming: audio hours (the first whole shards) on the bucket; unbuffered reads "
        "are slow, 0.87 reads all of the sample (default %(default)s)",
    )
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--repeats", type=int, default=3, help="rounds (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workdir",
        default=os.path.join(REPO, "bench-output", "exports"),
        help="the root is built here and reused (default %(default)s)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    root = build(workdir, args.hours, args.seed)
    import torch

    torch.set_num_threads(1)  # One core for every contender.
    print(
        f"root: {root.utterances} utterances, {root.hours:.3f} audio hours, {root.shards}"
        f" shards, k={K}; {os.cpu_count()} cores, one used; repeats={args.repeats}",
        flush=True,
    )
    runs_dir = tempfile.mkdtemp(prefix="runs-", dir=workdir)
    try:
        if "lhotse" in args.cases:
            lhotse_case(root, runs_dir, args.repeats)
        if "hf" in args.cases:
            hf_case(root, runs_dir, args.repeats)
        if "streaming" in args.cases:
            streaming_case(root, runs_dir, args.repeats, args.s3_hours)
    finally:
        shutil.rmtree(runs_dir, ignore_errors=True)
    print(f"bench exports took {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
