"""Sums over blocks come out bit-identical however the blocks are split between workers."""

from __future__ import annotations

import numpy as np
import pytest

from units.kmeans import tree_sum


def _split_sum(values, cuts):
    n = len(values)
    edges = [0, *cuts, n]
    nodes = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        nodes += tree_sum.nodes({i: values[i] for i in range(lo, hi)}, lo, hi, n)
    return tree_sum.root(nodes, n)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 64, 100])
def test_every_split_gives_the_same_bits(n):
    rng = np.random.default_rng(n)
    # Magnitudes that make float addition order visible.
    values = [float(v) for v in rng.standard_normal(n) * 10.0 ** rng.integers(-8, 8, n)]
    whole = _split_sum(values, [])
    for _ in range(20):
        cuts = (
            sorted(rng.choice(np.arange(1, n), size=rng.integers(0, n), replace=False))
            if n > 1
            else []
        )
        assert _split_sum(values, list(cuts)) == whole
    assert whole == pytest.approx(sum(values), rel=1e-12, abs=1e-12)


def test_the_order_is_the_tree_whoever_computes_it():
    values = [1e16, 1.0, -1e16, 3.0, 0.5]
    tree = ((values[0] + values[1]) + (values[2] + values[3])) + values[4]
    left_to_right = (((values[0] + values[1]) + values[2]) + values[3]) + values[4]
    assert tree != left_to_right  # The order matters for these values...
    for cuts in ([], [1], [2], [3], [4], [1, 3], [1, 2, 3, 4]):
        assert _split_sum(values, cuts) == tree  # ...and it is always the tree's.


def test_structured_values_add_element_by_element():
    blocks = {i: (np.full(3, i, np.float64), i, {"c": np.int64(i)}) for i in range(6)}
    total = tree_sum.root(tree_sum.nodes(blocks, 0, 6), 6)
    np.testing.assert_array_equal(total[0], np.full(3, 15.0))
    assert total[1] == 15 and total[2]["c"] == 15


def test_a_missing_block_is_an_error_not_a_smaller_sum():
    nodes = tree_sum.nodes({0: 1.0, 1: 2.0}, 0, 2, 4)
    with pytest.raises(KeyError, match="block 2"):
        tree_sum.root(nodes, 4)
