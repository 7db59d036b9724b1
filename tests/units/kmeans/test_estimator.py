"""The k-means estimator in process: answers known by construction or worked out by hand."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from sklearn.metrics import v_measure_score

from units.kmeans.estimator import CheckpointMismatchError, DataError, KMeans, update
from units.kmeans.parts import LocalParts, Part


def blobs(n=3000, k=8, d=5, spread=0.05, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.uniform(-10, 10, (k, d))
    truth = rng.integers(0, k, n)
    return (means[truth] + rng.normal(0, spread, (n, d))).astype(np.float32), truth


def overlapping(n=20000, k=40, d=8, seed=0):
    """A mixture whose components overlap: k-means converges slowly, inits differ."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 1.5, (k, d))
    truth = rng.integers(0, k, n)
    return (means[truth] + rng.normal(0, 1.0, (n, d))).astype(np.float32)


def exact_inertia(x, centroids):
    x64, c64 = x.astype(np.float64), centroids.astype(np.float64)
    d2 = ((x64[:, None, :] - c64[None]) ** 2).sum(-1)
    return d2.min(1).sum()


@pytest.mark.parametrize("init", ["k-means||", "k-means++"])
def test_blobs_are_recovered_up_to_permutation(init):
    x, truth = blobs()
    km = KMeans(8, init=init, seed=3, block_rows=512).fit(x)
    assert v_measure_score(truth, km.predict(x)) == pytest.approx(1.0)
    assert km.cluster_centers_.shape == (8, 5) and km.cluster_centers_.dtype == np.float32
    assert km.inertia_ == pytest.approx(exact_inertia(x, km.cluster_centers_), rel=1e-9)


def test_random_init_starts_from_data_rows_and_ends_in_a_local_optimum():
    x, _ = blobs()
    random = KMeans(8, init="random", seed=3, max_iter=1, tol=0)
    start = random._initial(LocalParts.from_array(x))
    assert all((x == row).all(1).any() for row in start)  # k distinct rows of the data.
    assert len(np.unique(start, axis=0)) == 8
    best = KMeans(8, seed=3).fit(x).inertia_
    assert KMeans(8, init="random", seed=3).fit(x).inertia_ >= best


def test_toy_inertia_worked_out_by_hand():
    x = np.array([[0, 0], [0, 2], [10, 0], [10, 4]], np.float32)
    km = KMeans(2, init=np.array([[0, 1], [10, 2]], np.float32), max_iter=5).fit(x)
    np.testing.assert_array_equal(km.cluster_centers_, [[0, 1], [10, 2]])
    # Each point is 1 (left pair) or 2 (right pair) away from its mean: 1 + 1 + 4 + 4.
    assert km.inertia_ == 10.0
    assert km.n_iter_ == 1  # One update, then no change: converged.
    np.testing.assert_array_equal(km.counts_, [2, 2])
    np.testing.assert_array_equal(km.predict(x), [0, 0, 1, 1])
    np.testing.assert_allclose(
        km.transform(np.array([[0, 1]], np.float32)), [[0.0, np.hypot(10, 1)]]
    )


@pytest.mark.parametrize("algorithm", ["lloyd", "minibatch"])
def test_centroids_are_identical_for_any_number_of_parts(algorithm):
    x = overlapping(n=9000)
    # refine_sample=50: the sample refinement (2,000 of 9,000 rows) runs too.
    kwargs = dict(
        seed=1, max_iter=15, tol=0, block_rows=1000, algorithm=algorithm, refine_sample=50
    )
    if algorithm == "minibatch":
        kwargs.update(batch_size=2000, max_iter=3)
    results = [KMeans(40, parts=p, **kwargs).fit(x) for p in (1, 2, 3, 9)]
    for km in results[1:]:
        np.testing.assert_array_equal(km.cluster_centers_, results[0].cluster_centers_)
        assert km.inertia_ == results[0].inertia_


class _Killed(Exception):
    pass


class _DyingParts(LocalParts):
    """Parts that die on the call to ``method`` after ``after`` calls: a killed job."""

    def __init__(self, base: LocalParts, method: Callable, after: int):
        super().__init__(base.parts, base.blocks, base.dim)
        self.method, self.after = method, after

    def map(self, method, *args):
        if method is self.method:
            self.after -= 1
            if self.after < 0:
                raise _Killed
        return super().map(method, *args)


