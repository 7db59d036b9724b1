"""The start every benchmark script shares: Ray kept on loopback, and the project importable.

``bench/shards.py`` is named like the ``shards`` package: with this directory on
``sys.path``, ``import shards`` would find the script. Ray also puts the driver script's
directory and the current one on its workers' ``sys.path``, so the scripts also run Ray
from the repository root (``REPO``).
"""

import os
import sys

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)


def prepare() -> None:
    """Call before importing ray or the project."""
    # No cluster checks for macOS/Windows, no token for a local head.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != BENCH_DIR]
    sys.path.insert(0, REPO)
