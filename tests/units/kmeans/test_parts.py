"""The parts interface: callers name a Part method by the method itself, and the methods that
leave state behind say so where they are defined."""

from __future__ import annotations

import collections
import inspect
import os

import numpy as np
import pytest

from units.kmeans.parts import Assigner, LocalParts, Part, StateEffect, state_effect


class _NotAPart:
    def dim(self) -> int:
        return -1


def test_parts_run_a_part_method_passed_as_itself_on_every_part():
    parts = LocalParts.from_array(np.zeros((10, 3), np.float32), parts=2, block_rows=4)
    assert parts.map(Part.dim) == [3, 3]
    rows = parts.map(Part.rows, np.array([0, 9]))
    assert [len(r) for r in rows] == [1, 1]


def _blas_threads() -> int:
    """The threads of numpy's BLAS, which the parts' GEMMs run on (faiss's OpenMP OpenBLAS,
    loaded by other tests, keeps a thread count per calling thread and is not theirs)."""
    from threadpoolctl import threadpool_info

    numpy_blas = [
        i["num_threads"]
        for i in threadpool_info()
        if i["user_api"] == "blas" and os.sep + "numpy" in i["filepath"]
    ]
    assert numpy_blas, "numpy's BLAS not found among the loaded libraries"
    return max(numpy_blas)


class _Watched(Part):
    """A part that notes the BLAS threads and the thread it computes its stats on."""

    seen: list = []

    def stats(self, centroids, detail=False):
        import threading

        self.seen.append((_blas_threads(), threading.current_thread().name))
        return super().stats(centroids, detail)


def test_in_process_parts_each_compute_on_one_blas_thread_as_a_ray_worker_does():
    # OpenBLAS cuts a GEMM between its threads in ways that change the last bit of some
    # products; a nearest centroid that flips on such a tie sends a fit elsewhere. So an
    # in-process part computes as a one-CPU Ray actor does, on one BLAS thread, and the parts
    # run side by side on threads of their own instead.
    from threadpoolctl import threadpool_limits

    from units.kmeans.estimator import KMeans
    from units.kmeans.parts import ArraySource, Blocks

    x = np.random.default_rng(0).normal(size=(4000, 5)).astype(np.float32)
    blocks = Blocks(len(x), 500)
    members = [_Watched(ArraySource(x), blocks, lo, hi) for lo, hi in blocks.split(2)]
    _Watched.seen = []
    with threadpool_limits(2, user_api="blas"):
        fitted = KMeans(8, seed=0, max_iter=3).fit(LocalParts(members, blocks, 5))
        assert _blas_threads() == 2  # The caller's limit is back after the fit.
    assert _Watched.seen and {threads for threads, _ in _Watched.seen} == {1}
    assert len({name for _, name in _Watched.seen}) >= 2  # Side by side, not in turn.
    alone = KMeans(8, seed=0, max_iter=3, parts=1, block_rows=500).fit(x)
    np.testing.assert_array_equal(fitted.cluster_centers_, alone.cluster_centers_)


def test_the_one_blas_thread_limit_holds_until_the_last_caller_inside_leaves():
    # Two in-process fits may overlap (on two threads of a caller): the first to end must
    # not give the other's parts back their BLAS threads.
    from threadpoolctl import threadpool_limits

    from units.kmeans.parts import one_blas_thread

    first, second = one_blas_thread(), one_blas_thread()
    with threadpool_limits(2, user_api="blas"):
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)
        assert _blas_threads() == 1
        second.__exit__(None, None, None)
        assert _blas_threads() == 2


@pytest.mark.parametrize(
    "method",
    ["dim", _NotAPart.dim, lambda part: part.dim(), print],
    ids=["a name", "another class's method", "a lambda", "a builtin"],
)
def test_parts_refuse_anything_but_a_part_method(method):
    parts = LocalParts.from_array(np.zeros((10, 3), np.float32), parts=2, block_rows=4)
    with pytest.raises(TypeError, match="methods of Part"):
        parts.map(method)


