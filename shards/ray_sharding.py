"""The shard stage on Ray: probe in parallel, one task per shard, resume from commits.

The driver lists inputs and makes the plan (columns, a few hundred bytes per input); Ray tasks
probe headers in batches and write shards. A shard whose worker dies mid-shard is sent again
by the driver, which so counts the work done twice (``shards_redone``); its temporary file
never becomes visible. A driver that dies leaves committed shards in place, and the next run
writes only the rest.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from . import discover
from . import plan as planning
from .core import storage, throughput
from .core.placement import LOST_TASK
from .discover import Source
from .manifest import finalize, read_summary
from .plan import ShardingOptions
from .probe import probe_many
from .root import RootLayout
from .shard_job import write_shard

log = logging.getLogger(__name__)

#: Fewest inputs probed by one task (more when there are many, a few tasks per CPU).
PROBE_BATCH = 128
#: A corpus with fewer inputs than this per CPU is probed by one task per CPU: a task costs
#: about 10 ms to send and return, as much as probing 300 files from a warm cache.
PROBE_ONE_TASK_PER_CPU = 1024


class UsageError(ValueError):
    """Arguments that cannot work; raised before any work is done."""


@ray.remote(num_cpus=1)
def _probe_task(sources: pa.Table, opts: ShardingOptions) -> tuple[pa.Table, list[dict]]:
    probes, rejects = probe_many(
        [Source(**row) for row in sources.to_pylist()], segment=opts.segment
    )
    return planning.probed_rows(probes, opts), rejects


# No retries by Ray: a task lost with its worker or node is sent again by the driver
# (_write_all), which so knows how much work was done twice; Ray's own retries would be
# invisible to it. A shard's own bad inputs never raise: application errors are final.
@ray.remote(num_cpus=1, max_retries=0)
def _shard_task(root, index, rows, opts):
    return write_shard(root, index, rows, opts)


def validate(inputs: list[str], root: str, opts: ShardingOptions) -> None:
    """Checks the arguments before any work; raises :class:`UsageError` saying what to do."""
    if not inputs:
        raise UsageError("no --input given; pass a corpus directory or a list file")
    try:
        opts.validate()
    except ValueError as e:
        raise UsageError(str(e)) from None
    out = root if storage.is_url(root) else os.path.realpath(storage.local_path(root))
    for path in inputs:
        if not storage.exists(path):
            raise UsageError(
                f"input {path!r} does not exist; pass a corpus directory or a list "
                "file (.tsv, .csv, .jsonl, .parquet)"
            )
        if storage.is_url(path):
            if storage.is_url(root) and (out == path or out.startswith(path.rstrip("/") + "/")):
                raise UsageError(
                    f"output {root!r} lies inside input {path!r}: its shards would be "
                    "read as inputs; choose an output outside the input tree"
                )
            continue
        src = os.path.realpath(storage.local_path(path))
        if os.path.isdir(src) and (out == src or out.startswith(src + os.sep)):
            raise UsageError(
                f"output {root!r} lies inside input {path!r}: its shards would be "
                "read as inputs; choose an output outside the input tree"
            )
        if not os.path.isdir(src) and not src.lower().endswith(discover.LIST_EXTENSIONS):
            raise UsageError(
                f"input {path!r} is a file but not a list "
                f"({', '.join(discover.LIST_EXTENSIONS)}); pass its directory"
            )


def probe_batch(inputs: int, cpus: int) -> int:
    """Inputs per probe task: four tasks per CPU on a large corpus (so that slow storage
    evens out), one per CPU on a small one, never fewer than :data:`PROBE_BATCH` inputs."""
    one_per_cpu = min(PROBE_ONE_TASK_PER_CPU, -(-inputs // max(1, cpus)))
    return max(PROBE_BATCH, one_per_cpu, -(-inputs // (4 * max(1, cpus))))


def _plan(inputs: list[str], layout: RootLayout, opts: ShardingOptions) -> planning.Plan:
    fingerprint = planning.fingerprint(inputs, opts)
    saved = planning.load(layout)
    if saved is not None:
        if saved.meta["fingerprint"] != fingerprint:
            raise UsageError(
                f"{layout.root} already holds a plan made from other inputs or options "
                f"(inputs {saved.meta['inputs']}, options {saved.meta['options']}); use a new "
                "--output, or delete its plan/, shards/ and manifest/ to start over"
            )
        log.info("reusing the saved plan: %d shards", len(saved.shards))
        return saved
    found = [discover.discover(path, opts.layout, opts.extensions) for path in inputs]
    sources = pa.concat_tables([f.table for f in found])
    rejects = [r for f in found for r in f.rejects]
    layouts = [f.layout for f in found]
    del found
    if not len(sources) and not rejects:
        raise UsageError(
            f"found no audio in {', '.join(inputs)} (layout {opts.layout}, extensions "
            f"{','.join(opts.extensions)}); check the path, --layout and --extensions"
        )
    log.info("discovered %d inputs (%s); probing headers", len(sources), ", ".join(layouts))
    per_task = probe_batch(len(sources), int(ray.cluster_resources().get("CPU", 1)))
    # Each batch is copied out of the table (take): a slice would send the whole table.
    refs = [
        _probe_task.remote(sources.take(np.arange(i, min(i + per_task, len(sources)))), opts)
        for i in range(0, len(sources), per_task)
    ]
    num_sources = len(sources)
    del sources  # The probe tasks hold their batches now.
    probed = []
    for rows, found_rejects in ray.get(refs):
        probed.append(rows)
        rejects.extend(found_rejects)
    del refs
    meta = {
        "version": planning.PLAN_VERSION,
        "fingerprint": fingerprint,
        "inputs": inputs,
        "options": opts.to_json(),
        "layout": ",".join(sorted(set(layouts))),
        "files": num_sources + sum(1 for r in rejects if r["stage"] == "discover"),
    }
    made = planning.make_plan(
        pa.concat_tables(probed) if probed else planning.PROBED.empty_table(), rejects, opts, meta
    )
    planning.save(layout, made)
    return made


def run(
    inputs: list[str],
    root: str,
    opts: ShardingOptions | None = None,
    *,
    progress: bool = False,
    on_shard: Callable[[dict], None] | None = None,
) -> dict:
    """Shards a corpus into ``root``; resumes whatever an earlier run left unfinished.

    Ray must be initialised (``ray.init``): locally or connected to a cluster.

    Args:
        inputs: Corpus directories or list files, local or URLs.
        root: The dataset root to write.
        opts: Sharding options (saved with the plan; a rerun must use the same).
        progress: Show a progress bar in audio hours and files.
        on_shard: Called with each finished shard's commit record.

    Returns:
        The summary written to ``ROOT/manifest/summary.json``, plus ``shards_written`` and
        ``shards_skipped`` for this run.

    Raises:
        UsageError: Bad arguments (before any work).
        RuntimeError: Shards that failed for reasons other than bad input (disk full, ...);
            the others are committed (after a full or read-only output, no further shard is
            started) and a rerun finishes the job. The first failure is its ``__cause__``.
    """
    opts = ShardingOptions() if opts is None else opts
    validate(inputs, root, opts)
    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialised: call ray.init() (or pass --address)")
    started = time.monotonic()
    layout = RootLayout(root)
    layout.make_dirs()
    for leftover in layout.temp_files():  # A killed writer's temporary files; never visible.
        storage.remove(leftover)
    made = _plan(inputs, layout, opts)
    pending = [i for i in range(len(made.shards)) if layout.read_commit(i) is None]
    skipped = len(made.shards) - len(pending)
    summary = read_summary(layout)
    if not pending and summary is not None:
        log.info("nothing to do: all %d shards are committed", len(made.shards))
        return dict(summary, shards_written=0, shards_skipped=skipped, shards_redone=0)
    if skipped:
        log.info("resuming: %d shards already committed, %d to write", skipped, len(pending))
    hours_written, bytes_written, failures, redone = _write_all(
        layout, made, pending, opts, progress, on_shard
    )
    for leftover in layout.temp_files():  # All tasks are done: no writer is alive.
        storage.remove(leftover)
    if failures:
        message, first = failures[0]
        raise RuntimeError(
            f"{len(failures)} shard(s) failed and are not committed; rerun the same command to "
            "retry them. First error:\n" + message
        ) from first
    summary = finalize(
        layout,
        len(made.shards),
        made.rejects,
        made.meta,
        throughput.record(
            "hours_written",
            hours_written,
            wall_seconds=time.monotonic() - started,
            # One task per CPU at a time (see _write_all), never more than there were shards.
            workers=min(len(pending), int(ray.cluster_resources().get("CPU", 1))),
            bytes_read=_source_bytes(made, pending),
            bytes_written=bytes_written,
        ),
        made.table.column("source"),
    )
    return dict(summary, shards_written=len(pending), shards_skipped=skipped, shards_redone=redone)


def _source_bytes(made: planning.Plan, pending: list[int]) -> int:
    """Bytes of the input files of ``pending`` shards (a file listed twice counted once)."""
    rows = made.table.select(["shard", "source", "file_bytes"])
    rows = rows.filter(pc.is_in(rows.column("shard"), value_set=pa.array(pending, pa.int32())))
    per_file = rows.group_by("source").aggregate([("file_bytes", "max")])
    return int(pc.sum(per_file.column("file_bytes_max")).as_py() or 0)


#: A shard task lost with its worker or node (preempted, crashed, killed for memory by
#: Ray's monitor) or its result (``LOST_TASK``) is sent again up to _RESUBMITS times before
#: it counts as failed, so that a shard that kills its worker every time cannot go round
#: forever.
_RESUBMITS = 5


class _Written(NamedTuple):
    """What :func:`_write_all` did."""

    hours: float
    bytes_written: int
    failures: list[tuple[str, BaseException]]
    #: Times a shard was written again from the start because its task was lost (a task
    #: sent again that found the shard committed redid nothing).
    shards_redone: int


#: Errors of the output's file system: every further shard would fail the same way.
_OUTPUT_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def _write_all(layout, made, pending, opts, progress, on_shard) -> _Written:
    """Writes the ``pending`` shards, a window of tasks at a time; a lost task is sent
    again. Returns the hours and bytes written, the failures, and ``shards_redone``."""
    resources = ray.cluster_resources()
    window = max(2, int(2 * resources.get("CPU", 1)))
    planned_hours = made.shard_hours()  # One number per shard: no shard's rows are copied.
    bar = throughput.hours_bar(float(planned_hours[pending].sum()), "audio", progress)
    in_flight: dict = {}
    queue = collections.deque(pending)
    hours = 0.0
    nbytes = files = 0
    failures: list[tuple[str, BaseException]] = []
    lost: collections.Counter = collections.Counter()  # Shard -> times sent again.
    redone = 0
    stop = False  # The output cannot be written: no further shard is started.
    while (queue and not stop) or in_flight:
        while queue and not stop and len(in_flight) < window:
            i = queue.popleft()
            ref = _shard_task.remote(layout.root, i, made.shards[i], opts)
            in_flight[ref] = i
        done, _ = ray.wait(list(in_flight), num_returns=1)
        for ref in done:
            i = in_flight.pop(ref)
            try:
                record = ray.get(ref)
            except Exception as e:
                if isinstance(e, LOST_TASK) and lost[i] < _RESUBMITS and not stop:
                    # The lost task is gone (its worker with it), and a shard is written
                    # from scratch, so send it once more.
                    lost[i] += 1
                    log.warning("shard %s was lost (%s); writing it again", i, type(e).__name__)
                    queue.appendleft(i)
                    continue
                failures.append((f"shard {layout.shard_name(i)}: {e}", e))
                cause = getattr(e, "cause", e)  # A RayTaskError carries the task's error.
                stop = stop or (isinstance(cause, OSError) and cause.errno in _OUTPUT_FULL)
                continue
            # Each lost task had started the shard in vain, unless it committed it before it
            # was lost: then this last task found it done (written is False).
            redone += max(0, lost[i] - (not record["written"]))
            hours += record["seconds"] / 3600
            nbytes += record["bytes"]
            files += made.shard_size(i)
            bar.update(float(planned_hours[i]))
            bar.set_postfix(
                files=files, shards=f"{len(pending) - len(queue) - len(in_flight)}/{len(pending)}"
            )
            if on_shard is not None:
                on_shard(record)
    bar.close()
    if redone:
        log.warning("%d shard(s) of %d written again: their task was lost", redone, len(pending))
    return _Written(hours, nbytes, failures, redone)