@pytest.mark.parametrize("algorithm", ["lloyd", "minibatch"])
def test_a_killed_fit_resumes_to_the_uninterrupted_result(tmp_path, algorithm):
    x = overlapping(n=6000)
    kwargs = dict(
        seed=2, max_iter=12, tol=0, block_rows=1000, algorithm=algorithm, refine_sample=30
    )
    if algorithm == "minibatch":
        kwargs.update(batch_size=1500, max_iter=2)
    method = Part.sample_stats if algorithm == "minibatch" else Part.stats
    counting = _DyingParts(LocalParts.from_array(x, block_rows=1000), method, after=10**9)
    whole = KMeans(40, **kwargs).fit(counting)
    calls = 10**9 - counting.after
    assert calls >= 13  # Lloyd: 12 iterations and the last E-step; mini-batch: more.
    checkpoint = str(tmp_path / "ckpt")
    # Killed three calls before the end: well into the iterations, after the refinement.
    dying = _DyingParts(LocalParts.from_array(x, parts=2, block_rows=1000), method, calls - 3)
    with pytest.raises(_Killed):
        KMeans(40, **kwargs).fit(dying, checkpoint=checkpoint)
    resumed = KMeans(40, **kwargs).fit(
        LocalParts.from_array(x, parts=3, block_rows=1000), checkpoint=checkpoint
    )
    np.testing.assert_array_equal(resumed.cluster_centers_, whole.cluster_centers_)
    assert resumed.inertia_ == whole.inertia_ and resumed.n_iter_ == whole.n_iter_
    assert [s.inertia for s in resumed.iterations_] == [s.inertia for s in whole.iterations_]
    # A finished checkpoint is a finished fit: no further passes over the data.
    finished = _DyingParts(LocalParts.from_array(x, block_rows=1000), Part.stats, after=0)
    again = KMeans(40, **kwargs).fit(finished, checkpoint=checkpoint, check=False)
    np.testing.assert_array_equal(again.cluster_centers_, whole.cluster_centers_)


def test_a_checkpoint_from_another_config_or_data_is_refused(tmp_path):
    x = overlapping(n=3000)
    checkpoint = str(tmp_path / "ckpt")
    KMeans(10, seed=0, max_iter=3).fit(x, checkpoint=checkpoint)
    with pytest.raises(CheckpointMismatchError, match="another config"):
        KMeans(12, seed=0, max_iter=3).fit(x, checkpoint=checkpoint)
    with pytest.raises(CheckpointMismatchError):
        KMeans(10, seed=0, max_iter=3).fit(x[:2000], checkpoint=checkpoint)


def test_collapsed_centroids_on_duplicate_points_are_split_apart():
    x, truth = blobs(n=2000, k=4, d=3, spread=0.05, seed=1)
    # Plant the degenerate case: 10,000 copies of one row, and every centroid starting on it.
    x = np.concatenate([x, np.repeat(x[:1], 10_000, axis=0)])
    truth = np.concatenate([truth, np.repeat(truth[:1], 10_000)])
    km = KMeans(4, init=np.repeat(x[:1], 4, axis=0), max_iter=100, tol=0).fit(x)
    assert km.iterations_[0].empty_clusters == 3  # Counted in the stats...
    assert (km.counts_ > 0).all()  # ...and repaired by splitting,
    one_cluster = exact_inertia(x, x.mean(0, keepdims=True))
    assert km.inertia_ < one_cluster / 2  # into clusters that do real work.
    assert km.inertia_ == pytest.approx(exact_inertia(x, km.cluster_centers_), rel=1e-9)
    # k-means|| weighs its candidates by the rows they stand for: the duplicates count once
    # as a candidate, 10,000 times as weight, and the blobs are still found.
    seeded = KMeans(4, seed=0).fit(x)
    assert v_measure_score(truth, seeded.predict(x)) == pytest.approx(1.0)


def test_update_splits_the_largest_cluster_as_faiss_does():
    centroids = np.array([[1, 1], [2, 2], [3, 3]], np.float32)
    sums = np.array([[10, 10], [0, 0], [90, 180]], np.float64)
    counts = np.array([10, 0, 30])
    new, empty = update(centroids, sums, counts)
    assert empty == 1
    np.testing.assert_allclose(new[0], [1, 1])
    # Cluster 2 (the largest, mean (3, 6)) is split: +/- 1/1024, alternating by dimension.
    eps = 1 / 1024
    np.testing.assert_allclose(new[1], [3 * (1 + eps), 6 * (1 - eps)], rtol=1e-6)
    np.testing.assert_allclose(new[2], [3 * (1 - eps), 6 * (1 + eps)], rtol=1e-6)


def test_kmeans_parallel_is_no_worse_than_kmeans_plusplus_on_a_sample():
    x = overlapping(n=30000, k=50, d=10, seed=4)
    ours, theirs = [], []
    for seed in range(3):
        common = dict(seed=seed, max_iter=1, tol=0)  # Compare initialisations, barely refined.
        ours.append(KMeans(50, init="k-means||", **common).fit(x).inertia_)
        theirs.append(KMeans(50, init="k-means++", init_sample=2000, **common).fit(x).inertia_)
    assert np.mean(ours) <= np.mean(theirs)
    rand = KMeans(50, init="random", seed=0, max_iter=1, tol=0).fit(x).inertia_
    assert np.mean(ours) < rand


def test_minibatch_streams_rows_and_recovers_blobs():
    x, truth = blobs(n=6000, k=6)
    km = KMeans(6, algorithm="minibatch", batch_size=500, seed=0, block_rows=1000).fit(x)
    assert v_measure_score(truth, km.predict(x)) == pytest.approx(1.0)
    assert km.inertia_ == pytest.approx(exact_inertia(x, km.cluster_centers_), rel=1e-9)


