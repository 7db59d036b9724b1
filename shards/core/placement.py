"""Where a stage's Ray workers go: GPU actors when the cluster has GPUs, else one task per CPU.

Library code of the stages that stream shards (features, labels, wav2vec-U). On GPUs a pool
of actors holds the models: an actor that dies (a lost node) is restarted from its
constructor arguments, and the shard it was writing is handed to whichever actor is ready
(:class:`ShardPool`). On CPUs each shard is a Ray task (:class:`TaskPool`) on the cluster's
pooled workers, which Ray started before the stage with the pipelines' modules imported: an
actor always starts a process of its own (2-4 s with torch, per run), a task takes one that
is already up. A task lost with its worker or node is sent again. Every shard call is
idempotent, so a retry never duplicates output.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.exceptions import (
    ActorUnavailableError,
    NodeDiedError,
    ObjectLostError,
    OutOfMemoryError,
    RayActorError,
    WorkerCrashedError,
)

log = logging.getLogger(__name__)


# Ray restarts a lost actor, but does not retry the call it lost (max_task_retries=0): a
# retry would wait for that actor to come back, and on a cluster with one node fewer it may
# never be placed again. The pool hands the shard to a ready actor instead.
RETRIES = {"max_restarts": 3, "max_task_retries": 0}


#: Threads that decode each GPU actor's audio ahead of its batches (units.stage.read_ahead):
#: a GPU labelling at 20,000x real time takes about four cores' FLAC decoding (dr_flac runs
#: some 5,000-6,000x real time per core), and GPU nodes carry 8-12 vCPUs per GPU. They take
#: no CPU resource from Ray: a GPU node's CPUs serve its GPU actors.
GPU_DECODE_THREADS = 4


@dataclasses.dataclass(frozen=True)
class Placement:
    """How many actors, on which device, with which Ray resource options, and how many
    threads each decodes audio with (0: on the actor's own thread)."""

    count: int
    device: str
    options: dict
    decode_threads: int = 0

    def actors(self, needed: int) -> int:
        """Actors to start for ``needed`` shards: as many as placed, no more than needed."""
        return max(1, min(self.count, needed))


def place(workers: int | None = None, gpus_per_worker: float | None = None) -> Placement:
    """Chooses the actors for the connected cluster.

    Args:
        workers: CPU actors (default: one per CPU of the cluster).
        gpus_per_worker: GPUs per actor; ``None`` takes one GPU per actor when the cluster
            has GPUs and runs on CPUs otherwise; 0 always runs on CPUs.
    """
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if gpus >= 1 else 0.0
    if gpus_per_worker > 0:
        if gpus >= gpus_per_worker:
            options = dict(RETRIES, num_gpus=gpus_per_worker, num_cpus=0)
            return Placement(int(gpus // gpus_per_worker), "cuda", options, GPU_DECODE_THREADS)
        log.warning(
            "asked for %s GPUs per worker, the cluster has %s: using CPUs", gpus_per_worker, gpus
        )
    count = workers or max(1, int(resources.get("CPU", 1)))
    return Placement(count, "cpu", dict(RETRIES, num_cpus=1))


def actor_pool(cls, placement: Placement, needed: int, *args, **kwargs) -> ShardPool:
    """A pool of ``cls(*args, **kwargs)`` actors: as many as placed, no more than needed."""
    remote = ray.remote(**placement.options)(cls)
    return ShardPool(
        [remote.remote(*args, **kwargs) for _ in range(placement.actors(needed))],
        replace=lambda: remote.remote(*args, **kwargs),
    )


class ShardPool:
    """Actors that take one shard at a time; a shard whose actor is lost is handed out again.

    It has the part of ``ray.util.ActorPool``'s interface that :func:`map_until_failure`
    uses (``submit``, ``has_free``, ``has_next``, ``get_next_unordered``), and survives what
    ``ActorPool`` does not, the loss of a node:

    - A call whose actor died with its node fails with a ``RayActorError`` ("may or may not
      have been executed"); ``ActorPool`` raises it and the stage ends. Here the shard goes
      back to the head of the queue, for the next ready actor: shard calls are idempotent (a
      committed shard is skipped, a half-written one written again).
    - A shard goes only to an actor known to be alive (its ``__ray_ready__`` returned), so an
      actor that is restarting, or that cannot be placed (for a moment after a node dies,
      Ray still counts its CPUs), never holds a shard that the others could write.
    - An actor gone for good (its restarts spent) is replaced by a fresh one (``replace``)
      when it had returned a call: its restarts went on lost nodes or workers, and on a
      cluster of preemptible nodes every actor of a long stage would go that way. One whose
      constructor raised, or that never returned a call (it may be unable to start at all),
      leaves the pool; when none is left, the shards still queued fail with the last error.
    - A shard that loses its actor more than ``attempts`` times fails: one that kills its
      worker every time (out of memory, say) must not go round forever.

    Args:
        actors: Ray actor handles, all able to take any shard.
        attempts: Times a shard may lose its actor before it fails.
        backoff_seconds: Wait before asking a restarting actor again whether it is back.
        replace: Starts a new actor like the others, to take the place of one gone for
            good (``None``: the pool only shrinks).

    Example:
        >>> pool = ShardPool([Writer.remote() for _ in range(4)])  # doctest: +SKIP
        >>> for record in map_until_failure(pool, lambda a, s: a.write.remote(s), shards):
        ...     print(record["shard"])  # doctest: +SKIP
    """

    def __init__(
        self,
        actors: list,
        *,
        attempts: int = 5,
        backoff_seconds: float = 0.5,
        replace: Callable[[], object] | None = None,
    ):
        self.actors = list(actors)
        self.attempts, self.backoff_seconds = attempts, backoff_seconds
        self._replace = replace
        self._worked: set = set()  # Actors that returned a call since they were started.
        self._queue: collections.deque = collections.deque()  # (submit, value, losses)
        self._running: dict = {}  # call ref -> (actor, submit, value, losses)
        self._idle: collections.deque = collections.deque()  # Alive, with nothing to do.
        self._probes: dict = {}  # __ray_ready__ ref -> actor, starting or restarting
        self._later: list = []  # (monotonic time, actor): probe it again then
        self._last_error = ""  # The last actor error, as text (see _forget_traceback).
        for actor in actors:
            self._probe(actor)

    def submit(self, fn: Callable, value) -> None:
        """Queues ``fn(actor, value)`` (which returns a Ray ref) for the next ready actor."""
        self._queue.append((fn, value, 0))
        self._dispatch()

    def has_free(self) -> bool:
        """Whether another submission would find an actor without waiting for others (or,
        with no actor left, would fail at once rather than never be asked for)."""
        alive = self._alive()
        return alive == 0 or len(self._queue) + len(self._running) < alive

    def has_next(self) -> bool:
        """Whether any submission has not been returned yet."""
        return bool(self._queue or self._running)

    def get_next_unordered(self):
        """The result of the first call to finish; lost calls are handed out again meanwhile.

        Raises:
            StopIteration: Nothing was submitted that has not been returned.
            Exception: The call's own error (its actor stays in the pool), or the actor's
                error for a shard that lost its actor more than ``attempts`` times, or, when
                no actor is left, the last actor's error (the queued shards are dropped).
        """
        if not self.has_next():
            raise StopIteration("No more results to get")
        while True:
            self._dispatch()
            if not self._running and self._alive() == 0:
                dropped, self._queue = len(self._queue), collections.deque()
                raise RuntimeError(
                    f"every actor of the pool is gone; {dropped} shard(s) not written. "
                    f"The last actor error: {self._last_error}"
                )
            refs = list(self._running) + list(self._probes)
            wait = None
            if self._later:
                wait = max(0.0, min(t for t, _ in self._later) - time.monotonic())
            done = ray.wait(refs, num_returns=1, timeout=wait)[0] if refs else []
            if not refs:
                time.sleep(wait)
            now = time.monotonic()
            for t, actor in [x for x in self._later if x[0] <= now]:
                self._later.remove((t, actor))
                self._probe(actor)
            for ref in done:
                if ref in self._probes:
                    self._settle_probe(ref)
                    continue
                actor, fn, value, losses = self._running.pop(ref)
                try:
                    result = ray.get(ref)
                except RayActorError as e:
                    self._last_error = f"{type(e).__name__}: {e}"
                    self._probe(actor)  # Restarting, or gone: its probe tells.
                    if losses + 1 > self.attempts:
                        raise
                    _forget_traceback(e)
                    log.warning("a shard lost its actor (%s); handing it out again", _brief(e))
                    self._queue.appendleft((fn, value, losses + 1))
                    continue
                except Exception:
                    self._worked.add(actor)
                    self._idle.append(actor)
                    raise
                self._worked.add(actor)
                self._idle.append(actor)
                return result

    def _alive(self) -> int:
        return len(self._idle) + len(self._running) + len(self._probes) + len(self._later)

    def _dispatch(self) -> None:
        while self._queue and self._idle:
            actor = self._idle.popleft()
            fn, value, losses = self._queue.popleft()
            self._running[fn(actor, value)] = (actor, fn, value, losses)

    def _probe(self, actor) -> None:
        self._probes[actor.__ray_ready__.remote()] = actor

    def _settle_probe(self, ref) -> None:
        actor = self._probes.pop(ref)
        try:
            ray.get(ref)
        except ActorUnavailableError as e:  # Restarting, or its node not yet known to be dead.
            _forget_traceback(e)
            self._later.append((time.monotonic() + self.backoff_seconds, actor))
        except RayActorError as e:  # Dead for good: restarts spent, or its constructor failed.
            _forget_traceback(e)
            self._last_error = f"{type(e).__name__}: {e}"  # In full: a constructor's traceback.
            if self._replace is None or e.actor_init_failed or actor not in self._worked:
                log.warning("an actor of the pool is gone: %s", _brief(e))
                return
            self._worked.discard(actor)
            fresh = self._replace()
            self.actors[self.actors.index(actor)] = fresh
            log.warning("an actor of the pool is gone (%s); starting another", _brief(e))
            self._probe(fresh)
        else:
            self._idle.append(actor)


#: What a Ray task lost with its worker or node raises (preempted, crashed, killed for memory by
#: Ray's monitor, or its result lost with the node).
LOST_TASK = (WorkerCrashedError, NodeDiedError, ObjectLostError, OutOfMemoryError)


class TaskPool:
    """Shard calls as Ray tasks, at most ``slots`` at a time; a call lost with its worker or
    node is sent again, first in line.

    The interface of :class:`ShardPool` that :func:`map_until_failure` uses: ``submit(fn,
    value)`` runs ``fn(call, value)``, which sends the task (``call`` is this pool's
    ``call``) and returns its ref. Nothing is placed ahead: Ray runs each task on a pooled
    worker of whichever node has a free CPU, so a lost node's shards go to the nodes left.

    Args:
        call: Handed to each ``fn``: what sends one task (a remote function's ``remote``
            with the stage's arguments bound, say).
        slots: Calls in flight at most (the stage's workers).
        attempts: Times a shard may lose its worker before it fails.
    """

    def __init__(self, call: Callable, slots: int, *, attempts: int = 5):
        if slots < 1:
            raise ValueError(f"slots={slots} should be >= 1")
        self.call, self.slots, self.attempts = call, slots, attempts
        self._queue: collections.deque = collections.deque()  # (fn, value, losses)
        self._running: dict = {}  # task ref -> (fn, value, losses)

    def submit(self, fn: Callable, value) -> None:
        """Queues ``fn(call, value)`` for the next free slot."""
        self._queue.append((fn, value, 0))
        self._dispatch()

    def has_free(self) -> bool:
        """Whether another submission would start without waiting for a call to return."""
        return len(self._queue) + len(self._running) < self.slots

    def has_next(self) -> bool:
        """Whether any submission has not been returned yet."""
        return bool(self._queue or self._running)

    def get_next_unordered(self):
        """The result of the first call to finish; lost calls are sent again meanwhile.

        Raises:
            StopIteration: Nothing was submitted that has not been returned.
            Exception: The call's own error, or the loss of a shard that lost its worker more
                than ``attempts`` times.
        """
        if not self.has_next():
            raise StopIteration("No more results to get")
        while True:
            self._dispatch()
            ref = ray.wait(list(self._running), num_returns=1)[0][0]
            fn, value, losses = self._running.pop(ref)
            try:
                return ray.get(ref)
            except LOST_TASK as e:
                if losses + 1 > self.attempts:
                    raise
                _forget_traceback(e)
                log.warning("a shard lost its worker (%s); handing it out again", _brief(e))
                self._queue.appendleft((fn, value, losses + 1))

    def _dispatch(self) -> None:
        while self._queue and len(self._running) < self.slots:
            fn, value, losses = self._queue.popleft()
            self._running[fn(self.call, value)] = (fn, value, losses)


def _forget_traceback(error: BaseException) -> None:
    """Drops the traceback of an error the pool has handled.

    The error ``ray.get`` raises is held by a local of a frame of its own traceback: a
    reference cycle, and the frames it holds go back to the pool's. Left alone, the pool and
    its actors (and their CPUs) outlive the stage until the garbage collector runs, and the
    next stage of the same driver may wait for those CPUs.
    """
    error.__traceback__ = None


def _brief(error: BaseException) -> str:
    """``Type: first line`` of an actor error (Ray's run to many lines of context)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def map_until_failure(pool: ShardPool, submit: Callable, items: Iterable) -> Iterator:
    """Results of ``submit(actor, item)`` for every item, in the order they finish.

    Unlike ``ActorPool.map``, a failure does not return at once: no further item is handed
    out, the calls in flight are waited for (so no worker is cut off mid-write when the
    driver exits), and then the first failure is raised. A full disk thus ends the stage
    with every unit either committed or cleaned up by the worker that failed to write it.
    """
    queue = collections.deque(items)
    error: BaseException | None = None
    while pool.has_next() or (queue and error is None):
        while queue and error is None and pool.has_free():
            pool.submit(submit, queue.popleft())
        try:
            result = pool.get_next_unordered()
        except Exception as e:
            if error is None:
                error = e
                log.info("a worker failed; waiting for the calls in flight before stopping")
            continue
        yield result
    if error is not None:
        raise error


def longest_first(shards: list[str], rows_by_shard: dict) -> list[str]:
    """Shards ordered by audio duration, longest first, so that the last ones handed out
    are short and no actor finishes long after the others (outputs do not depend on it)."""
    return sorted(shards, key=lambda s: -column_total(rows_by_shard[s], "duration"))


def column_total(rows: pa.Table | list[dict], column: str) -> float:
    """The sum of one column of some manifest rows, a table or a list of dicts."""
    if isinstance(rows, pa.Table):
        return pc.sum(rows.column(column)).as_py() or 0
    return sum(r[column] for r in rows)
