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
    """One in-process Ray instance for the whole test module (2 CPUs, no dashboard); a new
    one of its own even where another Ray runs on the machine."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
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


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (moto) on 127.0.0.1, for the module; yields its endpoint.

    Sets ``AWS_ENDPOINT_URL`` and dummy credentials, so ``s3://`` URLs reach it from this
    process and from Ray workers started after it. Stopped by its handle at the end.
    """
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = os.path.join(os.path.dirname(sys.executable), "moto_server")
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    saved = {k: os.environ.get(k) for k in _S3_ENV}
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def ray_after_s3(s3_server):
    """Ray started after the S3 environment is set, so its workers inherit it."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


_S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
