"""A simulated Ray cluster for the fault tests: a head without CPUs and one-CPU worker nodes
(``ray.cluster_utils.Cluster``), with this process connected as its driver."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator

import pytest
import ray
from ray.cluster_utils import Cluster

from tests.processes import kill_ray_of

#: A worker node: one CPU, so that it holds one shard (or one actor) at a time.
NODE = {"num_cpus": 1, "object_store_memory": 80 * 2**20}
#: A lost node is declared dead after about 3 s instead of Ray's default 15 s: its calls fail
#: and its actors restart that much sooner. Loose enough for a loaded machine.
HEALTH = {
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 1000,
    "health_check_failure_threshold": 3,
}


@contextlib.contextmanager
def simulated_cluster(prefix: str, workers: int) -> Iterator[Cluster]:
    """A head with no CPU (all work runs on the worker nodes) and ``workers`` nodes.

    Its own RAY_TMPDIR keeps its address file (``ray_current_cluster``) away from the
    ``ray.init()`` of other modules, and marks its processes (a removed node's workers, a
    killed driver's) for the final clean-up.
    """
    ray_tmp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")  # Short: socket paths <= 107 B.
    made = None
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_TMPDIR", ray_tmp)
        try:
            made = Cluster(
                initialize_head=True,
                head_node_args=dict(
                    NODE, num_cpus=0, include_dashboard=False, _system_config=HEALTH
                ),
            )
            for _ in range(workers):
                made.add_node(**NODE)
            ray.init(address=made.address, log_to_driver=False)
            wait_for_cpus(workers)
            yield made
        finally:
            try:
                ray.shutdown()
                if made is not None:
                    made.shutdown()
            finally:  # Even when work left hanging in a thread upsets the shutdown.
                kill_ray_of(ray_tmp)  # Workers of removed nodes, if any outlived their raylet.
                shutil.rmtree(ray_tmp, ignore_errors=True)


def wait_for_cpus(cpus: int, timeout: float = 90) -> None:
    """Waits until the cluster has ``cpus`` CPUs, all free: a node just added reports its
    resources a moment after it registers, a lost one counts until it is declared dead, and
    the actors of a finished run (or of a killed driver) go a moment after it."""
    deadline = time.monotonic() + timeout
    while (
        not ray.cluster_resources().get("CPU", 0) == ray.available_resources().get("CPU", 0) == cpus
    ):
        assert time.monotonic() < deadline, f"the cluster has {ray.available_resources()} free"
        time.sleep(0.1)
