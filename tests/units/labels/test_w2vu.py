"""wav2vec-U's merge and pooling arithmetic, on sequences worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from units.labels.w2vu import W2VUPrep, mean_pool, merge_runs


def column(*values):
    return np.array(values, np.float32)[:, None]


def test_merge_runs_averages_each_run_of_one_cluster():
    x = column(1, 3, 10, 2, 4, 6)
    got = merge_runs(x, np.array([5, 5, 7, 5, 5, 5]))
    np.testing.assert_array_equal(got, column(2, 10, 4))  # Runs, not clusters: 5 twice.
    assert merge_runs(x, np.arange(6)).tolist() == x.tolist()  # All distinct: unchanged.
    np.testing.assert_array_equal(merge_runs(x, np.zeros(6, int)), column(26 / 6))
    assert merge_runs(np.empty((0, 3), np.float32), np.empty(0, int)).shape == (0, 3)
    with pytest.raises(ValueError, match="6 frames but 5 cluster ids"):
        merge_runs(x, np.zeros(5, int))


@pytest.mark.parametrize(
    "n, rate, remove_extra, expected",
    [
        (4, 0.5, False, [0.5, 2.5]),  # Divides: pairs.
        (5, 0.5, False, [0.5, 2.5, 4.0]),  # ceil(2.5) = 3 outputs; the last frame is doubled.
        (5, 0.5, True, [0.5, 2.5]),  # ... or dropped, and one output fewer.
        (7, 0.5, False, [0.5, 2.5, 4.5, 6.0]),
        (1, 0.5, False, [0.0]),
        (7, 1 / 3, False, [1.0, 4.0, 6.0]),  # 3 outputs of 3: [0 1 2] [3 4 5] [6 6 6].
        (3, 0.5, True, [0.5]),
    ],
)
def test_mean_pool_by_hand(n, rate, remove_extra, expected):
    got = mean_pool(column(*range(n)), rate, remove_extra)
    np.testing.assert_allclose(got[:, 0], expected)


def _fairseq_mean_pool(x: np.ndarray, rate: float, remove_extra: bool) -> np.ndarray:
    """The loop body of fairseq's ``mean_pool.py``, in torch as there."""
    x = torch.from_numpy(x.copy())
    target_num = math.ceil(x.size(0) * rate)
    rem = x.size(0) % target_num
    if rem > 0:
        if remove_extra:
            to_rem = target_num - rem
            target_num -= 1
            x = x[:-to_rem]
        else:
            to_add = target_num - rem
            x = F.pad(x, [0, 0, 0, to_add])
            x[-to_add:] = x[-to_add - 1]
    return x.view(target_num, -1, x.size(-1)).mean(dim=-2).numpy()


@pytest.mark.parametrize("remove_extra", [False, True])
def test_mean_pool_agrees_with_fairseqs_script(remove_extra):
    rng = np.random.default_rng(0)
    for n in range(1, 40):
        x = rng.standard_normal((n, 6)).astype(np.float32)
        for rate in (0.5, 0.25, 0.7):
            if remove_extra and rate != 0.5:
                with pytest.raises(ValueError, match="rate 0.5 only"):
                    mean_pool(x, rate, remove_extra)
                continue
            want = _fairseq_mean_pool(x, rate, remove_extra)
            np.testing.assert_allclose(mean_pool(x, rate, remove_extra), want, rtol=1e-5, atol=1e-6)


def test_prep_is_pca_then_merge_then_pool():
    a = np.array([[1, 0], [0, 2], [1, 1]], np.float32)  # (3 -> 2)
    b = np.array([10, 20], np.float32)
    x = np.array([[1, 0, 0], [3, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    # x @ a + b = [11 20] [13 20] [10 22] [11 21]; runs [0 0 | 1 | 2] -> [12 20] [10 22] [11 21]
    # pooled by 0.5: 2 outputs -> [11 21] and [11 21].
    got = W2VUPrep(a, b)(x, np.array([4, 4, 1, 2]))
    np.testing.assert_array_equal(got, [[11, 21], [11, 21]])
