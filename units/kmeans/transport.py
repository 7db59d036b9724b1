"""The Ray transport of k-means parts: each part lives in an actor and holds (or streams) its
own blocks.

:func:`distribute` turns an array or a feature store into parts that live in Ray actors,
one per worker, with the interface of :class:`units.kmeans.parts.LocalParts`. Rows never
travel to the driver: an array is cut on the driver (where it already is) and each actor
gets only its slice through the object store, by its first call; a feature store is read by
each actor from its own row range. A part whose node is lost is restarted by Ray and given
back its rows and the state that earlier calls set (:class:`StateJournal`, read from the
marks on :class:`~units.kmeans.parts.Part`'s methods).

Example:
    >>> parts = distribute(FeatureStore(root, "mfcc"), workers=4)  # doctest: +SKIP
    >>> km = KMeans(100, seed=0).fit(parts)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import ray
from ray.exceptions import ActorUnavailableError

from shards.core.threads import use_allotted_threads
from units.kmeans.parts import (
    DEFAULT_BLOCK_ROWS,
    ArraySource,
    Blocks,
    DataError,
    Part,
    StoreSource,
    fingerprint_of,
    method_name,
    state_effect,
)

T = TypeVar("T")

log = logging.getLogger(__name__)

# An actor that dies (a lost node) is restarted from its constructor arguments and the
# call retried; every call is a pure function of the part's data, the state that earlier
# calls set (which RayParts.map gives a restarted part back) and the arguments. Restarts
# are unlimited: on spot nodes a long fit loses the same part's node again and again, and a
# restart limit would fail the fit on the fourth loss. Each call's retries stay bounded
# (max_task_retries, _RESTORE_ATTEMPTS), so a part that cannot come back still fails it.
_RETRIES = {"max_restarts": -1, "max_task_retries": 3}

#: Times RayParts.map gives a lost part its state back and calls it again before failing.
_RESTORE_ATTEMPTS = 20


class PartRestarted(RuntimeError):
    """A part's actor was restarted (its node was lost): it lacks the state that earlier calls
    set (a PCA projection, k-means|| distances) and, for a part of an array, its rows."""


class _RayPart(Part):
    """A part in a Ray actor, which knows whether Ray restarted it.

    Ray restarts a lost actor from its constructor arguments, so a part of a store reads its
    rows again, but not what earlier calls set (a part of an array lacks its rows too: they
    came by a call, :meth:`_ArrayPart.load`). Until :meth:`restore` has replayed those
    calls, :meth:`call` refuses to compute on the bare part: a wrong answer would be silent
    (a missing projection changes the dimension only when PCA reduces it).
    """

    def __init__(self, *args, **kwargs):
        use_allotted_threads()
        super().__init__(*args, **kwargs)
        self._current = not _restarted()

    def call(self, method: str, *args):
        """The part's method named ``method`` on ``args``, unless the part lost its state."""
        if not self._current:
            raise PartRestarted(f"the part of blocks [{self.lo}, {self.hi}) was restarted")
        return getattr(self, method)(*args)

    def restore(self, journal: list[tuple[str, list]]) -> None:
        """Replays ``(method name, args)`` calls in order, in one actor call (a second restart
        cannot leave a part half restored and marked current)."""
        for method, args in journal:
            resolved = [ray.get(a) if isinstance(a, ray.ObjectRef) else a for a in args]
            getattr(self, method)(*resolved)
        self._current = True


