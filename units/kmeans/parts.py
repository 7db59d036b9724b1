"""Data for k-means and PCA, cut into fixed blocks and spread over parts (workers).

The rows of the data (an array, or every frame of a feature store in shard order) are
numbered globally and cut into blocks of ``block_rows`` rows; each part holds a contiguous
range of blocks. Everything a part returns is per block and summed through
:mod:`units.kmeans.tree_sum`, so results depend on the data and never on how many parts there are.
This is faiss's ``DatasetAssign`` idea (``contrib/clustering.py``): the k-means loop talks to
a small interface, and a sharded or remote dataset is another implementation of it.

That interface is ``parts.map(Part.method, *args)``: the caller names a :class:`Part` method
by the method itself (a typo fails where it is written), and every part runs it on its own
blocks (:class:`LocalParts` in this process, :class:`units.kmeans.transport.RayParts` in Ray
actors). The methods whose calls leave state that later calls read are marked where they are
defined (:func:`sets_state`, :func:`ends_state`), so a transport that can lose a part knows
which calls to replay without a list of names of its own.

Assignment is a chunked GEMM argmin (``||c||^2 - 2 x.c``) in numpy's BLAS rather than
``faiss.IndexFlatL2.search``: the two run at parity where faiss-cpu's bundled OpenBLAS knows
the CPU, and the GEMM argmin is 2-4x faster where it does not (it falls back to generic
kernels on these machines unless ``OPENBLAS_CORETYPE`` is set). A GPU part uses faiss's GPU
flat index (:class:`Assigner`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

from units.kmeans import kernels, tree_sum
from units.kmeans.kernels import cluster_sums

M = TypeVar("M", bound=Callable)
T = TypeVar("T")

#: Rows per GEMM chunk: 8192 x k float32 distances stay in cache for k up to a few hundred.
CHUNK_ROWS = 8192
#: Below this dimension, :meth:`Assigner.labels` folds the centroid norms into the GEMM.
_FOLD_BELOW_DIM = 128
DEFAULT_BLOCK_ROWS = 65536


class DataError(ValueError):
    """The data cannot be clustered: non-finite values, wrong dimension, no rows."""


@dataclasses.dataclass(frozen=True)
class Blocks:
    """The fixed cut of ``rows`` global rows into blocks of ``block_rows``."""

    rows: int
    block_rows: int = DEFAULT_BLOCK_ROWS

    @property
    def count(self) -> int:
        return -(-self.rows // self.block_rows)

    def span(self, block: int) -> tuple[int, int]:
        lo = block * self.block_rows
        return lo, min(lo + self.block_rows, self.rows)

    def rows_of(self, lo: int, hi: int) -> tuple[int, int]:
        """The global rows ``[first, end)`` of blocks ``[lo, hi)`` (none when ``hi == lo``)."""
        return min(lo * self.block_rows, self.rows), min(hi * self.block_rows, self.rows)

    def split(self, parts: int) -> list[tuple[int, int]]:
        """Contiguous block ranges ``[lo, hi)`` for ``parts`` parts (none empty)."""
        parts = max(1, min(parts, self.count))
        edges = [self.count * p // parts for p in range(parts + 1)]
        return list(zip(edges[:-1], edges[1:], strict=True))


class ArraySource:
    """Rows ``[offset, offset + len(array))`` of the global data, from an array."""

    def __init__(self, array: np.ndarray, offset: int = 0):
        if array.ndim != 2:
            raise DataError(f"expected a 2-d array (rows, dim), got shape {array.shape}")
        self.array, self.offset = array, offset

    @property
    def dim(self) -> int:
        return self.array.shape[1]

    def read(self, lo: int, hi: int) -> np.ndarray:
        return self.array[lo - self.offset : hi - self.offset]

    def take(self, rows: np.ndarray) -> np.ndarray:
        return self.array[np.asarray(rows, np.int64) - self.offset]

    def describe(self, row: int) -> str:
        return f"row {row}"


class StoreSource:
    """Rows of a feature store, global row order = its shards in order, memory-mapped.

    Args:
        root: Dataset root.
        name: Feature store name.
        lo: First global row this source serves.
        hi: End of its rows.
    """

    def __init__(self, root: str, name: str, lo: int, hi: int):
        from units.features.store import FeatureStore

        self.store = FeatureStore(root, name)
        self.lo, self.hi = lo, hi
        index = self.store.index
        shards = index.column("shard").to_pylist()
        self._shard_names = self.store.shard_names()
        rows_per_shard = dict.fromkeys(self._shard_names, 0)
        for shard, frames in zip(shards, index.column("frames").to_pylist(), strict=True):
            rows_per_shard[shard] += frames
        self._starts = np.cumsum([0] + [rows_per_shard[s] for s in self._shard_names])
        self._arrays: dict[str, np.ndarray] = {}

    @property
    def dim(self) -> int:
        return self.store.dim

    def _array(self, i: int) -> np.ndarray:
        shard = self._shard_names[i]
        if shard not in self._arrays:
            array = self.store.shard_array(shard)
            expected = (int(self._starts[i + 1] - self._starts[i]), self.dim)
            if array.shape != expected:
                raise DataError(
                    f"feature shard {shard} of store {self.store.layout.name!r} has shape "
                    f"{array.shape}, its index and spec say {expected}"
                )
            self._arrays[shard] = array
        return self._arrays[shard]

    def read(self, lo: int, hi: int) -> np.ndarray:
        first = int(np.searchsorted(self._starts, lo, side="right")) - 1
        pieces = []
        i = first
        while lo < hi:
            start, end = self._starts[i], self._starts[i + 1]
            take = min(hi, end) - lo
            if take > 0:
                pieces.append(self._array(i)[lo - start : lo - start + take])
                lo += take
            i += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows by global index, read shard by shard from the memory maps."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), np.float16)  # The store's dtype.
        shard_of = np.searchsorted(self._starts, rows, side="right") - 1
        for i in np.unique(shard_of):
            mask = shard_of == i
            out[mask] = self._array(int(i))[rows[mask] - self._starts[i]]
        return out

    def describe(self, row: int) -> str:
        """The shard, utterance key and frame of global row ``row``."""
        i = int(np.searchsorted(self._starts, row, side="right")) - 1
        shard = self._shard_names[i]
        local = row - int(self._starts[i])
        index = self.store.index
        mask = np.asarray(index.column("shard").to_pylist()) == shard
        offsets = np.asarray(index.column("offset").to_pylist())[mask]
        keys = np.asarray(index.column("key").to_pylist(), dtype=object)[mask]
        j = int(np.searchsorted(offsets, local, side="right")) - 1
        return f"shard {shard}, key {keys[j]}, frame {local - offsets[j]}"

    @staticmethod
    def fingerprint_of_store(store) -> str:
        """Identifies a finished store by its spec, sample, shards and totals."""
        meta = store.meta
        fields = ("spec", "request", "shards", "rows", "utterances", "bytes")
        return hashlib.sha256(
            json.dumps({f: meta.get(f) for f in fields}, sort_keys=True).encode()
        ).hexdigest()


def _faiss_has_gpu() -> bool:
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class Assigner:
    """Nearest centroid by squared L2: a chunked BLAS GEMM argmin on CPU; on a GPU, faiss's
    flat GPU index, or the same GEMM argmin in torch where faiss has no GPU build (a node
    with faiss-cpu, or a CUDA that faiss-gpu's wheels do not support)."""

    def __init__(self, centroids: np.ndarray, device: str = "cpu"):
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.device = device
        self._index = self._torch = None
        if device == "cpu":
            self._ct_m2 = np.ascontiguousarray(-2 * self.centroids.T)
            self._norms = (self.centroids.astype(np.float64) ** 2).sum(1).astype(np.float32)
            self._folded = np.concatenate([self._ct_m2, self._norms[None]])
        elif _faiss_has_gpu():
            import faiss

            self._res = faiss.StandardGpuResources()
            self._index = faiss.GpuIndexFlatL2(self._res, self.centroids.shape[1])
            self._index.add(self.centroids)
        else:
            import torch

            c = torch.from_numpy(self.centroids).to(device)
            self._torch = (-2 * c.T).contiguous(), (c.double() ** 2).sum(1).float()

    def __call__(self, x: np.ndarray, distances: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Labels (int64) and, if asked, squared distances (float32, GEMM expansion)."""
        if self._index is not None:
            dist, labels = self._index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
            return labels[:, 0].astype(np.int64), dist[:, 0]
        if self._torch is not None:
            return self._torch_search(x, distances)
        labels = np.empty(len(x), np.int64)
        dist = np.empty(len(x), np.float32) if distances else None
        buffer = np.empty((min(CHUNK_ROWS, len(x)), len(self.centroids)), np.float32)
        for s in range(0, len(x), CHUNK_ROWS):
            chunk = x[s : s + CHUNK_ROWS]
            d = buffer[: len(chunk)]
            np.matmul(chunk, self._ct_m2, out=d)  # -2 x.c
            d += self._norms
            labels[s : s + len(chunk)] = lab = d.argmin(1)
            if distances:
                dist[s : s + len(chunk)] = np.take_along_axis(d, lab[:, None], 1)[:, 0]
        if distances:
            dist += np.einsum("ij,ij->i", x, x)
            np.maximum(dist, 0, out=dist)
        return labels, dist

    def labels(self, x: np.ndarray) -> np.ndarray:
        """Nearest centroid (int64), as ``self(x, distances=False)`` but faster for few
        dimensions: the centroid norms ride in the GEMM as one more dimension (rows get a
        column of ones), which saves a pass over the distances (measured 20% faster at
        d = 39, k = 100; none at d = 768). Rounding differs from ``__call__`` in the last
        bit, so a tie may go the other way: k-means fits use it, labelling does not."""
        if self.device != "cpu" or x.shape[1] >= _FOLD_BELOW_DIM:
            return self(x, distances=False)[0]
        labels = np.empty(len(x), np.int64)
        rows = min(CHUNK_ROWS, len(x))
        buffer = np.empty((rows, len(self.centroids)), np.float32)
        ones = np.ones((rows, x.shape[1] + 1), np.float32)
        for s in range(0, len(x), CHUNK_ROWS):
            chunk = x[s : s + CHUNK_ROWS]
            m = len(chunk)
            ones[:m, :-1] = chunk
            np.matmul(ones[:m], self._folded, out=buffer[:m])
            labels[s : s + m] = buffer[:m].argmin(1)
        return labels

    def two_nearest(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Labels (int64) and the squared distances to the nearest and the second nearest
        centroid (float32, GEMM expansion; ``inf`` for the second when k = 1): what a
        split-merge step needs to price removing a cluster."""
        k = len(self.centroids)
        if self._index is not None:
            dist, labels = self._index.search(np.ascontiguousarray(x, dtype=np.float32), 2)
            second = dist[:, 1] if k > 1 else np.full(len(x), np.inf, np.float32)
            return labels[:, 0].astype(np.int64), dist[:, 0], second
        if self._torch is not None:
            labels, first = self._torch_search(x, True)
            centroids = Assigner(self.centroids)  # The second nearest, rarely asked: CPU.
            _, _, second = centroids.two_nearest(x)
            return labels, first, second
        labels = np.empty(len(x), np.int64)
        first = np.empty(len(x), np.float32)
        second = np.full(len(x), np.inf, np.float32)
        buffer = np.empty((min(CHUNK_ROWS, len(x)), k), np.float32)
        fold = x.shape[1] < _FOLD_BELOW_DIM  # As labels() does.
        ones = np.ones((len(buffer), x.shape[1] + 1), np.float32) if fold else None
        for s in range(0, len(x), CHUNK_ROWS):
            chunk = x[s : s + CHUNK_ROWS]
            d = buffer[: len(chunk)]
            if fold:
                ones[: len(chunk), :-1] = chunk
                np.matmul(ones[: len(chunk)], self._folded, out=d)
            else:
                np.matmul(chunk, self._ct_m2, out=d)
                d += self._norms
            labels[s : s + len(chunk)] = lab = d.argmin(1)
            at = lab[:, None]
            first[s : s + len(chunk)] = np.take_along_axis(d, at, 1)[:, 0]
            if k > 1:
                # The value at the second argmin: numpy's argmin over rows of k is faster than
                # its min (2.6 against 3.4 ms per 65,536 rows at k = 100), the value the same.
                np.put_along_axis(d, at, np.inf, 1)
                at = d.argmin(1)[:, None]
                second[s : s + len(chunk)] = np.take_along_axis(d, at, 1)[:, 0]
        norms = np.einsum("ij,ij->i", x, x)
        first += norms
        second += norms
        np.maximum(first, 0, out=first)
        np.maximum(second, 0, out=second)
        return labels, first, second

    def _torch_search(self, x: np.ndarray, distances: bool) -> tuple[np.ndarray, np.ndarray]:
        import torch

        ct_m2, norms = self._torch
        labels, dist = [], []
        # Full float32 matmuls (no TF32), so the argmin is the CPU GEMM's up to rounding.
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            for s in range(0, len(x), CHUNK_ROWS):
                chunk = torch.from_numpy(np.ascontiguousarray(x[s : s + CHUNK_ROWS]))
                chunk = chunk.to(ct_m2.device, torch.float32)
                best, lab = torch.addmm(norms, chunk, ct_m2).min(1)
                labels.append(lab.cpu())
                if distances:
                    dist.append((best + (chunk * chunk).sum(1)).clamp_(min=0).cpu())
        finally:
            torch.set_float32_matmul_precision(previous)
        out = torch.cat(labels).numpy().astype(np.int64) if labels else np.empty(0, np.int64)
        if not distances:
            return out, None
        return out, torch.cat(dist).numpy() if dist else np.empty(0, np.float32)


def _inertia(sqnorm: float, sums: np.ndarray, counts: np.ndarray, c64: np.ndarray) -> float:
    """sum ||x - c_a||^2 = sum ||x||^2 - 2 sum_a c_a.S_a + sum_a n_a ||c_a||^2 (float64)."""
    return float(sqnorm - 2.0 * np.einsum("kd,kd->", c64, sums) + counts @ (c64 * c64).sum(1))


def block_stats(assign: Assigner, c64: np.ndarray, x: np.ndarray, sqnorm: float, detail: bool):
    """One block's ``(sums, counts, inertia)`` at the assigner's centroids (float64).

    With ``detail``, also ``sse`` (k,): each cluster's share of the inertia (float32
    distances summed in float64, in row order), and ``removal`` (k,): what the inertia would
    grow by if the cluster were removed and its rows went to their second nearest centroid.
    """
    k = len(c64)
    if not detail:
        labels = assign.labels(x)
        sums, counts = cluster_sums(x, labels, k)
        return sums, counts, _inertia(sqnorm, sums, counts, c64)
    labels, first, second = assign.two_nearest(x)
    sums, counts = cluster_sums(x, labels, k)
    first64 = first.astype(np.float64)
    sse = np.bincount(labels, weights=first64, minlength=k)
    removal = np.bincount(labels, weights=second.astype(np.float64) - first64, minlength=k)
    return sums, counts, _inertia(sqnorm, sums, counts, c64), sse, removal


# ----------------------------------------------------------------- state marks
@dataclasses.dataclass(frozen=True)
class StateEffect:
    """What a call of a :class:`Part` method does to the state that later calls read.

    Attributes:
        sets: The call leaves state behind (a part that lost its state must replay it).
        ends: The methods whose state the call frees: their earlier calls need no replay.
    """

    sets: bool = False
    ends: tuple[Callable, ...] = ()


def sets_state(method: M) -> M:
    """Marks a :class:`Part` method whose call leaves state that later calls read (a PCA
    projection, k-means|| distances): a part that lost it gets it back by replaying the
    marked calls in order."""
    method._state_effect = StateEffect(sets=True)
    return method


def ends_state(*ended: Callable) -> Callable[[M], M]:
    """Marks a :class:`Part` method whose call frees the state that the ``ended`` methods
    set, so their earlier calls need no replay after it.

    Example:
        >>> class Counter:
        ...     @sets_state
        ...     def start(self): ...
        ...     @ends_state(start)
        ...     def stop(self): ...
        >>> state_effect(Counter.stop).ends == (Counter.start,)
        True
    """

    def mark(method: M) -> M:
        method._state_effect = StateEffect(ends=ended)
        return method

    return mark


def state_effect(method: Callable) -> StateEffect:
    """The mark on ``method`` (an unmarked method neither sets nor ends any state)."""
    return getattr(method, "_state_effect", StateEffect())


class Part:
    """One worker's share: blocks ``[lo, hi)`` of ``blocks``, and the math run on them.

    Args:
        source: Where rows come from (:class:`ArraySource` or :class:`StoreSource`).
        blocks: The global cut.
        lo: First block.
        hi: End block.
        hold: Keep the blocks in memory as float32 (else read them from the source on each
            pass: memory stays bounded when the data is bigger than the workers).
        device: ``cpu`` or ``cuda`` (faiss GPU index for assignment).
    """

    def __init__(
        self,
        source,
        blocks: Blocks,
        lo: int,
        hi: int,
        *,
        hold: bool = True,
        device: str = "cpu",
    ):
        self.source, self.blocks, self.lo, self.hi = source, blocks, lo, hi
        self.hold, self.device = hold, device
        self._held: dict[int, np.ndarray] = {}
        self._sqnorms: dict[int, float] = {}
        # The last seeded sample's rows and norms per block (see _sample_rows).
        self._samples: tuple[tuple, dict[int, tuple[np.ndarray, float]]] | None = None
        self._projection: tuple[np.ndarray, np.ndarray] | None = None
        self._seeding: dict | None = None
        # The compiled sums pay for their loading only on parts that hold enough values; when
        # they do, the compiler's start-up runs beside the loading and seeding.
        first, end = blocks.rows_of(lo, hi)
        kernels.warm_up((end - first) * source.dim)

    # ----------------------------------------------------------------- data access
    def _raw(self, block: int) -> np.ndarray:
        return self.source.read(*self.blocks.span(block))

    def _project(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if self._projection is not None:
            mean, matrix = self._projection
            x = (x - mean) @ matrix
        return np.ascontiguousarray(x, dtype=np.float32)

    def block(self, b: int) -> np.ndarray:
        """Block ``b`` as float32 (projected if a projection is set)."""
        if b in self._held:
            return self._held[b]
        x = self._project(self._raw(b))
        if self.hold:
            self._held[b] = x
        return x

    def _sqnorm(self, b: int, x: np.ndarray) -> float:
        if b not in self._sqnorms:
            x64 = x.astype(np.float64)
            self._sqnorms[b] = float(np.einsum("ij,ij->", x64, x64))
        return self._sqnorms[b]

    def _nodes(self, per_block: dict[int, object], combine=tree_sum.add) -> list:
        return tree_sum.nodes(per_block, self.lo, self.hi, self.blocks.count, combine)

    # ----------------------------------------------------------------- checks
    def check(self, first: int = 5) -> dict:
        """Reads every block once: rows, dim, and where the first non-finite values are."""
        bad, bad_rows = [], 0
        for b in range(self.lo, self.hi):
            raw = self._raw(b)
            # The whole block first: six times faster than a row at a time (numpy's
            # per-row reductions are slow for short rows), which only a bad block needs.
            if not np.isfinite(raw).all():
                finite = np.isfinite(raw).all(axis=1)
                rows = np.flatnonzero(~finite) + self.blocks.span(b)[0]
                bad_rows += len(rows)
                bad.extend(self.source.describe(int(r)) for r in rows[: max(0, first - len(bad))])
            elif self.hold:
                self.block(b)
        return {"dim": self.source.dim, "bad": bad, "bad_rows": bad_rows}

    def digest(self) -> list[tuple[tuple[int, int], str]]:
        """A content hash per block (as tree nodes of hex strings, concatenated in order)."""
        per = {
            b: hashlib.blake2b(
                np.ascontiguousarray(self._raw(b)).tobytes(), digest_size=16
            ).hexdigest()
            for b in range(self.lo, self.hi)
        }
        return self._nodes(per)

    def rows(self, indices: Sequence[int]) -> np.ndarray:
        """The rows with these global indices (sorted) that this part holds, projected."""
        lo, hi = self.blocks.rows_of(self.lo, self.hi)
        idx = np.asarray(indices, dtype=np.int64)
        idx = idx[(idx >= lo) & (idx < hi)]
        if len(idx) == 0:
            return np.empty((0, self.dim()), np.float32)
        if not self.hold:
            return self._project(self.source.take(idx))
        size = self.blocks.block_rows
        which = idx // size
        return np.concatenate(
            [self.block(int(b))[idx[which == b] % size] for b in np.unique(which)]
        )

    def dim(self) -> int:
        if self._projection is not None:
            return self._projection[1].shape[1]
        return self.source.dim

    @sets_state
    def set_projection(self, mean: np.ndarray | None, matrix: np.ndarray | None) -> None:
        """Rows are ``(x - mean) @ matrix`` from now on (PCA before k-means)."""
        self._projection = None if mean is None else (np.asarray(mean, np.float32), matrix)
        self._held.clear()
        self._sqnorms.clear()
        self._samples = None

    # ----------------------------------------------------------------- Lloyd
    def stats(self, centroids: np.ndarray, detail: bool = False) -> tuple[list, float]:
        """Per-cluster sums, counts and inertia (float64) of this part, as tree nodes.

        Args:
            centroids: (k, d) float32.
            detail: Also each cluster's share of the inertia and the cost of removing it
                (:func:`block_stats`), for a split-merge step.

        Returns:
            The nodes, and the seconds this part computed (for Ray's overhead).
        """
        started = time.perf_counter()
        assign = Assigner(centroids, self.device)
        c64 = assign.centroids.astype(np.float64)
        per = {}
        for b in range(self.lo, self.hi):
            x = self.block(b)
            per[b] = block_stats(assign, c64, x, self._sqnorm(b, x), detail)
        return self._nodes(per), time.perf_counter() - started

    def predict(self, centroids: np.ndarray) -> np.ndarray:
        assign = Assigner(centroids, self.device)
        return np.concatenate(
            [assign(self.block(b), distances=False)[0] for b in range(self.lo, self.hi)]
        )

    # ----------------------------------------------------------------- mini-batch
    def sample_stats(
        self, centroids: np.ndarray, key: Sequence[int], rate: float, detail: bool = False
    ) -> list:
        """Stats of a seeded Bernoulli(``rate``) sample of rows, as :meth:`stats` returns for
        all rows. Rows are drawn per block from a generator keyed by ``key`` and the block, so
        the sample does not depend on the parts (the same key draws the same rows)."""
        assign = Assigner(centroids, self.device)
        c64 = assign.centroids.astype(np.float64)
        per = {}
        for b in range(self.lo, self.hi):
            _, x, sqnorm = self._sample_rows(b, key, rate)
            per[b] = block_stats(assign, c64, x, sqnorm, detail)
        return self._nodes(per)

    def _sample_rows(
        self, b: int, key: Sequence[int], rate: float
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """Block ``b``'s rows in the seeded sample ``(key, rate)``: their indices in the
        block, the rows, and their squared norm (float64).

        Which rows, and their norm, are worked out once per sample: the seeding, the
        refinement and the split-merge trials ask for the same sample pass after pass, and
        drawing a block's sample costs a random number per row (0.3 ms a block, more than
        the sampled rows' GEMM)."""
        if self._samples is None or self._samples[0] != (tuple(key), rate):
            self._samples = ((tuple(key), rate), {})
        known = self._samples[1].get(b)
        if known is None:  # One uniform number per row, from a generator of the key and block.
            lo, hi = self.blocks.span(b)
            pick = np.flatnonzero(np.random.default_rng([*key, b]).random(hi - lo) < rate)
        else:
            pick = known[0]
        if self.hold or b in self._held:
            x = self.block(b)[pick]
        else:  # Streaming: read only the sampled rows.
            lo = self.blocks.span(b)[0]
            x = self._project(self.source.take(pick + lo)).reshape(len(pick), -1)
        if known is None:
            x64 = x.astype(np.float64)
            known = self._samples[1][b] = (pick, float(np.einsum("ij,ij->", x64, x64)))
        return pick, x, known[1]

    # ----------------------------------------------------------------- k-means||
    @sets_state
    def seed_update(self, candidates: np.ndarray, first_id: int, sample=None) -> list:
        """Folds new candidates into each row's nearest-candidate distance; returns the total
        cost (float64) as tree nodes. ``sample``: ``(key, rate)`` to seed on the rows of that
        seeded sample only (:meth:`sample_stats`'s), the same in every call."""
        if self._seeding is None:
            self._seeding = {}
        assign = Assigner(candidates, self.device)
        per = {}
        for b in range(self.lo, self.hi):
            state = self._seeding.get(b)
            if sample is None:
                pick, x = None, self.block(b)
            else:  # The sample the refinement and the trials run on: drawn once.
                pick, x, _ = self._sample_rows(b, *sample)
            labels, dist = assign(x)
            if state is None:
                state = self._seeding[b] = (dist.copy(), labels + first_id, pick)
            else:
                best, nearest, _ = state
                closer = dist < best
                best[closer] = dist[closer]
                nearest[closer] = labels[closer] + first_id
            per[b] = float(state[0].astype(np.float64).sum())
        return self._nodes(per)

    def _seeding_state(self) -> dict:
        if self._seeding is None:
            raise RuntimeError(
                "this part lost its k-means|| state (its worker restarted); rerun the fit"
            )
        return self._seeding

    def seed_sample(self, seed: int, round_: int, oversampling: float, cost: float) -> tuple:
        """Rows drawn with probability ``min(1, l d^2 / cost)``: global indices and rows."""
        self._seeding_state()
        picked, rows = [], []
        for b in range(self.lo, self.hi):
            best, _, pick = self._seeding[b]
            u = np.random.default_rng([seed, 1, round_, b]).random(len(best))
            hit = np.flatnonzero(u * cost < oversampling * best.astype(np.float64))
            if pick is not None:
                hit = pick[hit]
            if len(hit):
                picked.append(hit + self.blocks.span(b)[0])
                rows.append(self.block(b)[hit])
        if not picked:
            return np.empty(0, np.int64), np.empty((0, self.dim()), np.float32)
        return np.concatenate(picked), np.concatenate(rows)

    @ends_state(seed_update)
    def seed_weights(self, n_candidates: int) -> list:
        """How many rows each candidate is nearest to (int64, as tree nodes); frees state."""
        state = self._seeding_state()
        per = {
            b: np.bincount(state[b][1], minlength=n_candidates).astype(np.int64)
            for b in range(self.lo, self.hi)
        }
        self._seeding = None
        return self._nodes(per)

    # ----------------------------------------------------------------- PCA
    def moments(self) -> list:
        """Count, sum (d,) and scatter x^T x (d, d) in float64, as tree nodes."""
        per = {}
        for b in range(self.lo, self.hi):
            x64 = self.block(b).astype(np.float64)
            per[b] = (len(x64), x64.sum(0), x64.T @ x64)
        return self._nodes(per)


class LocalParts:
    """Parts in this process: the same interface as the Ray-backed one, no Ray.

    Example:
        >>> parts = LocalParts.from_array(np.zeros((10, 2), np.float32), parts=2, block_rows=4)
        >>> parts.rows, parts.dim, len(parts.parts)
        (10, 2, 2)
    """

    def __init__(self, parts: list[Part], blocks: Blocks, dim: int, fingerprint=None):
        self.parts, self.blocks, self.dim = parts, blocks, dim
        self._fingerprint = fingerprint

    @property
    def rows(self) -> int:
        return self.blocks.rows

    @classmethod
    def from_array(
        cls,
        x: np.ndarray,
        *,
        parts: int = 1,
        block_rows: int = DEFAULT_BLOCK_ROWS,
        device: str = "cpu",
    ) -> LocalParts:
        if x.ndim != 2:
            raise DataError(f"expected a 2-d array (rows, dim), got shape {x.shape}")
        blocks = Blocks(len(x), block_rows)
        if blocks.rows == 0:
            raise DataError("no rows to cluster: the data is empty")
        source = ArraySource(x)
        ranges = blocks.split(parts)
        members = [Part(source, blocks, lo, hi, device=device) for lo, hi in ranges]
        return cls(members, blocks, x.shape[1])

    def map(self, method: Callable[..., T], *args) -> list[T]:
        """Calls :class:`Part` method ``method`` (``Part.stats``, ...) with ``args`` on every
        part, the parts on threads of their own; results in part order.

        Each part computes as a Ray actor with one CPU does: on one BLAS thread
        (:func:`one_blas_thread`). OpenBLAS cuts a GEMM between its threads in ways that
        change the last bit of some products (at 1 against 2 threads, 8,192 x 40 by 40 x
        100 differs), and a nearest centroid that flips on such a tie sends a fit down
        another trajectory: so the centroids are the same in process and on any number of
        Ray workers. The threads give back the cores (numpy and scipy release the GIL).

        Raises:
            TypeError: ``method`` is not a method of ``Part``.
        """
        name = method_name(method)
        # By name, as a remote part is called: a part of a subclass runs its own override.
        calls = [getattr(p, name) for p in self.parts]
        with one_blas_thread():
            if len(calls) == 1:
                return [calls[0](*args)]
            with ThreadPoolExecutor(len(calls), thread_name_prefix="kmeans-part") as pool:
                futures = [pool.submit(call, *args) for call in calls]
                return [f.result() for f in futures]

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint_of(self)
        return self._fingerprint


_blas_lock = threading.Lock()
_blas_controller = None
_blas_limit = None  # The limit in force while any caller is inside one_blas_thread.
_blas_depth = 0


@contextlib.contextmanager
def one_blas_thread():
    """numpy's BLAS on one thread inside (as in a Ray actor with one CPU), as it was after
    the last caller inside leaves; re-entrant, and across threads (two fits in one process
    may overlap). threadpoolctl's controller is made once (2 ms; a limit costs 0.03 ms): it
    holds the libraries loaded by then, numpy's among them, which is the one the parts'
    GEMMs run on."""
    global _blas_controller, _blas_depth, _blas_limit
    with _blas_lock:
        if _blas_controller is None:
            from threadpoolctl import ThreadpoolController

            _blas_controller = ThreadpoolController()
        if _blas_depth == 0:
            _blas_limit = _blas_controller.limit(limits=1, user_api="blas")
        _blas_depth += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_depth -= 1
            if _blas_depth == 0:
                _blas_limit.restore_original_limits()
                _blas_limit = None


def cores() -> int:
    """The CPUs this process may run on: in-process k-means parts by default."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS has no affinity call.
        return os.cpu_count() or 1


def method_name(method: Callable) -> str:
    """The name by which a part is called with ``method``, a method of :class:`Part`.

    Raises:
        TypeError: ``method`` is not one of ``Part``'s methods (a string, a lambda, another
            class's method): a part would run whatever its name means on ``Part``.
    """
    name = getattr(method, "__name__", None)
    if not isinstance(name, str) or getattr(Part, name, None) is not method:
        raise TypeError(f"parts run methods of Part, such as Part.stats; got {method!r}")
    return name


def fingerprint_of(parts) -> str:
    """sha256 over the per-block content hashes in block order, and the shape."""
    digests = tree_sum.root(
        [n for nodes in parts.map(Part.digest) for n in nodes], parts.blocks.count, _concat
    )
    return hashlib.sha256(f"{parts.rows}x{parts.dim}:{digests}".encode()).hexdigest()


def _concat(a: str, b: str) -> str:
    return a + b


def reduce(parts, results: list[list], combine: Callable = tree_sum.add):
    """The tree sum of what every part returned as nodes."""
    return tree_sum.root([n for nodes in results for n in nodes], parts.blocks.count, combine)
