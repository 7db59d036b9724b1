"""k-means data spread over Ray actors: each holds (or streams) its own blocks.

:func:`distribute` turns an array or a feature store into parts that live in Ray actors,
one per worker, with the interface of :class:`units.kmeans_parts.LocalParts`. Rows never
travel to the driver: an array is cut on the driver (where it already is) and each actor
gets only its slice through the object store; a feature store is read by each actor from
its own row range.

Example:
    >>> parts = distribute(FeatureStore(root, "mfcc"), workers=4)  # doctest: +SKIP
    >>> km = KMeans(100, seed=0).fit(parts)  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
import ray

from .feature_store import FeatureStore
from .kmeans_parts import (
    DEFAULT_BLOCK_ROWS,
    ArraySource,
    Blocks,
    DataError,
    Part,
    StoreSource,
    fingerprint_of,
)

# An actor that dies (a lost node) is restarted from its constructor arguments and the
# call retried; every call is a pure function of the part's data and the arguments.
_RETRIES = {"max_restarts": 3, "max_task_retries": 3}


class _ArrayPart(Part):
    def __init__(self, array, offset, blocks, lo, hi, hold, device):
        super().__init__(ArraySource(array, offset), blocks, lo, hi, hold=hold, device=device)


class _StorePart(Part):
    def __init__(self, root, name, blocks, lo, hi, hold, device):
        row_lo, row_hi = blocks.span(lo)[0], blocks.span(hi - 1)[1]
        source = StoreSource(root, name, row_lo, row_hi)
        super().__init__(source, blocks, lo, hi, hold=hold, device=device)


class RayParts:
    """Parts held by Ray actors; ``map`` calls a method on all of them at once."""

    def __init__(
        self, actors: list, blocks: Blocks, dim: int, fingerprint: str | None = None, refs=()
    ):
        self.actors, self.blocks, self.dim = actors, blocks, dim
        self._fingerprint = fingerprint
        self._refs = list(refs)  # Keeps the actors' data alive for restarts.

    @property
    def rows(self) -> int:
        return self.blocks.rows

    def map(self, method: str, *args) -> list:
        # Large arguments (centroids, candidates) go to the object store once, not per actor.
        refs = [ray.put(a) if isinstance(a, np.ndarray) and a.nbytes > 65536 else a for a in args]
        return ray.get([getattr(actor, method).remote(*refs) for actor in self.actors])

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
        data: A (n, d) array, or a :class:`~units.feature_store.FeatureStore`.
        workers: Actors (default: one per CPU, or per ``gpus_per_worker`` GPUs).
        gpus_per_worker: GPUs per actor; assignment then runs on faiss's GPU index.
        hold: Actors keep their rows in memory as float32; ``False`` reads them from the
            store on every pass (bounded memory, for data bigger than the cluster).
        block_rows: Rows per block (fixes the order of every sum).
        spread: Place actors on as many nodes as possible.
    """
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
    actors, refs = [], []
    for lo, hi in blocks.split(max(1, workers)):
        row_lo, row_hi = blocks.span(lo)[0], blocks.span(hi - 1)[1]
        refs.append(ray.put(x[row_lo:row_hi]))
        actors.append(cls.remote(refs[-1], row_lo, blocks, lo, hi, hold, device))
    return RayParts(actors, blocks, x.shape[1], refs=refs)
