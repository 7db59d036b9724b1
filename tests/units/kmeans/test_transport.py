"""k-means and PCA over Ray actors: the same bits as in this process, and what a restarted
part is given back."""

from __future__ import annotations

import re
import textwrap

import numpy as np
import pytest

from tests.processes import run_fresh_python
from tests.stores import K, frames, write_store
from units.features.store import FeatureStore
from units.kmeans.estimator import KMeans
from units.kmeans.parts import Blocks, LocalParts, Part
from units.kmeans.pca import PCA
from units.kmeans.transport import RayParts, StateJournal, distribute


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    rows = write_store(root, "mfcc")
    return root, rows


def test_a_restarted_part_replays_what_set_its_state_in_order_until_it_is_freed():
    journal = StateJournal()
    projection, candidates, more = ["mean", "matrix"], ["c0", 0], ["c1", 4]
    journal.record(Part.set_projection, projection)
    journal.record(Part.stats, ["centroids"])  # Reads state, sets none.
    journal.record(Part.seed_update, candidates)
    journal.record(Part.seed_sample, [0, 1, 16.0, 2.5])
    journal.record(Part.seed_update, more)
    assert journal.replay() == [
        ("set_projection", projection),
        ("seed_update", candidates),
        ("seed_update", more),
    ]
    journal.record(Part.seed_weights, [8])  # Ends k-means||: its distances are freed.
    assert journal.replay() == [("set_projection", projection)]


def test_ray_parts_refuse_a_method_by_name_before_calling_any_actor():
    parts = RayParts([], Blocks(10, 4), dim=2)  # No actor: nothing may be called remotely.
    with pytest.raises(TypeError, match="methods of Part"):
        parts.map("stats", np.zeros((2, 2), np.float32))


@pytest.mark.usefixtures("ray_local")
def test_actors_give_the_in_process_centroids_for_1_2_and_3_workers():
    x = frames(6000, seed=1)
    reference = KMeans(K, seed=0, max_iter=10, tol=0, block_rows=500).fit(x)
    reference_pca = PCA(5).fit(LocalParts.from_array(x, block_rows=500))
    for workers in (1, 2, 3):
        parts = distribute(x, workers=workers, block_rows=500)
        try:
            km = KMeans(K, seed=0, max_iter=10, tol=0, block_rows=500).fit(parts)
            pca = PCA(5).fit(parts)
        finally:
            parts.shutdown()
        np.testing.assert_array_equal(km.cluster_centers_, reference.cluster_centers_)
        assert km.inertia_ == reference.inertia_
        np.testing.assert_array_equal(pca.components_, reference_pca.components_)


@pytest.mark.usefixtures("ray_local")
def test_store_parts_read_the_stores_rows_held_or_streamed(root):
    root, rows = root
    reference = KMeans(K, seed=0, max_iter=8, tol=0, block_rows=256).fit(rows.astype(np.float32))
    store = FeatureStore(str(root), "mfcc")
    for hold in (True, False):
        parts = distribute(store, workers=2, hold=hold, block_rows=256)
        try:
            km = KMeans(K, seed=0, max_iter=8, tol=0, block_rows=256).fit(parts)
        finally:
            parts.shutdown()
        np.testing.assert_array_equal(km.cluster_centers_, reference.cluster_centers_)


@pytest.mark.usefixtures("ray_local")
def test_a_distributed_feature_store_fits_as_its_rows_in_one_array(root):
    root, rows = root
    parts = distribute(FeatureStore(str(root), "mfcc"), block_rows=256)
    try:
        km = KMeans(K, seed=0, max_iter=5, tol=0, block_rows=256).fit(parts)
    finally:
        parts.shutdown()
    reference = KMeans(K, seed=0, max_iter=5, tol=0, block_rows=256).fit(rows.astype(np.float32))
    np.testing.assert_array_equal(km.cluster_centers_, reference.cluster_centers_)


#: In a fresh interpreter: Ray logs the error below once per process, so a process that has
#: spread an array before could not show it again.
_SPREAD_AN_ARRAY = textwrap.dedent(
    """
    import numpy as np
    import ray
    from units.kmeans.estimator import KMeans
    from units.kmeans.transport import distribute

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    x = np.random.default_rng(0).standard_normal((3000, 4), dtype=np.float32)
    parts = distribute(x, workers=2, block_rows=500)
    fitted = KMeans(4, seed=0, max_iter=3, block_rows=500).fit(parts)
    parts.shutdown()
    here = KMeans(4, seed=0, max_iter=3, block_rows=500).fit(x)
    print(np.array_equal(fitted.cluster_centers_, here.cluster_centers_))
    """
)


@pytest.mark.slow
def test_an_array_spread_over_actors_fits_with_no_error_logged():
    """Ray logs an error for an actor that may restart and whose constructor takes an object
    from the store ("the actor restart will fail" if it is gone): array parts get their rows
    by their first call instead, and a restarted one by its restore."""
    done = run_fresh_python(_SPREAD_AN_ARRAY)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "True"
    # Ray's own lines at error level: "[2026-12-07 15:20:35,737 E 19241 19241] file.cc:N: ...".
    errors = re.findall(r"^\[[^\]]* E \d+ \d+\] .*$", done.stderr, re.MULTILINE)
    assert not errors, errors