def test_minibatch_parts_hold_nothing_in_memory():
    x = overlapping(n=4000)
    parts = LocalParts.from_array(x, parts=2, block_rows=1000)
    for p in parts.parts:
        p.hold = False
    KMeans(10, algorithm="minibatch", batch_size=500, max_iter=2, seed=0).fit(parts)
    assert all(not p._held for p in parts.parts)


# ------------------------------------------------------------------------ bad input
def test_more_clusters_than_rows_names_both_numbers():
    with pytest.raises(DataError, match=r"n_samples=3 should be >= n_clusters=5"):
        KMeans(5).fit(np.zeros((3, 2), np.float32))


def test_nan_and_inf_rows_are_named():
    x, _ = blobs(n=500)
    x[123, 2] = np.nan
    x[400, 0] = np.inf
    with pytest.raises(DataError, match=r"2 row\(s\) hold NaN or Inf, first at: row 123; row 400"):
        KMeans(3).fit(x)


def test_empty_data_and_wrong_shapes():
    with pytest.raises(DataError, match="empty"):
        KMeans(1).fit(np.zeros((0, 3), np.float32))
    with pytest.raises(DataError, match="2-d"):
        KMeans(1).fit(np.zeros(10, np.float32))
    with pytest.raises(DataError, match=r"init array has shape \(2, 3\), expected"):
        KMeans(2, init=np.zeros((2, 3))).fit(np.ones((10, 4), np.float32))
    km = KMeans(2, seed=0).fit(blobs(n=100, k=2, d=5)[0])
    with pytest.raises(DataError, match="dimension 5"):
        km.predict(np.zeros((3, 4), np.float32))


def test_bad_arguments_are_refused_before_any_work():
    x = np.zeros((10, 2), np.float32)
    with pytest.raises(ValueError, match="n_clusters=0"):
        KMeans(0).fit(x)
    with pytest.raises(ValueError, match="init='kmeans'"):
        KMeans(2, init="kmeans").fit(x)
    with pytest.raises(ValueError, match="refine_sample=0 must be None or >= 1"):
        KMeans(2, refine_sample=0).fit(x)
    with pytest.raises(ValueError, match="refine_iter=-1 must be None or >= 0"):
        KMeans(2, refine_iter=-1).fit(x)
    with pytest.raises(RuntimeError, match="not fitted"):
        KMeans(2).predict(x)


def test_the_refinement_sample_is_512_rows_per_centroid_up_to_a_quarter_else_256_up_to_half():
    def refinement(rows, **kwargs):
        parts = LocalParts.from_array(np.zeros((rows, 2), np.float32), block_rows=4096)
        return KMeans(10, seed=7, **kwargs)._refinement(parts)

    # 512 rows per centroid (5,120) while that is at most a quarter of the rows: 40 iterations.
    assert refinement(20_480) == (([7, 3], 0.25), 40)
    # Over a quarter: 256 per centroid (2,560) while that is at most half: 20 iterations.
    assert refinement(20_479) == (([7, 3], 2560 / 20_479), 20)
    assert refinement(5120) == (([7, 3], 0.5), 20)
    assert refinement(5119) is None  # Most of the rows: Lloyd on all of them.
    # A size of one's own counts up to half the rows; refine_iter sets the iterations.
    assert refinement(20_480, refine_sample=1000) == (([7, 3], 10_000 / 20_480), 20)
    assert refinement(20_479, refine_sample=1024) is None
    assert refinement(20_480, refine_iter=5) == (([7, 3], 0.25), 5)
    assert refinement(20_480, refine_iter=0) is None


def test_it_follows_scikit_learns_estimator_contract():
    """get_params / set_params (so clone works), random_state as the seed, labels_ after an
    in-memory fit, and score as minus the objective."""
    from sklearn.base import clone

    x, _ = blobs()
    km = KMeans(8, random_state=3, max_iter=30, block_rows=512)
    assert km.seed == 3 and km.get_params()["random_state"] == 3
    params = km.get_params()
    assert params["n_clusters"] == 8 and params["max_iter"] == 30 and params["seed"] == 3
    twin = clone(km)
    assert twin is not km and twin.get_params() == params
    assert twin.set_params(random_state=4, max_iter=10) is twin and twin.seed == 4
    with pytest.raises(ValueError, match="invalid parameter 'k'"):
        twin.set_params(k=3)
    km.fit(x)
    np.testing.assert_array_equal(km.labels_, km.predict(x))
    # float32 GEMM distances against float64: within float32 rounding of the objective.
    assert km.score(x) == pytest.approx(-exact_inertia(x, km.cluster_centers_), rel=1e-5)
    assert km.score(x) == pytest.approx(-km.inertia_, rel=1e-5)
    np.testing.assert_array_equal(clone(km).fit(x).cluster_centers_, km.cluster_centers_)
