"""A local Ray from ``pipelines._ray.connect``: its workers import the stages while idle,
and an actor still runs on the threads it was given."""

import json
import textwrap

from pipelines._ray import WORKER_PRELOAD
from tests.processes import run_fresh_python

# In a fresh interpreter: this process may already run a Ray of its own, and what is
# defined in ``__main__`` travels by value, so the worker imports nothing for it.
_PROGRAM = textwrap.dedent(
    """
    import argparse, json, sys
    import ray
    from pipelines._ray import connect
    from shards.core.threads import use_allotted_threads

    connect(argparse.Namespace(num_cpus=2, address=None))

    @ray.remote(num_cpus=1)
    def loaded(names):
        return [name in sys.modules for name in names]

    @ray.remote(num_cpus=1)
    class OneCpu:
        def __init__(self):
            use_allotted_threads()

        def threads(self):
            import torch
            from threadpoolctl import threadpool_info

            return [torch.get_num_threads(), *(p["num_threads"] for p in threadpool_info())]

    print(json.dumps(ray.get(loaded.remote(sys.argv[1:]))))
    print(json.dumps(ray.get(OneCpu.remote().threads.remote())))
    """
)


def _run(names):
    done = run_fresh_python(_PROGRAM, *names)
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.strip().splitlines()[-2:]]


def test_workers_preload_the_stages_and_a_one_cpu_actor_runs_one_thread_everywhere():
    names = [*WORKER_PRELOAD, "units.kmeans.stage"]  # The last is not preloaded: a control.
    loaded, threads = _run(names)
    assert dict(zip(names, loaded, strict=True)) == {
        **dict.fromkeys(WORKER_PRELOAD, True),
        "units.kmeans.stage": False,
    }
    # torch and every BLAS / OpenMP pool loaded while the worker idled (sized then to all
    # the node's cores) run one thread in an actor given one CPU.
    assert len(threads) >= 2 and set(threads) == {1}, threads
