"""Portable normal numbers: the same bits for a seed on any machine, and normal."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from units.bestrq.gaussian import portable_log, standard_normal


def test_the_numbers_of_a_seed_are_pinned_bit_for_bit():
    # The contract: every step is an IEEE 754 correctly rounded operation on PCG64's stable
    # raw stream, so these bytes are the same on any CPU, BLAS and NumPy 1.26+ (NEP 19).
    x = standard_normal(0, 0, 1000)
    assert hashlib.sha256(x.tobytes()).hexdigest() == (
        "e157680a3acb545bcedd726d84c2d2040727dcc21e645f37894a1eef619ba694"
    )
    assert x[:3].tolist() == [0.8078330832224515, -1.3578535169650585, 0.6954632027865234]


def test_a_shorter_draw_is_a_prefix_of_a_longer_one_and_streams_differ():
    long = standard_normal(5, 2, 5000)
    for n in (1, 17, 1000, 4999):
        assert np.array_equal(standard_normal(5, 2, n), long[:n])
    assert not np.array_equal(standard_normal(5, 3, 100), long[:100])
    assert not np.array_equal(standard_normal(6, 2, 100), long[:100])


def test_the_numbers_are_standard_normal():
    x = standard_normal(7, 1, 200_000)
    n = len(x)
    # Bounds of 5 standard errors: a correct generator fails them about once in 10**6.
    assert abs(x.mean()) < 5 / math.sqrt(n)
    assert abs(x.var() - 1) < 5 * math.sqrt(2 / n)
    tail = (np.abs(x) > 2).mean()  # 0.0455 for a normal; its standard error is ~0.00047.
    assert abs(tail - 0.0455) < 5 * 0.00047


def test_the_logarithm_is_within_a_few_ulps_of_the_c_library():
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [rng.uniform(0, 1, 50_000), 10.0 ** rng.uniform(-300, 300, 50_000), [2**-1074, 1.0]]
    )
    x = x[x > 0]
    reference = np.array([math.log(v) for v in x])
    ulps = np.abs(portable_log(x) - reference) / np.spacing(np.maximum(np.abs(reference), 1e-300))
    assert ulps.max() <= 4
    assert portable_log(np.array([1.0]))[0] == 0.0


def test_negative_seeds_are_refused():
    with pytest.raises(ValueError, match="seed and stream"):
        standard_normal(-1, 0, 3)
