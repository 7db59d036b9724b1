"""The start every benchmark script shares: Ray kept on loopback, and the project importable.

``bench/shards.py`` is named like the ``shards`` package: with this directory on
``sys.path``, ``import shards`` would find the script. Ray also puts the driver script's
directory and the current one on its workers' ``sys.path``, so the scripts also run Ray
from the repository root (``REPO``).
"""

import os
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)


def prepare() -> None:
    """Call before importing ray or the project."""
    # No cluster checks for macOS/Windows, no token for a local head.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != BENCH_DIR]
    sys.path.insert(0, REPO)


def busy_cores(seconds: float = 1.0) -> float:
    """Cores busy over the next ``seconds``, from ``/proc/stat``; 0 where there is none.

    Sampled just before timing: the load average lags by a minute, so it would still blame
    the corpus generation that just finished.
    """

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]  # user .. steal
        return sum(ticks), ticks[3] + ticks[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError):
        return 0.0
    if total1 == total0:
        return 0.0
    return (1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)
