"""Connecting an entry point to Ray: in-process local Ray, or a cluster by address."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def add_ray_arguments(parser) -> None:
    group = parser.add_argument_group("ray")
    group.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (also RAY_ADDRESS; under `ray job submit` it is "
        "set for you). Default: start Ray in this process.",
    )
    group.add_argument(
        "--num-cpus", type=int, default=None, help="CPUs for in-process local Ray (default: all)."
    )


def connect(args) -> None:
    """Starts or joins Ray; keeps every port on loopback for a local instance."""
    import ray

    if ray.is_initialized():  # Called from a program (or test) that already runs Ray.
        return
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        log.info("joined the Ray cluster at %s", address)
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=True)
    log.info("started in-process local Ray with %s CPUs", ray.cluster_resources().get("CPU"))
