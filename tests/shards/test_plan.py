"""The plan: columnar rows, deduped keys, shards packed to their limits, saved and loaded."""

import pickle

import numpy as np
import pyarrow as pa
import pytest

from shards import plan as planning
from shards.plan import PROBED, ShardingOptions, make_plan
from shards.root import RootLayout


def _rows(keys, sources=None, est_bytes=100, est_samples=1):
    n = len(keys)
    sources = sources or [f"/corpus/{k}.flac" for k in keys]
    return pa.table(
        {
            "key": keys,
            "source": sources,
            "sidecar": [None] * n,
            "speaker": ["s"] * n,
            "group": [None] * n,
            "text": [None] * n,
            "frames": [16000] * n,
            "sample_rate": [16000] * n,
            "channels": [1] * n,
            "format": ["FLAC"] * n,
            "subtype": ["PCM_16"] * n,
            "file_bytes": [est_bytes] * n,
            "passthrough": [True] * n,
            "est_bytes": [est_bytes] * n,
            "est_samples": [est_samples] * n,
        },
        schema=PROBED,
    )


def _greedy(nbytes, nsamples, opts):
    """The packing rule written the plain way: close a shard before it would overflow."""
    shards, size, count = [], 0, 0
    for b, n in zip(nbytes, nsamples, strict=True):
        if not shards or (count and (size + b > opts.shard_bytes or count + n > opts.max_samples)):
            shards.append(0)
            size = count = 0
        shards[-1] += 1
        size += b
        count += n
    return shards


def test_a_duplicate_key_keeps_its_first_source_in_path_order_and_rejects_the_others():
    rows = _rows(["b", "a", "a", "a"], ["/z/b.flac", "/y/a.flac", "/x/a.flac", "/w/a.flac"])
    made = make_plan(rows, [], ShardingOptions(), {"files": 4})
    assert made.table.column("source").to_pylist() == ["/w/a.flac", "/z/b.flac"]
    assert [(r["source"], r["reason"], r["message"]) for r in made.rejects] == [
        ("/x/a.flac", "duplicate_key", "key 'a' is already taken by /w/a.flac"),
        ("/y/a.flac", "duplicate_key", "key 'a' is already taken by /w/a.flac"),
    ]
    assert made.meta["planned"] == 2


def test_shards_are_packed_greedily_to_their_byte_and_sample_limits():
    rng = np.random.default_rng(0)
    n = 500
    nbytes = rng.integers(1, 5000, n)
    nsamples = rng.integers(1, 4, n)
    rows = _rows([f"k{i:04d}" for i in range(n)])
    rows = rows.set_column(rows.schema.get_field_index("est_bytes"), "est_bytes", pa.array(nbytes))
    rows = rows.set_column(
        rows.schema.get_field_index("est_samples"), "est_samples", pa.array(nsamples)
    )
    opts = ShardingOptions(shard_bytes=20_000, max_samples=9)
    made = make_plan(rows, [], opts, {"files": n})
    sizes = [len(shard) for shard in made.shards]
    assert sizes == _greedy(nbytes.tolist(), nsamples.tolist(), opts)
    assert made.meta["shards"] == len(sizes) and sum(sizes) == n


def test_an_input_over_the_limits_gets_a_shard_of_its_own():
    made = make_plan(_rows(["a", "b", "c"], est_bytes=10), [], ShardingOptions(shard_bytes=5), {})
    assert [shard.column("key").to_pylist() for shard in made.shards] == [["a"], ["b"], ["c"]]


def test_a_seed_shuffles_the_deduped_inputs_the_same_way_every_time():
    rows = _rows([f"k{i}" for i in range(50)])
    opts = ShardingOptions(seed=3, max_samples=7)
    first = make_plan(rows, [], opts, {}).table
    again = make_plan(rows.take(np.arange(49, -1, -1)), [], opts, {}).table
    assert first.equals(again)
    assert first.column("key").to_pylist() != sorted(first.column("key").to_pylist())


def test_a_shard_handed_to_a_task_carries_its_own_rows_not_the_plan(tmp_path):
    made = make_plan(_rows([f"k{i:05d}" for i in range(20_000)]), [], ShardingOptions(), {})
    one = made.shards[1]
    assert len(one) == 10_000 and one.column("shard").to_pylist() == [1] * 10_000
    # Pickled (as Ray sends a task's argument) it holds one shard's rows: a slice would
    # pickle the buffers of all 20,000.
    assert len(pickle.dumps(one)) < 0.6 * len(pickle.dumps(made.table))


def test_each_shards_size_and_hours_are_read_from_the_plan_without_copying_its_rows():
    rows = _rows([f"k{i:03d}" for i in range(10)])
    frames = np.arange(1, 11) * 8000  # 0.5 s, 1.0 s, ... 5.0 s at 16 kHz.
    rows = rows.set_column(rows.schema.get_field_index("frames"), "frames", pa.array(frames))
    made = make_plan(rows, [], ShardingOptions(max_samples=4), {})
    for i, shard in enumerate(made.shards):
        assert made.shard_size(i) == len(shard)
        seconds = [f / 16000 for f in shard.column("frames").to_pylist()]
        # Sums of up to 4 halves of seconds: exact in binary floating point.
        assert made.shard_hours()[i] == sum(seconds) / 3600
    assert len(made.shard_hours()) == len(made.shards) == 3


def test_a_saved_plan_loads_as_the_same_table_and_shards(tmp_path):
    layout = RootLayout(str(tmp_path))
    layout.make_dirs()
    made = make_plan(
        _rows([f"k{i}" for i in range(30)]), [], ShardingOptions(max_samples=4), {"files": 30}
    )
    planning.save(layout, made)
    loaded = planning.load(layout)
    assert loaded.table.equals(made.table.cast(loaded.table.schema))
    assert len(loaded.shards) == len(made.shards) == 8
    assert loaded.shards[-1].equals(made.shards[7])
    with pytest.raises(IndexError):
        loaded.shards[8]
