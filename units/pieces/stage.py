"""Acoustic pieces of a finished label set on Ray: a sentencepiece model trained over a seeded
sample of deduplicated units, then every utterance encoded, shard by shard.

Layout under ``ROOT/pieces/NAME/``::

    model.spm                 the sentencepiece model (its ModelProto bytes)
    pieces.json               the model's lineage and sha256; with model.spm, before any shard
    plan.json                 what the output is made from, written once the model exists
    pieces/000000.parquet     key, shard, pieces, starts, lengths (list<int32>), frame_rate
    rejects/000000.parquet    always empty: a label shard's utterances all encode
    commits/000000.json       written last: the shard is complete
    meta.json                 lineage and totals; last

``pieces/`` is one Parquet dataset, one file per label shard, and joins the label set and the
utterances manifest on ``key``. A piece's ``starts`` and ``lengths`` are frames at the label
set's ``frame_rate``; the frames of each piece hold exactly its units, each repeated over its
run (:meth:`units.pieces.model.Pieces.encode_frames`, checked for every utterance).

The sample is every utterance whose :func:`units.features.sampling.priority` for the seed
is below the fraction asked for, so it depends on no order and no number of workers. The
model is trained before the plan is saved: a training that fails (a vocabulary the sample
cannot fill) leaves nothing, and the same name can be used again with other options. A
rerun reuses the model, skips committed shards and, once all are committed, does nothing.

Determinism: the sample is read in label-shard order and sentencepiece trains on one thread
with a fixed seed, so the same label set, options and sentencepiece version give the same
model bytes; encoding is integer work, so a shard's file is the same bytes whichever actor
writes it and however often it is retried.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shards.core import storage, throughput
from shards.core.atomic import read_json, write_atomic
from shards.core.outputs import OutputLayout, ShardOutput, StageError
from shards.core.placement import actor_pool, map_until_failure, place
from shards.root import RootLayout
from units import project_version
from units.features.sampling import priorities
from units.labels.model import dedup, label_layout
from units.pieces.model import MODEL_TYPES, Pieces, check_vocab_size, train
from units.schemas import PIECES, list_column
from units.stage import NOTHING_TO_DO, Pass, claim

log = logging.getLogger(__name__)


#: Utterances per row group of a pieces shard (as the label shards: a few MB each).
PIECES_ROW_GROUP = 1024


def pieces_layout(root: str, name: str) -> OutputLayout:
    """The files of pieces output ``name`` (see the module docstring)."""
    return OutputLayout(
        root,
        "pieces",
        name,
        data={"pieces": "pieces/{shard}.parquet"},
        rejects="rejects/{shard}.parquet",
        commit="commits/{shard}.json",
    )


def finished_labels(root: str, labels: str) -> dict:
    """The ``meta.json`` of label set ``labels``.

    Raises:
        StageError: The label set is missing or not finished.
    """
    meta = read_json(label_layout(root, labels).path("meta.json"))
    if meta is None:
        raise StageError(
            f"no finished labels {labels!r} under {root}: run `python -m pipelines.label "
            f"--root {root} --kmeans KMEANS --name {labels}` first"
        )
    return meta


def sample_fraction(meta: dict, percent: float | None, hours: float | None) -> float:
    """The share of utterances to sample: ``percent`` of them, or about ``hours`` of the
    label set's audio (each utterance is drawn with that probability, so the hours drawn
    are ``hours`` in expectation); neither: all of them.

    Raises:
        StageError: Both given, a percent outside (0, 100], or hours outside
            (0, the label set's hours].
    """
    if percent is not None and hours is not None:
        raise StageError("give --percent or --hours, not both")
    if percent is not None:
        if not 0 < percent <= 100:
            raise StageError(f"--percent must be in (0, 100], got {percent:g}")
        return percent / 100
    if hours is not None:
        total = float(meta["hours"])
        if not 0 < hours <= total * (1 + 1e-9):
            raise StageError(f"--hours must be in (0, {total:.3f}] (the label set), got {hours:g}")
        return min(1.0, hours / total)
    return 1.0


class _Sample:
    """The deduplicated units of the sampled utterances, label shard by label shard, in
    order; counts what it yielded (for ``pieces.json``).

    The driver holds one label shard's units at a time (2 bytes a frame): the sample itself
    goes straight into sentencepiece, which keeps it as 4 bytes of UTF-8 per deduplicated
    unit (about 0.6 GB for 960 h at 50 Hz, deduplication leaving some 60% of the frames),
    and more while it trains (unigram's suffix array several times that).
    """

    def __init__(self, root: str, labels: str, shards: list[str], fraction: float, seed: int):
        self.layout = label_layout(root, labels)
        self.shards, self.fraction, self.seed = shards, fraction, seed
        self.utterances = self.frames = self.units = 0

    def __iter__(self) -> Iterator[np.ndarray]:
        for shard in self.shards:
            path = self.layout.shard_path("units", shard)
            table = storage.read_parquet(path, columns=["key", "units"])
            keep = priorities(self.seed, table.column("key")) < self.fraction
            for units in _arrays(table.filter(pa.array(keep)).column("units")):
                values, _ = dedup(units)
                self.utterances += 1
                self.frames += len(units)
                self.units += len(values)
                yield values


def _arrays(column: pa.ChunkedArray | pa.ListArray) -> Iterator[np.ndarray]:
    """Each list of a list column as a numpy view (no Python object per element). A sliced
    chunk's ``offsets`` index its unsliced ``values``, so slices read right too."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    for chunk in chunks:
        offsets = chunk.offsets.to_numpy()
        values = chunk.values.to_numpy(zero_copy_only=False)
        for lo, hi in zip(offsets[:-1], offsets[1:], strict=True):
            yield values[lo:hi]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_json(path: str, record: dict) -> None:
    write_atomic(path, json.dumps(record, indent=1, sort_keys=True).encode())


def train_model(layout: OutputLayout, plan: dict, shards: list[str], fraction: float) -> dict:
    """Draws the sample, trains the model and writes ``model.spm``, then ``pieces.json``
    (lineage, sample size, the model's sha256); returns ``pieces.json``'s content.

    Raises:
        StageError: An empty sample, or a vocabulary the sample cannot fill.
    """
    sample = _Sample(layout.root, plan["labels"], shards, fraction, plan["seed"])
    try:
        model = train(sample, plan["vocab_size"], plan["model_type"], plan["seed"],
                      num_units=plan["k"])  # fmt: skip
    except ValueError as e:
        raise StageError(f"pieces {layout.name!r}: {e}") from None
    record = dict(
        plan,
        sha256=_sha256(model),
        sample_utterances=sample.utterances,
        sample_frames=sample.frames,
        sample_units=sample.units,
        version=project_version(),
    )
    storage.makedirs(layout.directory)
    write_atomic(layout.path("model.spm"), model)
    _write_json(layout.path("pieces.json"), record)  # After the model: it vouches for it.
    log.info("pieces %s: trained on %d utterances", layout.name, sample.utterances)
    return record


def load_model(root: str, name: str) -> tuple[bytes, dict]:
    """``model.spm`` and ``pieces.json`` of pieces output ``name``, checked against each other.

    Raises:
        StageError: No model there, or one whose sha256 is not the one recorded.
    """
    layout = pieces_layout(root, name)
    record = read_json(layout.path("pieces.json"))
    if record is None:
        raise StageError(f"no pieces model {name!r} under {root}: run pipelines.pieces first")
    model = storage.read_bytes(layout.path("model.spm"))
    if _sha256(model) != record["sha256"]:
        raise StageError(
            f"{layout.path('model.spm')} is not the model pieces.json records (sha256): "
            "remove the output and run again"
        )
    return model, record


class PiecesActor:
    """A Ray actor that encodes label shards with one model, one shard per call.

    Args:
        root: Dataset root.
        labels: The label set.
        name: The pieces output, whose model (checked against its sha256) it loads.
    """

    def __init__(self, root: str, labels: str, name: str):
        self.layout = pieces_layout(root, name)
        self.labels = label_layout(root, labels)
        model, _ = load_model(root, name)
        self.pieces = Pieces(model)

    def process_shard(self, shard: str, frame_rate: float) -> dict:
        """Writes and commits ``shard``'s pieces; returns its commit record, with ``written``
        (False when it was already committed), ``bytes_written`` and ``bytes_read``."""
        done = self.layout.read_commit(shard)
        if done is not None:
            return dict(done, written=False, bytes_written=0, bytes_read=0)
        source = self.labels.read_commit(shard)
        if source is None:
            raise RuntimeError(f"label shard {shard} of {self.labels.name!r} is not committed")
        out = ShardOutput(self.layout, shard)
        try:
            counts = self._write(out, frame_rate)
            record = out.commit(**counts)
        except BaseException:
            out.abort()
            raise
        return dict(
            record, written=True, bytes_written=out.bytes_written, bytes_read=source["bytes"]
        )

    def _write(self, out: ShardOutput, frame_rate: float) -> dict:
        # Streamed a row group at a time: the actor's memory does not grow with the shard.
        stream = out.stream_parquet("pieces", PIECES, PIECES_ROW_GROUP)
        path = self.labels.shard_path("units", out.shard)
        counts = {"utterances": 0, "pieces": 0, "frames": 0}
        with storage.open_input(path) as f:
            reader = pq.ParquetFile(f)
            for batch in reader.iter_batches(PIECES_ROW_GROUP, columns=["key", "units"]):
                encoded = [self.pieces.encode_frames(u) for u in _arrays(batch.column("units"))]
                n = batch.num_rows
                stream.write(
                    pa.table(
                        {
                            "key": batch.column("key"),
                            "shard": pa.array([out.shard] * n, pa.string()),
                            "pieces": list_column([e[0] for e in encoded], pa.int32()),
                            "starts": list_column([e[1] for e in encoded], pa.int32()),
                            "lengths": list_column([e[2] for e in encoded], pa.int32()),
                            "frame_rate": pa.array([frame_rate] * n, pa.float32()),
                        },
                        schema=PIECES,
                    )
                )
                counts["utterances"] += n
                counts["pieces"] += sum(len(e[0]) for e in encoded)
                counts["frames"] += sum(int(e[2].sum()) for e in encoded)
        return counts


def run(
    root: str,
    labels: str,
    name: str,
    *,
    vocab_size: int,
    model_type: str = "bpe",
    percent: float | None = None,
    hours: float | None = None,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = False,
) -> dict:
    """Trains acoustic pieces on label set ``labels`` and encodes it into ``ROOT/pieces/NAME``.

    Ray must be initialised (the model is trained on the driver; the shards are encoded by
    CPU actors).

    Args:
        root: Dataset root.
        labels: Finished label set under ``ROOT/labels``.
        name: Pieces output name.
        vocab_size: Pieces, ``<unk>`` included; at least the label set's k + 1.
        model_type: ``bpe`` or ``unigram``.
        percent: Sample this percent of the utterances to train on.
        hours: Or about this many hours of them. Neither: all of them.
        seed: Seed of the sample and of sentencepiece.
        workers: CPU actors (default: one per CPU).
        progress: Show the audio hours encoded on the driver, live.

    Returns:
        ``meta.json``'s content, plus this run's ``shards_written``, ``wall_seconds`` and
        ``throughput``.

    Raises:
        StageError: No such finished label set, bad options, a sample that is empty or
            cannot fill the vocabulary, or an output started with other labels or options.
    """
    started = time.monotonic()
    root = RootLayout(root).root
    meta = finished_labels(root, labels)
    if model_type not in MODEL_TYPES:
        raise StageError(f"model type {model_type!r}: use one of {', '.join(MODEL_TYPES)}")
    try:
        check_vocab_size(vocab_size, int(meta["k"]))
    except ValueError as e:
        raise StageError(f"labels {labels!r} (k={meta['k']}): {e}") from None
    fraction = sample_fraction(meta, percent, hours)
    layout = pieces_layout(root, name)
    plan = {
        "labels": labels,
        # What decides the label set's units: its k-means, manifest and options.
        "labels_plan_sha256": _sha256(
            storage.read_bytes(label_layout(root, labels).path("plan.json"))
        ),
        # For a reader; labels_plan_sha256 decides. A BEST-RQ label set has no k-means, and
        # with several codebooks its pieces are of the first (the ``units`` column).
        "kmeans": meta.get("kmeans"),
        "kmeans_fingerprint": meta.get("kmeans_fingerprint"),
        "k": int(meta["k"]),
        "vocab_size": int(vocab_size),
        "model_type": model_type,
        "percent": None if percent is None else float(percent),
        "hours": None if hours is None else float(hours),
        "seed": int(seed),
    }
    shards = list(meta["shards"])
    saved = claim(layout, plan, "was started with other labels or options",
                  prepare=lambda: train_model(layout, plan, shards, fraction))  # fmt: skip
    if saved is not None and read_json(layout.path("pieces.json")) is None:
        train_model(layout, plan, shards, fraction)  # Removed since; trained again, the same.
    model, record = load_model(root, name)
    done = encode_pass(layout, labels, shards, float(meta["frame_rate"]), workers, progress)
    finished = read_json(layout.path("meta.json")) if done.shards_written == 0 else None
    if finished is not None:
        return done.result(finished, "hours_encoded", started)
    totals = {"utterances": 0, "pieces": 0, "frames": 0, "rejects": 0}
    for shard in shards:
        commit = layout.read_commit(shard)
        for key in totals:
            totals[key] += commit[key]
    out = dict(record, shards=shards, frame_rate=meta["frame_rate"], **totals)
    out["hours"] = totals["frames"] / float(meta["frame_rate"]) / 3600
    out["version"] = project_version()
    _write_json(layout.path("meta.json"), out)
    return done.result(out, "hours_encoded", started)


def encode_pass(
    layout: OutputLayout,
    labels: str,
    shards: list[str],
    frame_rate: float,
    workers: int | None = None,
    progress: bool = False,
) -> Pass:
    """Encodes every label shard of ``shards`` not committed yet, with one-CPU actors (the
    placement and retries of :mod:`shards.core.placement`, as :func:`units.stage.run_pass`)."""
    pending = [s for s in shards if layout.read_commit(s) is None]
    if not pending:
        layout.remove_temps()
        return NOTHING_TO_DO
    layout.make_dirs()
    # Longest first, so the last shards handed out are short; the label commit records say
    # each shard's frames without reading it.
    source = label_layout(layout.root, labels)
    frames = {s: (source.read_commit(s) or {}).get("frames", 0) for s in pending}
    pending.sort(key=lambda s: -frames[s])
    placement = place(workers, 0)
    pool = actor_pool(PiecesActor, placement, len(pending), layout.root, labels, layout.name)
    hours = {s: frames[s] / frame_rate / 3600 for s in pending}
    done_hours, bytes_read, bytes_written = 0.0, 0, 0
    with throughput.hours_bar(sum(hours.values()), layout.kind, progress) as bar:
        calls = map_until_failure(
            pool, lambda actor, shard: actor.process_shard.remote(shard, frame_rate), pending
        )
        for record in calls:
            done_hours += hours[record["shard"]]
            bytes_read += record["bytes_read"]
            bytes_written += record["bytes_written"]
            bar.update(hours[record["shard"]])
    layout.remove_temps()  # Every writer is done: what a lost race left behind goes.
    return Pass(
        shards_written=len(pending),
        hours=done_hours,
        workers=placement.actors(len(pending)),
        bytes_read=bytes_read,
        bytes_written=bytes_written,
    )
