"""Thread pools of a process that Ray gave some CPUs: the one call every actor makes first.

Its own module, apart from :mod:`shards.core.placement`, so that an actor that needs only
this (a k-means part) imports neither pyarrow nor the pools: a process start costs less.
"""

from __future__ import annotations

import os
import sys


def use_allotted_threads() -> None:
    """Sizes torch's and the BLAS libraries' thread pools to the CPUs Ray gave this actor.

    Ray says how many through ``OMP_NUM_THREADS`` when a worker takes an actor, and a
    library reads it when it loads. A worker that imported torch and numpy while idle
    (``pipelines._ray.WORKER_PRELOAD``) sized both pools to every core of the node before
    that: two one-CPU label actors on two cores then ran two threads each, spinning against
    each other (measured 4x slower). Called first in every stage actor's constructor.
    """
    allotted = os.environ.get("OMP_NUM_THREADS")
    if not allotted or not allotted.isdigit() or int(allotted) < 1:
        return
    threads = int(allotted)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    from threadpoolctl import threadpool_limits

    threadpool_limits(threads)  # Applied at once and kept: the limits of this process.