def _restarted() -> bool:
    """Whether Ray restarted the actor this runs in.

    ``RuntimeContext.was_current_actor_reconstructed`` is the public answer, but inside it
    reads Ray's own deprecated ``RuntimeContext.actor_id`` (Ray 2.60), which would warn once
    in every actor started: that one warning is silenced here, not the question changed.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="ray")
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)


class _NotLoaded:
    """The source of an array part until its rows come (:meth:`_ArrayPart.load`)."""

    def __init__(self, dim: int):
        self.dim = dim

    def read(self, *args):
        raise RuntimeError("this k-means part was given no rows (load)")

    take = describe = read


class _ArrayPart(_RayPart):
    """A part of an array, whose rows come by :meth:`load`: the first call
    :func:`distribute` makes, and the first a restarted part replays.

    Not as a constructor argument: Ray logs an error for an actor that may restart and whose
    constructor takes an object from the store (it could be gone by the restart), though
    :class:`RayParts` keeps those objects alive for exactly that.
    """

    def __init__(self, dim, offset, blocks, lo, hi, hold, device):
        super().__init__(_NotLoaded(dim), blocks, lo, hi, hold=hold, device=device)
        self._offset = offset

    def load(self, array: np.ndarray) -> None:
        self.source = ArraySource(array, self._offset)


class _StorePart(_RayPart):
    def __init__(self, root, name, blocks, lo, hi, hold, device):
        row_lo, row_hi = blocks.rows_of(lo, hi)
        source = StoreSource(root, name, row_lo, row_hi)
        super().__init__(source, blocks, lo, hi, hold=hold, device=device)


class StateJournal:
    """The calls that set the parts' state, in order: what a restarted part must replay.

    It reads the marks on :class:`~units.kmeans.parts.Part`'s methods rather than a list of
    names, so a method that starts to set state says so where it is defined
    (:func:`~units.kmeans.parts.sets_state`, :func:`~units.kmeans.parts.ends_state`).

    Example:
        >>> journal = StateJournal()
        >>> journal.record(Part.seed_update, ["candidates", 0])
        >>> journal.record(Part.stats, ["centroids"])  # Sets nothing: not kept.
        >>> journal.replay()
        [('seed_update', ['candidates', 0])]
        >>> journal.record(Part.seed_weights, [8])  # Frees what seed_update set.
        >>> journal.replay()
        []
    """

    def __init__(self):
        self._entries: list[tuple[Callable, list]] = []

    def record(self, method: Callable, args: list) -> None:
        """Notes that every part ran ``method(*args)``."""
        effect = state_effect(method)
        if effect.ends:
            self._entries = [entry for entry in self._entries if entry[0] not in effect.ends]
        if effect.sets:
            self._entries.append((method, list(args)))

    def replay(self) -> list[tuple[str, list]]:
        """``(method name, args)`` in call order, as :meth:`_RayPart.restore` takes them."""
        return [(method.__name__, args) for method, args in self._entries]


class RayParts:
    """Parts held by Ray actors; ``map`` calls a method on all of them at once."""

    def __init__(
        self, actors: list, blocks: Blocks, dim: int, fingerprint: str | None = None, rows=()
    ):
        self.actors, self.blocks, self.dim = actors, blocks, dim
        self._fingerprint = fingerprint
        # Array parts: each actor's rows in the object store (kept alive here), which a
        # restarted part loads again before it replays the journal.
        self._rows = list(rows)
        self._journal = StateJournal()

    @property
    def rows(self) -> int:
        return self.blocks.rows

    def map(self, method: Callable[..., T], *args) -> list[T]:
        """Calls :class:`~units.kmeans.parts.Part` method ``method`` (``Part.stats``, ...)
        with ``args`` in every actor; results in part order.

        Raises:
            TypeError: ``method`` is not a method of ``Part``.
        """
        name = method_name(method)
        # Large arguments (centroids, candidates) go to the object store once, not per actor.
        refs = [ray.put(a) if isinstance(a, np.ndarray) and a.nbytes > 65536 else a for a in args]
        calls = [actor.call.remote(name, *refs) for actor in self.actors]
        results = [self._get(i, call, name, refs) for i, call in enumerate(calls)]
        self._journal.record(method, refs)
        return results

    def _get(self, i: int, call, name: str, refs: list):
        """Actor ``i``'s ``call``'s result. A part whose node was lost meanwhile gets its
        rows and state back and the call again: Ray restarts its actor, and every call is a
        pure function of the part's rows and state (replaying ``seed_update`` on a part that
        had it is harmless: distances to the same candidates are the same minimum)."""
        actor = self.actors[i]
        for attempt in range(_RESTORE_ATTEMPTS):
            try:
                if call is None:
                    journal = self._journal.replay()
                    if self._rows:
                        journal = [("load", [self._rows[i]]), *journal]
                    ray.get(actor.restore.remote(journal))
                    call = actor.call.remote(name, *refs)
                return ray.get(call)
            except (PartRestarted, ActorUnavailableError) as e:
                if attempt == _RESTORE_ATTEMPTS - 1:
                    raise
                log.warning(
                    "a k-means part was lost during %s (%s); giving it its state back",
                    name,
                    type(e).__name__,
                )
                if isinstance(e, ActorUnavailableError):  # Its node's death not yet known.
                    time.sleep(1.0)
                call = None
        raise AssertionError("unreachable")

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint_of(self)
        return self._fingerprint

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def distribute(
    data,
    *,
    workers: int | None = None,
    gpus_per_worker: float = 0,
    hold: bool = True,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    spread: bool = False,
) -> RayParts:
    """Spreads ``data`` over Ray actors. Ray must be initialised.

    Args:
        data: A (n, d) array, or a :class:`~units.features.store.FeatureStore`.
        workers: Actors (default: one per CPU, or per ``gpus_per_worker`` GPUs).
        gpus_per_worker: GPUs per actor; assignment then runs on faiss's GPU index.
        hold: Actors keep their rows in memory as float32; ``False`` reads them from the
            store on every pass (bounded memory, for data bigger than the cluster).
        block_rows: Rows per block (fixes the order of every sum).
        spread: Place actors on as many nodes as possible.
    """
    # Here, not at the top: an actor's process imports this module, and needs no pyarrow.
    from units.features.store import FeatureStore

    resources = ray.cluster_resources()
    use_gpu = gpus_per_worker > 0 and resources.get("GPU", 0) >= gpus_per_worker
    if workers is None:
        workers = (
            int(resources["GPU"] // gpus_per_worker) if use_gpu else int(resources.get("CPU", 1))
        )
    options = dict(_RETRIES)
    if use_gpu:
        options.update(num_gpus=gpus_per_worker, num_cpus=0)
    else:
        # More workers than CPUs share them (the actors hold their CPU share for life).
        options.update(num_cpus=min(1.0, resources.get("CPU", 1) / max(1, workers)))
    if spread:
        options["scheduling_strategy"] = "SPREAD"
    device = "cuda" if use_gpu else "cpu"

    if isinstance(data, FeatureStore):
        rows, dim = int(data.meta["rows"]), data.dim
        blocks = Blocks(rows, block_rows)
        if rows == 0:
            raise DataError(f"feature store {data.layout.name!r} holds no frames")
        cls = ray.remote(**options)(_StorePart)
        ranges = blocks.split(max(1, workers))
        actors = [
            cls.remote(data.layout.root, data.layout.name, blocks, lo, hi, hold, device)
            for lo, hi in ranges
        ]
        fingerprint = StoreSource.fingerprint_of_store(data)
        return RayParts(actors, blocks, dim, fingerprint)

    x = np.asarray(data)
    if x.ndim != 2:
        raise DataError(f"expected a 2-d array (rows, dim), got shape {x.shape}")
    blocks = Blocks(len(x), block_rows)
    if blocks.rows == 0:
        raise DataError("no rows to cluster: the data is empty")
    cls = ray.remote(**options)(_ArrayPart)
    actors, rows = [], []
    for lo, hi in blocks.split(max(1, workers)):
        row_lo, row_hi = blocks.rows_of(lo, hi)
        actors.append(cls.remote(x.shape[1], row_lo, blocks, lo, hi, hold, device))
        rows.append(ray.put(x[row_lo:row_hi]))
        actors[-1].load.remote(rows[-1])  # Before any call of this driver's: Ray keeps order.
    return RayParts(actors, blocks, x.shape[1], rows=rows)
