"""Cleaning up after a killed driver: its Ray processes, found by a marker in their environment."""

from __future__ import annotations

import os
import signal
import time


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
