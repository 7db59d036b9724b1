"""The one engine of the stages that stream audio shards: features, labels, wav2vec-U.

A stage gives an :class:`~shards.core.outputs.OutputLayout`, a worker class and the rows of
each shard to do; the engine owns the rest:

- the pending list (a committed shard is never done twice; a finished run does nothing),
- placement (:func:`shards.core.placement.place`): one task at a time per CPU, or GPU actors
  whose audio is decoded by threads of their own, members ahead of the batch the GPU
  computes, so a GPU never waits on FLAC decoding (:func:`read_ahead`),
- a shard whose worker is lost goes to a live one (:class:`shards.core.placement.TaskPool`,
  :class:`shards.core.placement.ShardPool`),
- decoding and batching (:func:`batches`, a rule of the shard alone, so neither the number
  of workers nor a retry changes what shares a batch: README, "Determinism"),
- one shard's files written through a :class:`~shards.core.outputs.ShardOutput` and
  committed, or removed on failure,
- progress in audio hours, temporary files cleaned at the end, the throughput record.

On CPUs a shard is a Ray task (:func:`process_shard`) on one of the pooled worker processes
that Ray starts with the pipelines' modules imported (``pipelines._ray.WORKER_PRELOAD``):
an actor would start a process of its own for every run, 2-4 s with torch. The process
builds the stage's worker on its first shard of a run and keeps it for the run's next ones
(:class:`_Kept`). On GPUs a pool of actors holds the models.

A worker only implements "process one shard and write it through this output"::

    class Worker:
        batch_seconds: float  # audio per batch handed to write_shard

        def __init__(self, *args, device: str, **kwargs): ...

        def write_shard(self, out: ShardOutput, batches: Iterator[list[tuple[dict, ndarray]]]
                        ) -> dict[str, int]:  # the counts of the commit record

The k-means passes do not run here: they are not shard-to-file maps but rounds of a
reduction. Each round sends the same centroids to every actor and sums their partial
statistics in a fixed tree (``units.kmeans.tree_sum``) so the result is the same bits for any
number of workers, and no part is written to disk between rounds; their actors hold their
feature shards in memory across rounds (``units.kmeans.transport``). What they share with this
engine is the placement and the retry policy (:mod:`shards.core.placement`).

The shard stage (:mod:`shards.ray_sharding`) does not run here either: its unit of work is a
planned list of source files rather than the manifest rows of an existing audio shard, its
workers are stateless Ray tasks (there is no model to load once per worker), and it comes
before ``units`` in the one-way flow. It commits through the same :mod:`shards.core.atomic`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import gc
import itertools
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from shards.core import throughput
from shards.core.atomic import read_json, write_atomic
from shards.core.heap import release_free_memory
from shards.core.outputs import OutputLayout, StageError
from shards.core.placement import (
    TaskPool,
    actor_pool,
    column_total,
    longest_first,
    map_until_failure,
    place,
)
from shards.core.threads import use_allotted_threads
from shards.reader import read_audio
from units.features.extractor import FeatureSpec

log = logging.getLogger(__name__)


T = TypeVar("T")
R = TypeVar("R")


def read_ahead(items: Iterable[T], fn: Callable[[T], R], threads: int, window: int) -> Iterator[R]:
    """``fn(item)`` for each item, in order; with ``threads`` > 0, computed by that many
    threads at most ``window`` items ahead of the one the caller takes.

    The items are drawn on the caller's thread only (an ``itertools.tee`` is not thread
    safe), so ``fn`` alone runs on the threads: decoding, whose C code runs without the GIL.
    Memory stays bounded by ``window`` results. ``fn``'s exception reaches the caller at
    that item's place.
    """
    if threads <= 0:
        yield from map(fn, items)
        return
    if window < 1:
        raise ValueError(f"window={window} should be >= 1")
    items = iter(items)
    with ThreadPoolExecutor(threads, thread_name_prefix="read-ahead") as pool:
        ahead = collections.deque(pool.submit(fn, item) for item in itertools.islice(items, window))
        try:
            while ahead:
                done = ahead.popleft()
                for item in itertools.islice(items, 1):
                    ahead.append(pool.submit(fn, item))
                yield done.result()
        finally:
            for future in ahead:  # A caller that stops early waits for nothing it skipped.
                future.cancel()


def decode_row(root: str, row: dict) -> tuple[np.ndarray | None, str | None]:
    """Decodes one row's audio: (waveform, None), or (None, error message) for a member
    that cannot be that utterance's audio (its reject, not the shard's end)."""
    try:
        wav, rate = read_audio(root, row["shard"], row["offset"], row["size"])
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"
    if rate != 16_000 or wav.ndim != 1:
        return None, f"expected 16 kHz mono, got {rate} Hz, shape {wav.shape}"
    return wav, None


#: Rows a decode thread may run ahead of the batch being computed, per thread.
READ_AHEAD_ROWS_PER_THREAD = 4


def decode_rows(
    root: str, rows: Iterable[dict], threads: int = 0
) -> Iterator[tuple[np.ndarray | None, str | None]]:
    """Decodes the audio of ``rows`` as it is asked for (:func:`decode_row` each), in order.

    Lazily, so a worker holds one batch of audio and a few members ahead, never a whole
    shard's (a 1 GiB shard is about 15 h of audio, 3 GB of float32). With ``threads`` > 0,
    that many threads decode up to ``READ_AHEAD_ROWS_PER_THREAD`` rows each ahead of the
    caller, while it computes (a GPU actor); 0 decodes on the caller's thread (a one-CPU
    actor has no other core to decode on).
    """
    window = READ_AHEAD_ROWS_PER_THREAD * max(threads, 1)
    return read_ahead(rows, functools.partial(decode_row, root), threads, window)


def batches(
    rows: Iterable[dict],
    decoded: Iterable[tuple[np.ndarray | None, str | None]],
    batch_seconds: float,
    reject: Callable[[dict, str], None],
) -> Iterator[list[tuple[dict, np.ndarray]]]:
    """Decoded rows in batches of about ``batch_seconds`` of audio, in order; a row that
    failed to decode goes to ``reject(row, message)`` instead."""
    batch: list[tuple[dict, np.ndarray]] = []
    seconds = 0.0
    for row, (wav, error) in zip(rows, decoded, strict=True):
        if error is not None:
            reject(row, error)
            continue
        batch.append((row, wav))
        seconds += len(wav) / 16_000
        if seconds >= batch_seconds:
            yield batch
            batch, seconds = [], 0.0
            release_free_memory()  # The last batch's arrays are freed: see shards.core.heap.
    if batch:
        yield batch


def check_frames(spec: FeatureSpec, key: str, num_samples: int, frames: int) -> None:
    """Raises when ``frames`` breaks the frame contract: a bug, never a warning."""
    expected = spec.contract.frames(num_samples)
    if frames != expected:
        raise RuntimeError(
            f"{key}: {frames} feature frames for {num_samples} samples, expected {expected} "
            f"at {spec.frame_rate:g} Hz ({spec.extractor})"
        )


def claim(
    layout: OutputLayout, plan: dict, conflict: str, prepare: Callable[[], None] | None = None
) -> dict | None:
    """Records what an output is made from (``plan.json``) before any work, or checks that
    an output started earlier was made from the same; returns the saved plan, if any.

    Args:
        layout: The stage output.
        plan: What decides the output's content (never how it runs).
        conflict: What a different saved plan means, for the error.
        prepare: Makes the files the plan stands for (a drawn sample, say) before the plan
            is written, so that a saved plan always has them. It runs before anything of
            the output exists, so one that fails (a sample that cannot be drawn) leaves
            nothing; the output's directories are made once it returns.

    Raises:
        StageError: The output was started with another plan.
    """
    saved = read_json(layout.path("plan.json"))
    if saved is not None:
        if saved != plan:
            raise StageError(f"{layout.kind} {layout.name!r} {conflict}; use another --name")
        return saved
    if prepare is not None:
        prepare()
    layout.make_dirs()
    write_atomic(layout.path("plan.json"), json.dumps(plan, indent=1, sort_keys=True).encode())
    return None


class ShardActor:
    """A Ray actor around one stage worker: skips committed shards, decodes, batches, and
    commits what the worker wrote (or removes it when the worker fails)."""

    def __init__(
        self,
        layout: OutputLayout,
        worker: type,
        args: tuple,
        kwargs: dict,
        device: str,
        decode_threads: int = 0,
    ):
        use_allotted_threads()
        self.layout = layout
        self.worker = worker(*args, device=device, **kwargs)
        self.decode_threads = decode_threads

    def process_shard(self, shard: str, rows: pa.Table | list[dict]) -> dict:
        """Writes and commits ``shard``; returns its commit record, with ``written`` (False
        when it was already committed) and ``bytes_written``."""
        done = self.layout.read_commit(shard)
        if done is not None:
            return dict(done, written=False, bytes_written=0)
        rows = as_rows(rows)
        out = self.layout.output(shard)
        try:
            # One pass over the rows feeds both the decoder and the batches (tee holds the
            # rows between them: the read-ahead window at most), so each becomes a dict once.
            rows, to_decode = itertools.tee(rows)
            decoded = decode_rows(self.layout.root, to_decode, self.decode_threads)

            def reject(row: dict, error: str) -> None:
                out.reject(row["key"], "corrupt_audio", error)

            counts = self.worker.write_shard(
                out, batches(rows, decoded, self.worker.batch_seconds, reject)
            )
            record = out.commit(**counts)
        except BaseException:
            out.abort()
            raise
        return dict(record, written=True, bytes_written=out.bytes_written)


#: Seconds a pooled worker process keeps the stage worker it built after its last shard:
#: long enough for the run's next shard, short enough that a model on CPU does not stay in
#: every idle process after the stage.
KEEP_SECONDS = 30.0


class _Kept:
    """The stage worker (a :class:`ShardActor`) that a pooled Ray worker process built for
    one run, kept for that run's next shards. A shard of another run replaces it; a daemon
    thread drops it once it has been idle for :data:`KEEP_SECONDS`."""

    def __init__(self):
        self._lock = threading.Lock()
        self._token: str | None = None
        self._actor: ShardActor | None = None
        self._busy, self._used = 0, 0.0
        self._reaper: threading.Thread | None = None

    def take(self, token: str, build: Callable[[], ShardActor]) -> ShardActor:
        """Run ``token``'s worker, built now if this process holds another run's or none."""
        with self._lock:
            if self._token != token:
                if self._actor is not None:  # Another run's: its memory goes first.
                    self._token = self._actor = None
                    self._release()
                self._actor = build()
                self._token = token
            self._busy += 1
            if self._reaper is None:
                self._reaper = threading.Thread(target=self._reap, name="kept-worker", daemon=True)
                self._reaper.start()
            return self._actor

    def give_back(self) -> None:
        with self._lock:
            self._busy -= 1
            self._used = time.monotonic()

    def _reap(self) -> None:
        while True:
            time.sleep(KEEP_SECONDS / 4)
            with self._lock:
                idle = time.monotonic() - self._used > KEEP_SECONDS
                if self._actor is None or self._busy or not idle:
                    continue
                self._token = self._actor = None
                self._release()

    @staticmethod
    def _release() -> None:
        gc.collect()  # A model's modules hold reference cycles.
        release_free_memory(force=True)


_kept = _Kept()


def process_shard(
    token: str, layout: OutputLayout, worker: type, args: tuple, kwargs: dict, shard, rows
) -> dict:
    """A CPU stage's shard task (:data:`shard_task`): :meth:`ShardActor.process_shard` with
    this process's worker for run ``token`` (built on the run's first shard here,
    :class:`_Kept`)."""
    actor = _kept.take(token, lambda: ShardActor(layout, worker, args, kwargs, "cpu"))
    try:
        return actor.process_shard(shard, rows)
    finally:
        _kept.give_back()


# No retries by Ray: a task lost with its worker or node is sent again by the driver's pool
# (TaskPool), which so counts the shards written twice; a worker's own error is final. The
# function stays a plain one of this module, so Ray sends it by reference, not its globals.
shard_task = ray.remote(num_cpus=1, max_retries=0)(process_shard)


@dataclasses.dataclass(frozen=True)
class Pass:
    """What one run of :func:`run_pass` did.

    Attributes:
        shards_written: Shards this run wrote and committed.
        hours: Their audio hours.
        workers: Workers used (tasks at a time on CPUs, actors on GPUs).
        bytes_read: Audio bytes of those shards.
        bytes_written: Bytes of the files committed.
        shards_redone: Times a shard was written again from the start because the call
            that was writing it was lost with its actor (a node lost mid-shard): the work
            recomputed. A shard lost twice counts twice; a call sent again that found the
            shard committed (its lost call had committed it) redid nothing and does not.
    """

    shards_written: int
    hours: float
    workers: int
    bytes_read: int
    bytes_written: int
    shards_redone: int = 0

    def throughput(self, hours_field: str, started: float) -> dict:
        """The throughput record (:func:`shards.core.throughput.record`) of a run that started
        at ``started`` (``time.monotonic()``)."""
        return throughput.record(
            hours_field,
            self.hours,
            wall_seconds=time.monotonic() - started,
            workers=self.workers,
            bytes_read=self.bytes_read,
            bytes_written=self.bytes_written,
        )

    def result(self, meta: dict, hours_field: str, started: float) -> dict:
        """A stage's result, the same shape for every stage: ``meta`` (its ``meta.json``)
        with this run's ``shards_written``, ``shards_redone``, ``wall_seconds`` and
        ``throughput``."""
        record = self.throughput(hours_field, started)
        return dict(
            meta,
            shards_written=self.shards_written,
            shards_redone=self.shards_redone,
            wall_seconds=record["wall_seconds"],
            throughput=record,
        )


#: A run that found every shard committed.
NOTHING_TO_DO = Pass(0, 0.0, 0, 0, 0)


def run_pass(
    layout: OutputLayout,
    worker: type,
    rows_by_shard: dict[str, list[dict]],
    *args,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    progress: bool = False,
    **kwargs,
) -> Pass:
    """Writes every shard of ``rows_by_shard`` that is not committed yet with
    ``worker(*args, device=..., **kwargs)`` actors. Ray must be initialised.

    Args:
        layout: The stage output.
        worker: The stage's worker class (see the module docstring).
        rows_by_shard: Manifest rows (``key``, ``shard``, ``offset``, ``size``, ``duration``,
            ...) of each audio shard, in manifest order.
        workers: CPU workers: shards in flight at once (default: one per CPU of the cluster).
        gpus_per_worker: GPUs per actor (``None``: one per actor when the cluster has GPUs;
            0: CPUs only).
        progress: Show the audio hours done on the driver, live.

    Returns:
        The shards written, their audio hours, the actors used, the bytes read and
        written, and the shards written again after a lost call (``shards_redone``). The
        shard files are all committed then, and no temporary file is left.

    Raises:
        Exception: The first worker error, once every call in flight has returned.
    """
    pending = longest_first(
        [s for s in sorted(rows_by_shard) if layout.read_commit(s) is None], rows_by_shard
    )
    if not pending:
        layout.remove_temps()
        return NOTHING_TO_DO
    layout.make_dirs()
    placement = place(workers, gpus_per_worker)
    if placement.device == "cpu":
        # One task per shard; the token tells the worker processes which run a shard is of.
        call = functools.partial(
            shard_task.options(num_cpus=placement.options["num_cpus"]).remote,
            uuid.uuid4().hex, layout, worker, args, kwargs,
        )  # fmt: skip
        pool = TaskPool(call, placement.actors(len(pending)))

        def send(call, shard):
            return call(shard, rows_by_shard[shard])
    else:
        pool = actor_pool(ShardActor, placement, len(pending), layout, worker, args, kwargs,
                          placement.device, placement.decode_threads)  # fmt: skip

        def send(actor, shard):
            return actor.process_shard.remote(shard, rows_by_shard[shard])

    # Calls sent per shard: the pool calls submit again for a shard whose call it lost.
    sent: collections.Counter = collections.Counter()

    def submit(handle, shard):
        sent[shard] += 1
        return send(handle, shard)

    hours = {s: column_total(rows_by_shard[s], "duration") / 3600 for s in pending}
    done_hours, bytes_written, redone = 0.0, 0, 0
    with throughput.hours_bar(sum(hours.values()), layout.kind, progress) as bar:
        for record in map_until_failure(pool, submit, pending):  # The bar closes on errors.
            # Every call but the one that wrote the shard was lost; each lost call before
            # that one had started the shard in vain (one that committed it before it was
            # lost leaves the last call nothing to do: written is False then).
            redone += max(0, sent[record["shard"]] - 1 - (not record["written"]))
            done_hours += hours[record["shard"]]
            bytes_written += record["bytes_written"]
            bar.update(hours[record["shard"]])
            log.debug("%s shard %s", layout.kind, record)
    layout.remove_temps()  # Every writer is done: what a lost race left behind goes.
    if redone:
        total = len(pending)
        log.warning(
            "%s: %d shard(s) of %d written again: lost mid-shard", layout.kind, redone, total
        )
    return Pass(
        shards_written=len(pending),
        hours=done_hours,
        workers=placement.actors(len(pending)),
        bytes_read=int(sum(column_total(rows_by_shard[s], "size") for s in pending)),
        bytes_written=bytes_written,
        shards_redone=redone,
    )


def rows_by_shard(rows: pa.Table | list[dict]) -> dict[str, pa.Table | list[dict]]:
    """Manifest rows grouped by their audio shard, in manifest order within each.

    A table stays columnar: each shard gets its own small table (a copy, so that sending it
    to a worker sends its rows, not the whole manifest's buffers). The driver then holds
    tens of bytes per utterance, where a dict per row took about a kilobyte.
    """
    if isinstance(rows, pa.Table):
        order = pc.sort_indices(rows, [("shard", "ascending")])  # Stable: manifest order.
        shard = rows.column("shard").take(order)
        starts = np.flatnonzero(
            np.concatenate([[True], pc.not_equal(shard[1:], shard[:-1]).to_numpy()])
        ) if len(rows) else np.zeros(0, dtype=np.int64)  # fmt: skip
        ends = np.append(starts[1:], len(rows))
        names = shard.take(pa.array(starts)).to_pylist()
        return {
            name: rows.take(order[lo:hi]) for name, lo, hi in zip(names, starts, ends, strict=True)
        }
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        grouped.setdefault(row["shard"], []).append(row)
    return grouped


def as_rows(rows: pa.Table | list[dict]) -> Iterator[dict]:
    """One shard's rows as dicts (on the worker that processes them), made as they are
    iterated, once: a 1 GiB shard of short utterances has tens of thousands, about 1 KB each."""
    if isinstance(rows, pa.Table):
        return (row for batch in rows.to_batches(max_chunksize=256) for row in batch.to_pylist())
    return iter(rows)
