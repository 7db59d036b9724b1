"""Connecting an entry point to Ray: in-process local Ray, or a cluster by address.

The flags (``--address``, ``--num-cpus``) are :data:`pipelines._args.RAY`.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


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
        num_cpus=getattr(args, "num_cpus", None),
        include_dashboard=False,
        log_to_driver=True,
        logging_level=level,
    )
    log.info("started in-process local Ray with %s CPUs", ray.cluster_resources().get("CPU"))
