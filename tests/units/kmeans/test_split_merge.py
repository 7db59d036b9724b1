"""Split-merge rounds and the compiled sums: a planted local minimum that Lloyd alone keeps
and the rounds leave, the choice of what moves, and results that do not depend on the parts,
a kill or how the sums are computed."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import v_measure_score

from units.kmeans import kernels
from units.kmeans.estimator import KMeans, split_merge
from units.kmeans.parts import Assigner, LocalParts, Part


def planted(n_per=500, seed=0):
    """Four tight blobs on a line at 0, 10, 100 and 110, and a Lloyd fixed point that is not
    the answer: two centroids share the blob at 0, one sits between the blobs at 100 and 110
    (its rows average to it), one on the blob at 10."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [100.0, 0.0], [110.0, 0.0]])
    truth = np.repeat(np.arange(4), n_per)
    x = (centres[truth] + rng.normal(0, 0.5, (len(truth), 2))).astype(np.float32)
    stuck = np.array([[0.0, -0.3], [0.0, 0.3], [10.0, 0.0], [105.0, 0.0]], np.float32)
    return x, truth, stuck


class _PlantedStart(KMeans):
    """A seeded KMeans whose seeding lands on the planted fixed point."""

    def __init__(self, start, **kwargs):
        super().__init__(len(start), **kwargs)
        self.start = start

    def _initial(self, parts):
        return self.start.copy()


def test_lloyd_stays_in_a_planted_local_minimum_that_split_merge_leaves():
    x, truth, stuck = planted()
    alone = _PlantedStart(stuck, swap_rounds=0, block_rows=512).fit(x)
    assert v_measure_score(truth, alone.predict(x)) < 0.95  # Lloyd keeps the bad start.
    km = _PlantedStart(stuck, block_rows=512).fit(x)
    assert v_measure_score(truth, km.predict(x)) == pytest.approx(1.0)
    assert km.inertia_ < alone.inertia_ / 10
    # The trial's passes are not iterations: the inertia of the iterations never rises.
    inertias = [it.inertia for it in km.iterations_]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(inertias, inertias[1:], strict=False))
    assert [it.iteration for it in km.iterations_] == list(range(km.n_iter_ + 1))


def test_minibatch_ends_with_the_same_split_merge_rounds():
    x, truth, stuck = planted()
    km = _PlantedStart(stuck, algorithm="minibatch", batch_size=500, block_rows=512).fit(x)
    assert v_measure_score(truth, km.predict(x)) == pytest.approx(1.0)


def test_an_array_or_random_init_gets_lloyd_and_nothing_else():
    x, truth, stuck = planted()
    km = KMeans(4, init=stuck, block_rows=512).fit(x)
    assert v_measure_score(truth, km.predict(x)) < 0.95


def test_split_merge_moves_the_cheapest_centroids_onto_the_costliest_clusters():
    centroids = np.array([[0, 0], [1, 1], [2, 2], [3, 3], [4, 4]], np.float32)
    counts = np.array([10, 10, 0, 10, 10])
    sums = centroids.astype(np.float64) * counts[:, None]
    sse = np.array([5.0, 50.0, 0.0, 50.0, 1.0])  # Clusters 1 and 3 tie: the lower goes first.
    removal = np.array([0.5, 9.0, 0.0, 9.0, 0.5])  # 0 and 4 tie; 2 is empty, so never moves.
    new, empty, moved = split_merge(centroids, sums, counts, sse, removal, 2)
    assert moved == 2 and empty == 1
    eps = 1 / 1024
    np.testing.assert_allclose(new[0], [1 * (1 + eps), 1 * (1 - eps)], rtol=1e-6)
    np.testing.assert_allclose(new[1], [1 * (1 - eps), 1 * (1 + eps)], rtol=1e-6)
    np.testing.assert_allclose(new[4], [3 * (1 + eps), 3 * (1 - eps)], rtol=1e-6)
    np.testing.assert_allclose(new[3], [3 * (1 - eps), 3 * (1 + eps)], rtol=1e-6)
    # One cluster: nothing to remove, nothing moves.
    one = split_merge(centroids[:1], sums[:1], counts[:1], sse[:1], removal[:1], 1)
    assert one[2] == 0


def test_detail_stats_price_removal_by_the_second_nearest_centroid():
    x = np.array([[0, 0], [1, 0], [10, 0], [4, 0]], np.float32)
    centroids = np.array([[0, 0], [10, 0], [5, 0]], np.float32)
    parts = LocalParts.from_array(x, block_rows=2)
    nodes, _ = parts.parts[0].stats(centroids, True)
    from units.kmeans.parts import reduce

    sums, counts, inertia, sse, removal = reduce(parts, [nodes])
    np.testing.assert_array_equal(counts, [2, 1, 1])
    np.testing.assert_allclose(sse, [0 + 1, 0, 1])
    # Row 1 (at 1) would go to 5 (16 - 1), row 0 to 5 (25 - 0); row 2 to 5 (25); row 3 to 0.
    np.testing.assert_allclose(removal, [15 + 25, 25, 16 - 1])
    assert inertia == pytest.approx(2.0)
    labels, first, second = Assigner(centroids).two_nearest(x)
    np.testing.assert_array_equal(labels, [0, 0, 1, 2])
    np.testing.assert_allclose(second, [25, 16, 25, 16])