def test_only_the_projection_and_the_seeding_distances_are_state_a_lost_part_needs_back():
    effects = {
        name: state_effect(method)
        for name, method in inspect.getmembers(Part, inspect.isfunction)
        if state_effect(method) != StateEffect()
    }
    assert effects == {
        "set_projection": StateEffect(sets=True),
        "seed_update": StateEffect(sets=True),
        "seed_weights": StateEffect(ends=(Part.seed_update,)),
    }


def _integer_grid(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Small integers, so that every float32 distance is exact on any CPU and BLAS; the
    centroids repeat, so that nearest and second nearest tie."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-8, 9, (20_000, 5)).astype(np.float32)
    centroids = rng.integers(-8, 9, (12, 5)).astype(np.float32)
    centroids[7] = centroids[3]
    return x, centroids


def test_two_nearest_gives_the_first_nearest_and_the_second_distance_with_ties_kept():
    x, centroids = _integer_grid()
    exact = ((x[:, None, :].astype(np.int64) - centroids[None].astype(np.int64)) ** 2).sum(2)
    labels, first, second = Assigner(centroids).two_nearest(x)
    np.testing.assert_array_equal(labels, exact.argmin(1))  # The first of tied centroids.
    np.testing.assert_array_equal(first, exact.min(1))
    np.testing.assert_array_equal(second, np.sort(exact, 1)[:, 1])  # A tie: the same again.
    assert (second[labels == 3] == first[labels == 3]).all() and (labels == 3).any()
    assert not (labels == 7).any()


def test_a_seeded_sample_gives_the_same_stats_drawn_afresh_or_remembered():
    x, centroids = _integer_grid(1)
    x = x + np.float32(0.25)  # Not the grid: sums and norms round as real data do.

    def part():
        return LocalParts.from_array(x, parts=1, block_rows=4096).parts[0]

    remembered = part()
    for key, rate in [([0, 3], 0.05), ([1, 3], 0.05), ([0, 3], 0.2), ([0, 3], 0.05)]:
        got = remembered.sample_stats(centroids, key, rate)
        fresh = part().sample_stats(centroids, key, rate)
        assert _same_nodes(got, fresh), (key, rate)
    # Rows that change (a projection) draw their norms again.
    mean, matrix = x.mean(0), np.eye(5, 3, dtype=np.float32)
    remembered.set_projection(mean, matrix)
    projected = part()
    projected.set_projection(mean, matrix)
    assert _same_nodes(
        remembered.sample_stats(centroids[:, :3], [0, 3], 0.05),
        projected.sample_stats(centroids[:, :3], [0, 3], 0.05),
    )


def test_the_seeding_and_the_refinement_draw_each_block_of_their_sample_once(monkeypatch):
    x, centroids = _integer_grid(2)
    sample = ([0, 3], 0.05)
    drawn = collections.Counter()
    real = np.random.default_rng

    def counting(seed=None):
        if isinstance(seed, list) and seed[:2] == sample[0]:
            drawn[seed[2]] += 1  # The block.
        return real(seed)

    part = LocalParts.from_array(x, parts=1, block_rows=4096).parts[0]
    monkeypatch.setattr(np.random, "default_rng", counting)
    part.seed_update(centroids[:1], 0, sample)
    part.seed_update(centroids[1:4], 1, sample)
    part.seed_weights(4)
    remembered = [part.sample_stats(centroids, *sample) for _ in range(2)]
    monkeypatch.undo()
    assert drawn == {b: 1 for b in range(5)}  # 20,000 rows in blocks of 4,096.
    fresh = LocalParts.from_array(x, parts=1, block_rows=4096).parts[0]
    assert _same_nodes(remembered[1], fresh.sample_stats(centroids, *sample))


def _same_nodes(a, b) -> bool:
    """Tree nodes equal bit for bit (arrays and floats alike)."""
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_nodes(x, y) for x, y in zip(a, b, strict=True))
    return bool(np.array_equal(a, b))
