import json
import os

import numpy as np
import pytest

from shards.core.outputs import ShardOutput
from units.features.store import FeatureShardWriter, FeatureStore, finalize, store_layout


def _write(layout, shard, items, dim=3):
    w = FeatureShardWriter(ShardOutput(layout, shard), dim)
    for key, x in items:
        w.add(key, x)
    return w.commit()


def _items(seed, n, dim=3):
    rng = np.random.default_rng(seed)
    return [
        (f"u{seed}_{i}", rng.standard_normal((int(rng.integers(0, 50)), dim)).astype(np.float32))
        for i in range(n)
    ]


def test_rows_read_back_in_order_as_float16(tmp_path):
    layout = store_layout(str(tmp_path), "mfcc")
    layout.make_dirs()
    shards = {"000000": _items(0, 5), "000003": _items(1, 4)}
    for shard, items in shards.items():
        _write(layout, shard, items)
    finalize(layout, list(shards), {"spec": {"dim": 3}})
    store = FeatureStore(str(tmp_path), "mfcc")
    expected = [(k, x.astype(np.float16)) for items in shards.values() for k, x in items]
    got = list(store)
    assert [k for k, _ in got] == [k for k, _ in expected]
    for (_, a), (_, b) in zip(got, expected, strict=True):
        assert a.dtype == np.float16
        np.testing.assert_array_equal(a, b)
    assert store.meta["rows"] == sum(len(x) for _, x in expected)
    array = store.shard_array("000000")
    assert array.shape == (sum(len(x) for _, x in shards["000000"]), 3)


def test_nothing_is_visible_before_commit_and_abort_leaves_nothing(tmp_path):
    layout = store_layout(str(tmp_path), "f")
    layout.make_dirs()
    w = FeatureShardWriter(ShardOutput(layout, "000000"), 3)
    w.add("a", np.ones((4, 3), np.float32))
    assert layout.read_commit("000000") is None
    assert not os.path.exists(layout.shard_path("array", "000000"))
    w.abort()
    assert os.listdir(layout.path("shards")) == []


def test_non_finite_features_become_rejects_not_rows(tmp_path):
    layout = store_layout(str(tmp_path), "f")
    layout.make_dirs()
    bad = np.ones((2, 3), np.float32)
    bad[1, 2] = 1e6  # Beyond float16: inf once stored.
    record = _write(layout, "000000", [("good", np.ones((2, 3), np.float32)), ("bad", bad)])
    assert (record["utterances"], record["rows"], record["rejects"]) == (1, 2, 1)


def test_same_inputs_give_byte_identical_shards(tmp_path):
    for name in ("a", "b"):
        layout = store_layout(str(tmp_path), name)
        layout.make_dirs()
        _write(layout, "000000", _items(7, 6))
    for f in ("000000.npy", "000000.index.parquet", "000000.commit.json"):
        a = (tmp_path / "features" / "a" / "shards" / f).read_bytes()
        b = (tmp_path / "features" / "b" / "shards" / f).read_bytes()
        assert a == b, f


def test_a_wrong_dimension_is_refused(tmp_path):
    layout = store_layout(str(tmp_path), "f")
    layout.make_dirs()
    w = FeatureShardWriter(ShardOutput(layout, "000000"), 3)
    with pytest.raises(ValueError, match="expected"):
        w.add("a", np.ones((2, 4), np.float32))
    w.abort()


def test_reading_an_unfinished_store_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="pipelines.features"):
        FeatureStore(str(tmp_path), "nothing")


def test_meta_json_is_written_last_with_totals(tmp_path):
    layout = store_layout(str(tmp_path), "f")
    layout.make_dirs()
    _write(layout, "000000", _items(2, 3))
    meta = finalize(layout, ["000000"], {"spec": {"dim": 3}})
    assert json.loads((tmp_path / "features" / "f" / "meta.json").read_text()) == meta
    with pytest.raises(RuntimeError, match="not committed"):
        finalize(layout, ["000000", "000001"], {"spec": {"dim": 3}})
