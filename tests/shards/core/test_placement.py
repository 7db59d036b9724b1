"""The shard pools: lost actors or tasks and their shards, actors that never start, poison
shards, a full pool."""

from __future__ import annotations

import logging
import os
import time

import pytest
import ray

from shards.core.placement import RETRIES, ShardPool, TaskPool, map_until_failure

pytestmark = pytest.mark.usefixtures("ray_local")

_STARTED: list = []  # Actors of the running test, killed after it (their CPUs freed).


@pytest.fixture(autouse=True)
def _kill_actors():
    yield
    while _STARTED:
        ray.kill(_STARTED.pop(), no_restart=True)


class Worker:
    """Writes nothing: returns the shard after ``seconds``, or dies on a poison shard."""

    def write(self, shard: dict) -> dict:
        if shard.get("poison"):
            os._exit(1)  # The worker process dies, as on an out-of-memory kill.
        time.sleep(shard.get("seconds", 0.0))
        return {"shard": shard["id"], "pid": os.getpid()}


def _actors(count: int, cls=None, **options) -> list:
    remote = ray.remote(**{**RETRIES, "num_cpus": 0.5, **options})(cls or Worker)
    _STARTED.extend(remote.remote() for _ in range(count))
    return _STARTED[-count:]


def _write(actor, shard):
    return actor.write.remote(shard)


@pytest.mark.slow  # Actors restart: seconds.
def test_a_shard_whose_actor_is_killed_mid_call_is_written_by_another(caplog):
    actors = _actors(2)
    ray.get([a.__ray_ready__.remote() for a in actors])  # Both take a shard at once.
    pool = ShardPool(actors)
    shards = [{"id": 0, "seconds": 0.1}] + [{"id": i, "seconds": 1.0} for i in range(1, 5)]
    done = []
    with caplog.at_level(logging.WARNING, logger="shards.core.placement"):
        for record in map_until_failure(pool, _write, shards):
            if not done:  # Shard 1 is mid-call: kill every actor; Ray restarts them.
                for actor in pool.actors:
                    ray.kill(actor, no_restart=False)
            done.append(record["shard"])
    assert sorted(done) == list(range(5))  # Each once.
    assert "handing it out again" in caplog.text


def test_an_actor_that_cannot_be_placed_never_holds_a_shard():
    # A lost node's CPUs are still counted for a moment: an actor asked for then never starts.
    stuck = _actors(1, num_cpus=64)
    pool = ShardPool(stuck + _actors(1))
    shards = [{"id": i} for i in range(5)]
    assert sorted(r["shard"] for r in map_until_failure(pool, _write, shards)) == list(range(5))


def test_an_actor_gone_for_good_leaves_the_pool_and_none_left_fails_the_rest():
    actors = _actors(2)
    ray.kill(actors[0], no_restart=True)
    pool = ShardPool(actors)
    shards = [{"id": i} for i in range(3)]
    assert sorted(r["shard"] for r in map_until_failure(pool, _write, shards)) == [0, 1, 2]
    ray.kill(actors[1], no_restart=True)
    with pytest.raises(RuntimeError, match="every actor of the pool is gone"):
        list(map_until_failure(pool, _write, shards))


@pytest.mark.slow  # Actors restart: seconds.
def test_a_shard_that_kills_its_actor_every_time_fails_and_the_others_are_written():
    pool = ShardPool(_actors(2), attempts=1)
    shards = [{"id": 0, "poison": True}] + [{"id": i, "seconds": 0.1} for i in range(1, 5)]
    done = []
    with pytest.raises(ray.exceptions.RayActorError):
        for record in map_until_failure(pool, _write, shards):
            done.append(record["shard"])
    assert set(done) <= {1, 2, 3, 4}  # Those handed out before it failed, once each.
    assert len(done) == len(set(done))


class Broken:
    """An actor whose constructor fails (a missing checkpoint, say)."""

    def __init__(self):
        raise ValueError("no such checkpoint: /nowhere/model.pt")


def test_actors_whose_constructor_fails_fail_the_stage_with_its_error():
    pool = ShardPool(_actors(2, Broken))
    with pytest.raises(RuntimeError, match="every actor .* gone(.|\n)*no such checkpoint"):
        list(map_until_failure(pool, _write, [{"id": 0}, {"id": 1}]))


@ray.remote(num_cpus=0.5, max_retries=0)
def _write_task(shard: dict, marks: str) -> dict:
    """:meth:`Worker.write` as a task; a poison shard kills its worker the first time only
    when ``marks`` is a directory (a file there remembers it), every time otherwise."""
    if shard.get("poison") and os.path.isdir(marks):
        mark = os.path.join(marks, str(shard["id"]))
        if not os.path.exists(mark):
            open(mark, "w").close()
            os._exit(1)
    elif shard.get("poison"):
        os._exit(1)
    return Worker().write(dict(shard, poison=False))


def _task_pool(marks: str, slots: int = 2, **kwargs) -> TaskPool:
    return TaskPool(lambda shard: _write_task.remote(shard, marks), slots, **kwargs)


def _send(call, shard):
    return call(shard)


def test_a_task_lost_with_its_worker_is_sent_again_and_written_once(tmp_path, caplog):
    shards = [{"id": 0, "poison": True}] + [{"id": i, "seconds": 0.05} for i in range(1, 5)]
    with caplog.at_level(logging.WARNING, logger="shards.core.placement"):
        done = [r["shard"] for r in map_until_failure(_task_pool(str(tmp_path)), _send, shards)]
    assert sorted(done) == list(range(5))  # Each once: shard 0 the second time.
    assert "a shard lost its worker" in caplog.text and "handing it out again" in caplog.text


def test_a_task_that_kills_its_worker_every_time_fails_after_its_attempts(tmp_path):
    pool = _task_pool(str(tmp_path / "never"), attempts=1)
    shards = [{"id": 0, "poison": True}] + [{"id": i, "seconds": 0.05} for i in range(1, 5)]
    done = []
    with pytest.raises(ray.exceptions.WorkerCrashedError):
        for record in map_until_failure(pool, _send, shards):
            done.append(record["shard"])
    assert set(done) <= {1, 2, 3, 4} and len(done) == len(set(done))


def test_a_task_pool_keeps_at_most_its_slots_in_flight(tmp_path):
    pool = _task_pool(str(tmp_path), slots=1)
    assert pool.has_free() and not pool.has_next()
    pool.submit(_send, {"id": 0, "seconds": 0.2})
    assert not pool.has_free() and pool.has_next()
    pool.submit(_send, {"id": 1})  # Queued: sent once the first returns.
    assert [pool.get_next_unordered()["shard"] for _ in range(2)] == [0, 1]
    with pytest.raises(StopIteration):
        pool.get_next_unordered()
    with pytest.raises(ValueError, match="slots=0"):
        TaskPool(_send, 0)