class _Killed(Exception):
    pass


def overlapping(n=9000, k=40, d=8, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 1.5, (k, d))
    truth = rng.integers(0, k, n)
    return (means[truth] + rng.normal(0, 1.0, (n, d))).astype(np.float32)


@pytest.mark.parametrize("refine_sample", [300, 50])
def test_split_merge_rounds_give_the_same_centroids_for_any_parts_and_after_a_kill(
    tmp_path, refine_sample
):
    x = overlapping()
    # refine_sample=300: no refinement sample (it would be most rows), the trials run on all
    # rows; 50: a sample of 2,000 rows, which the refinement and the trials run on. tol 1e-3:
    # the rounds start after a few iterations.
    kwargs = dict(seed=1, tol=1e-3, block_rows=1000, refine_sample=refine_sample)
    results = [KMeans(40, parts=p, **kwargs).fit(x) for p in (1, 2, 3)]
    plain = KMeans(40, swap_rounds=0, **kwargs).fit(x)
    assert results[0].inertia_ < plain.inertia_  # The rounds ran and helped.
    for km in results[1:]:
        np.testing.assert_array_equal(km.cluster_centers_, results[0].cluster_centers_)
        assert km.inertia_ == results[0].inertia_

    class Dying(LocalParts):
        def __init__(self, base, after):
            super().__init__(base.parts, base.blocks, base.dim)
            self.after = after

        def map(self, method, *args):
            if method in (Part.stats, Part.sample_stats):
                self.after -= 1
                if self.after < 0:
                    raise _Killed
            return super().map(method, *args)

    counting = Dying(LocalParts.from_array(x, block_rows=1000), 10**9)
    KMeans(40, **kwargs).fit(counting)
    passes = 10**9 - counting.after
    # Passes over all rows or the sample: in the refinement, the trials and after them.
    for kill_at in range(passes % 7, passes - 1, max(3, passes // 7)):
        checkpoint = str(tmp_path / f"ckpt{kill_at}")
        with pytest.raises(_Killed):
            KMeans(40, **kwargs).fit(
                Dying(LocalParts.from_array(x, parts=2, block_rows=1000), kill_at),
                checkpoint=checkpoint,
            )
        resumed = KMeans(40, **kwargs).fit(
            LocalParts.from_array(x, parts=3, block_rows=1000), checkpoint=checkpoint
        )
        np.testing.assert_array_equal(resumed.cluster_centers_, results[0].cluster_centers_)
        assert resumed.n_iter_ == results[0].n_iter_


# Within one of the sparse product's 4 MiB chunks of float64 rows (13,443 rows at d = 39,
# 682 at 768), across several (the last one short), exactly two at d = 768, and no rows.
@pytest.mark.parametrize(
    "shape",
    [
        (1000, 39, 100),
        (300, 768, 50),
        (30_001, 39, 100),
        (1_500, 768, 50),
        (1_364, 768, 7),
        (0, 3, 2),
    ],
)
@pytest.mark.parametrize("scipy_loop", ["private", "public"])
def test_compiled_sums_equal_the_sparse_product_bit_for_bit(shape, scipy_loop, monkeypatch):
    if scipy_loop == "public":  # Where scipy's private loop is gone: its public product.
        monkeypatch.setattr(kernels, "_csc_matvecs", None)
    n, d, k = shape
    rng = np.random.default_rng(0)
    x = rng.normal(0, 3, (n, d)).astype(np.float32)
    labels = rng.integers(0, k, n)
    kernels.warm_up()  # This process compiles, whatever its parts hold.
    assert kernels._kernel()
    sums, counts = kernels.cluster_sums(x, labels, k)
    ref_sums, ref_counts = kernels._sparse_sums(x, labels, k)
    # Both add the same float64 values in the same order per cluster (a product by 1.0 is
    # exact): the same bits on any CPU, not only on this one.
    np.testing.assert_array_equal(sums, ref_sums)
    np.testing.assert_array_equal(counts, ref_counts)
    assert sums.dtype == np.float64 and counts.dtype == np.int64


class _CountingParts(LocalParts):
    """Local parts that record, per full pass, whether it priced a split-merge step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.priced = []

    def map(self, method, *args):
        if method is Part.stats:
            self.priced.append(bool(args[1]))
        return super().map(method, *args)


def test_only_passes_near_a_split_merge_step_price_it():
    # Pricing (each row's second nearest centroid) costs about half a pass: the passes far
    # from converging, and a trial's passes, skip it; the step is still taken, from a pass
    # that priced it (on the planted start, at the first converged pass or the one after).
    x, truth, stuck = planted()
    counting = _CountingParts(*_local_args(x))
    km = _PlantedStart(stuck, block_rows=512).fit(counting)
    assert v_measure_score(truth, km.predict(x)) == pytest.approx(1.0)
    assert 1 <= sum(counting.priced) <= 2 * km.swap_rounds
    assert len(counting.priced) > 2 * sum(counting.priced)


def _local_args(x, parts=2, block_rows=512):
    base = LocalParts.from_array(x, parts=parts, block_rows=block_rows)
    return base.parts, base.blocks, base.dim


def test_sums_taken_while_the_compiler_warms_up_are_the_same_bits():
    # A part starts the compiler on a thread; sums asked for meanwhile take the sparse
    # product when they are small, the compiled loop once it is ready: the same bits.
    rng = np.random.default_rng(1)
    x = rng.normal(0, 3, (2000, 39)).astype(np.float32)
    labels = rng.integers(0, 100, len(x))
    kernels.warm_up()
    during = kernels.cluster_sums(x, labels, 100)
    assert kernels._kernel() is not None  # Waits for the warm-up to finish.
    after = kernels.cluster_sums(x, labels, 100)
    np.testing.assert_array_equal(during[0], after[0])
    np.testing.assert_array_equal(during[1], after[1])


_LOADS_NUMBA = """
import sys
import numpy as np
from units.kmeans import kernels
from units.kmeans.estimator import KMeans
kernels.COMPILE_FOR = int(sys.argv[1])
x = np.random.default_rng(0).normal(0, 1, (6000, 8)).astype(np.float32)
km = KMeans(20, seed=0, parts=2, block_rows=1000).fit(x)
np.save(sys.argv[2], km.cluster_centers_)
print("numba" in sys.modules)
"""


def test_only_a_process_holding_enough_values_loads_the_compiled_sums(tmp_path):
    # Loading numba costs a process about half a second of CPU: parts that hold fewer
    # values than COMPILE_FOR (together, in one process) sum with the sparse product, and
    # the fit ends with the same centroids, bit for bit, either way.
    def fit(compile_for: int) -> tuple[bool, np.ndarray]:
        out = tmp_path / f"centroids-{compile_for}.npy"
        command = [sys.executable, "-c", _LOADS_NUMBA, str(compile_for), str(out)]
        printed = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        return printed.split()[-1] == "True", np.load(out)

    small, small_centroids = fit(6000 * 8 + 1)  # The two parts hold 48,000 values.
    large, large_centroids = fit(6000 * 8)
    assert (small, large) == (False, True)
    np.testing.assert_array_equal(small_centroids, large_centroids)


class _CallLog(LocalParts):
    """Local parts that log the Part method of every map call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def map(self, method, *args):
        if method in (Part.stats, Part.sample_stats):  # The passes (not the data checks).
            self.calls.append(method.__name__)
        return super().map(method, *args)


def test_a_trial_runs_on_the_refinement_sample_when_there_is_one():
    # 4,000 rows and k = 4: the refinement sample (256 rows per centroid) is a quarter of
    # the rows, so the trial's passes run on it and full passes go on after it.
    x, truth, stuck = planted(n_per=1000)
    logged = _CallLog(*_local_args(x))
    km = _PlantedStart(stuck, block_rows=512).fit(logged)
    assert v_measure_score(truth, km.predict(x)) == pytest.approx(1.0)
    first_trial = logged.calls.index("sample_stats")
    assert logged.calls[:first_trial] and set(logged.calls[:first_trial]) == {"stats"}
    assert logged.calls[-1] == "stats"  # The fit ends on a full pass.
    # Without a sample (2,000 rows: it would be half of them) every pass is a full one.
    x, truth, stuck = planted()
    logged = _CallLog(*_local_args(x))
    _PlantedStart(stuck, block_rows=512).fit(logged)
    assert set(logged.calls) == {"stats"}


def test_a_fit_does_not_stop_on_the_rise_after_a_trial_kept_on_the_sample():
    # A trial with a refinement sample is judged on the sample's inertia: kept there, its
    # first pass over all rows may still show a rise. That pass is not convergence (Lloyd
    # has not run on all rows from the moved centroids yet); a fit that stopped there
    # ended above the inertia it had before the step (on the real 52 minutes of
    # LibriSpeech MFCC, k = 100, one round: 1,510 against 1,496 per frame). Four fits: on
    # this machine each has such a rise; where float rounding moves a trajectory (another
    # CPU's GEMM), at least one still has.
    x = overlapping(n=6000, seed=1)
    rose = 0
    for seed in range(4):
        km = KMeans(40, seed=seed, swap_rounds=1, refine_sample=50, block_rows=1000).fit(x)
        changes = [it.relative_change for it in km.iterations_[1:]]
        rises = [i for i, change in enumerate(changes, start=1) if change < -km.tol]
        rose += bool(rises)
        assert abs(changes[-1]) < km.tol  # Stopped where the inertia settled.
        for rise in rises:
            assert km.n_iter_ > rise
            assert km.inertia_ < km.iterations_[rise - 1].inertia
    assert rose, "no fit had a kept trial whose pass over all rows rose: the test tests nothing"
