"""A local Ray from ``pipelines._ray.connect``: its workers import the stages while idle."""

import json
import subprocess
import sys
import textwrap

from pipelines._ray import WORKER_PRELOAD

# In a fresh interpreter: this process may already run a Ray of its own, and a remote
# function defined in ``__main__`` travels by value, so the worker imports nothing for it.
_PROGRAM = textwrap.dedent(
    """
    import argparse, json, sys
    import ray
    from pipelines._ray import connect

    connect(argparse.Namespace(num_cpus=1, address=None))

    @ray.remote(num_cpus=1)
    def loaded(names):
        return [name in sys.modules for name in names]

    print(json.dumps(ray.get(loaded.remote(sys.argv[1:]))))
    """
)


def test_a_local_rays_workers_have_the_stages_imported_before_they_take_work():
    names = [*WORKER_PRELOAD, "units.kmeans.stage"]  # The last is not preloaded: a control.
    done = subprocess.run(
        [sys.executable, "-c", _PROGRAM, *names],
        capture_output=True,
        text=True,
        timeout=240,
        env={
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_AUTH_MODE": "disabled",
            "PATH": "/usr/bin:/bin",
        },
    )
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = dict(zip(names, json.loads(done.stdout.strip().splitlines()[-1]), strict=True))
    assert loaded == {**dict.fromkeys(WORKER_PRELOAD, True), "units.kmeans.stage": False}
