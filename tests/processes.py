"""Cleaning up after a killed driver: its Ray processes, found by a marker in their environment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def run_fresh_python(program: str, *args: str, timeout: float = 240):
    """Runs ``program`` (``python -c``) in a fresh interpreter with a bare environment (no
    RAY_ADDRESS or thread settings of this process), for what a process shows only once or
    must start without: its own Ray, say. Returns the finished process, output as text."""
    return subprocess.run(
        [sys.executable, "-c", program, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_AUTH_MODE": "disabled",
            "PATH": "/usr/bin:/bin",
        },
    )


def kill_ray_of(marker: str) -> None:
    """Kills every process whose command line or environment names ``marker`` (this driver's
    RAY_TMPDIR): Ray workers rename themselves (``ray::_shard_task``) and lead their own
    process groups, but inherit the environment."""
    for _ in range(50):
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with (
                    open(f"/proc/{entry}/cmdline", "rb") as f,
                    open(f"/proc/{entry}/environ", "rb") as g,
                ):
                    if marker.encode() in f.read() or marker.encode() in g.read():
                        found.append(int(entry))
            except OSError:
                pass
        if not found:
            return
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    raise AssertionError(f"processes of {marker} survive SIGKILL")


def parent_of(pid: int) -> int | None:
    """The parent PID of ``pid``, or ``None`` when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # "PID (NAME) STATE PPID ...": NAME may hold spaces and parentheses.
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def children_of(pid: int) -> list[int]:
    """The PIDs whose parent is ``pid``."""
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and parent_of(int(e)) == pid]


def raylet_pid(node) -> int:
    """The raylet's PID of a node of ``ray.cluster_utils.Cluster``: its workers' parent."""
    from ray._private import ray_constants

    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def remove_whole_node(cluster, node) -> int:
    """Removes ``node`` of a ``ray.cluster_utils.Cluster`` as a machine is lost (preempted):
    its raylet and every worker at once; returns how many workers it had.

    ``Cluster.remove_node`` kills the node's own processes; its workers (actors included,
    which the driver calls directly) would live on until they notice their raylet is gone,
    and might still answer a call or two, or commit a shard. They are the raylet's
    children: killed by PID first. Main thread only (``remove_node`` uses signals).
    """
    workers = children_of(raylet_pid(node))
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    cluster.remove_node(node, allow_graceful=False)
    return len(workers)


def freeze_running(cluster, task: str):
    """Stops (SIGSTOP) a worker process of ``cluster`` caught running ``task`` (Ray titles a
    worker ``ray::TASK`` while it runs one); returns its node, or ``None`` when no worker
    runs it now. A worker that finished the task just before it was stopped is let go."""
    title = f"ray::{task}".encode()
    for node in cluster.worker_nodes:
        for pid in children_of(raylet_pid(node)):
            if not _titled(pid, title):
                continue
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                continue
            if _titled(pid, title):  # Stopped inside the task: it can finish it no more.
                return node
            os.kill(pid, signal.SIGCONT)
    return None


def _titled(pid: int, title: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].strip() == title
    except OSError:
        return False
