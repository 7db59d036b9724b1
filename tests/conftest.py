"""Shared fixtures: environment for Ray on loopback, generated audio, one Ray per module."""

from __future__ import annotations

import os

# Before anything imports ray: every port on 127.0.0.1, no token auth for heads we start.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np
import pytest


@pytest.fixture(scope="module")
def ray_local():
    """One in-process Ray instance for the whole test module (2 CPUs, no dashboard)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def tone(
    seconds: float,
    rate: int,
    freq: float = 440.0,
    channels: int = 1,
    amplitude: float = 0.3,
    seed: int = 0,
) -> np.ndarray:
    """A sine plus a little seeded noise; shape (n,) or (n, channels)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * rate))) / rate
    x = amplitude * np.sin(2 * np.pi * freq * t) + 0.001 * rng.standard_normal(t.size)
    x = x.astype(np.float32)
    if channels == 1:
        return x
    return np.stack([x * (0.5 + 0.5 * c / channels) for c in range(channels)], axis=1)
