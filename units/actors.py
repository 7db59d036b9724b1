"""Where a stage's Ray actors go: GPU actors when the cluster has GPUs, else one per CPU.

Library code of the stages that stream shards through a pool of actors (features, labels,
wav2vec-U). An actor that dies (a lost node) is restarted from its constructor arguments and
its call retried; every shard call is idempotent, so a retry never duplicates output.
"""

from __future__ import annotations

import dataclasses
import logging

import ray
from ray.util import ActorPool

log = logging.getLogger(__name__)

RETRIES = {"max_restarts": 3, "max_task_retries": 3}


@dataclasses.dataclass(frozen=True)
class Placement:
    """How many actors, on which device, with which Ray resource options."""

    count: int
    device: str
    options: dict

    def actors(self, needed: int) -> int:
        """Actors to start for ``needed`` shards: as many as placed, no more than needed."""
        return max(1, min(self.count, needed))


def place(workers: int | None = None, gpus_per_worker: float | None = None) -> Placement:
    """Chooses the actors for the connected cluster.

    Args:
        workers: CPU actors (default: one per CPU of the cluster).
        gpus_per_worker: GPUs per actor; ``None`` takes one GPU per actor when the cluster
            has GPUs and runs on CPUs otherwise; 0 always runs on CPUs.
    """
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if gpus >= 1 else 0.0
    if gpus_per_worker > 0:
        if gpus >= gpus_per_worker:
            options = dict(RETRIES, num_gpus=gpus_per_worker, num_cpus=0)
            return Placement(int(gpus // gpus_per_worker), "cuda", options)
        log.warning(
            "asked for %s GPUs per worker, the cluster has %s: using CPUs", gpus_per_worker, gpus
        )
    count = workers or max(1, int(resources.get("CPU", 1)))
    return Placement(count, "cpu", dict(RETRIES, num_cpus=1))


def actor_pool(cls, placement: Placement, needed: int, *args, **kwargs) -> ActorPool:
    """A pool of ``cls(*args, **kwargs)`` actors: as many as placed, no more than needed."""
    remote = ray.remote(**placement.options)(cls)
    return ActorPool([remote.remote(*args, **kwargs) for _ in range(placement.actors(needed))])


def longest_first(shards: list[str], rows_by_shard: dict[str, list[dict]]) -> list[str]:
    """Shards ordered by audio duration, longest first, so that the last ones handed out
    are short and no actor finishes long after the others (outputs do not depend on it)."""
    return sorted(shards, key=lambda s: -sum(r["duration"] for r in rows_by_shard[s]))
