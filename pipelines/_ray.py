"""Connecting an entry point to Ray: in-process local Ray, or a cluster by address.

The flags (``--address``, ``--num-cpus``) are :data:`pipelines._args.RAY`.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

#: Modules every worker process of a local Ray imports while it idles, before it takes work
#: (Ray's ``preload_python_modules``). A CPU stage's shard tasks, which run on these pooled
#: workers (``units.stage``), then start in a fraction of a second: importing torch and the
#: stage costs each new worker 1.5 s on an idle core and 5 s on a busy one, which on a short
#: stage was a third of its time. Ray starts one idle worker per CPU; torch's libraries are
#: shared pages, so the cost is little memory.
#:
#: The last two are what Ray's serialization context imports in a worker at its first call
#: (``ray.util.serialization_addons``: pydantic's models, pyarrow's JSON options; pydantic
#: comes with ``ray[default]``): 0.12 s on an idle core, 0.2-0.25 s beside a stage's other
#: workers, paid before the call's arguments are read. Two k-means actors were ready 0.22 s
#: after they were asked for with these preloaded, 0.49 s on a bare local Ray.
WORKER_PRELOAD = (
    "torch",
    "units.labels.stage",
    "units.features.stage",
    "units.kmeans.transport",
    "shards.shard_job",
    "pydantic.main",
    "pyarrow.json",
)


def local_options() -> dict:
    """``ray.init`` options of a local instance beside ``num_cpus``: workers preload
    :data:`WORKER_PRELOAD`. (A cluster sets the same on its head: ``ray start --head
    --system-config='{"preload_python_modules": [...]}'``, as ``cluster.yaml`` does.)"""
    return {"_system_config": {"preload_python_modules": list(WORKER_PRELOAD)}}


def connect(args) -> None:
    """Starts or joins Ray (``args.address``, ``args.num_cpus``); keeps every port on loopback
    for a local instance. Ray logs at the level this process logs at, INFO at the most."""
    import ray

    if ray.is_initialized():  # Called from a program (or test) that already runs Ray.
        return
    level = max(logging.getLogger().getEffectiveLevel(), logging.INFO)
    address = getattr(args, "address", None) or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, logging_level=level)
        log.info("joined the Ray cluster at %s", address)
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(
        # "local": a new instance of this process's own, even where another runs on the
        # machine (Ray would join that one, with none of these options).
        address="local",
        num_cpus=getattr(args, "num_cpus", None),
        include_dashboard=False,
        log_to_driver=True,
        logging_level=level,
        **local_options(),
    )
    log.info("started in-process local Ray with %s CPUs", ray.cluster_resources().get("CPU"))
