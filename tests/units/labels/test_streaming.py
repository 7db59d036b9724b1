"""The webdataset pipeline of audio and units: each utterance once per epoch over ranks and
workers, from a local root and from S3 (a real S3 server on loopback), yielding exactly what
UnitDataset yields."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from torch.utils.data import DataLoader

import shards
from tests.exports_root import build_exports_root
from units.labels.streaming import unit_pipeline
from units.labels.torch_dataset import LabelMismatchError, UnitDataset, collate, label_span

# The S3 server's environment for every test; the pipeline itself runs without Ray.
pytestmark = pytest.mark.usefixtures("s3_server")

RATE = 16_000
BUCKET = "streams"


@pytest.fixture(scope="module")
def local_root(tmp_path_factory, request):
    """The session's labelled root (tests/exports_root.py), a copy of its own: 8 utterances
    of 0.5-2 s in 4 audio shards of 2, MFCC k-means units (k=8) at 100 Hz.

    One member was zeroed before labelling, so it fails to decode and the label pass rejected
    it: the root holds an audio member without labels, as real ones do. Ray starts only if
    this module is the first to build the root.
    """
    out = Path(build_exports_root(tmp_path_factory, request))
    meta = json.loads((out / "labels" / "km8" / "meta.json").read_text())
    assert meta["rejects"] == 1 and meta["utterances"] == 7 and len(meta["shards"]) == 4
    return out


@pytest.fixture(scope="module")
def s3_root(local_root, s3_server) -> str:
    """The same root, uploaded to the S3 server."""
    s3 = pafs.S3FileSystem(endpoint_override=s3_server, allow_bucket_creation=True)
    s3.create_dir(BUCKET)
    pafs.copy_files(
        str(local_root),
        f"{BUCKET}/ls",
        source_filesystem=pafs.LocalFileSystem(),
        destination_filesystem=s3,
    )
    return f"s3://{BUCKET}/ls"


@pytest.fixture(params=["local", "s3"])
def root(request) -> str:
    if request.param == "local":
        return str(request.getfixturevalue("local_root"))
    return request.getfixturevalue("s3_root")


@pytest.fixture(scope="module")
def labels(local_root) -> dict[str, np.ndarray]:
    """The label set's units, key by key, as stored."""
    table = ds.dataset(str(local_root / "labels" / "km8" / "units")).to_table()
    return {r["key"]: np.array(r["units"], dtype=np.int64) for r in table.to_pylist()}


@pytest.fixture(scope="module")
def index(local_root):
    return shards.Index(str(local_root))


@pytest.fixture(scope="module")
def victim(local_root) -> str:
    rejects = ds.dataset(str(local_root / "labels" / "km8" / "rejects")).to_table().to_pylist()
    return rejects[0]["key"]


def loaded(data, workers: int = 2) -> list[dict]:
    return list(DataLoader(data, batch_size=None, num_workers=workers))


# Work splitting: ranks x workers partition the shards.


@pytest.mark.slow
def test_two_ranks_of_two_workers_read_each_labelled_key_once_per_epoch_with_its_audio_and_units(
    root, labels, index
):
    ranks = [unit_pipeline(root, "km8", seed=1, rank=r, world_size=2) for r in range(2)]
    orders = []
    for epoch in range(2):
        seen = []
        for data in ranks:
            data.set_epoch(epoch)
            samples = loaded(data)
            records = data.shards.records
            mine = [s for w in range(2) for s in data.shards_for(data.rank, w, num_workers=2)]
            assert len(samples) == sum(records[s]["utterances"] for s in mine)
            for s in samples:
                assert s["waveform"].dtype == torch.float32 and s["units"].dtype == torch.int64
                np.testing.assert_array_equal(s["waveform"].numpy(), index.get(s["key"]).waveform)
                np.testing.assert_array_equal(s["units"].numpy(), labels[s["key"]])
                assert s["start"] == 0
            seen.append([s["key"] for s in samples])
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == sorted(labels)  # Each once: none twice or missing.
        orders.append(seen[0] + seen[1])
    assert orders[0] != orders[1]  # set_epoch draws another shard order.
    assert ranks[0].utterances == len(labels) == 7


def test_every_rank_draws_the_same_shard_order_and_each_pair_gets_its_slice(local_root):
    ranks = [unit_pipeline(str(local_root), "km8", seed=7, rank=r, world_size=2) for r in range(2)]
    order = ranks[0].shards.order()
    assert order == ranks[1].shards.order() and order != sorted(order)
    pairs = [d.shards_for(d.rank, w, num_workers=2) for d in ranks for w in range(2)]
    assert sorted(s for p in pairs for s in p) == sorted(order)  # A partition of the shards.
    # The order is UnitDataset's for the same seed and epoch.
    assert order == UnitDataset(str(local_root), "km8", seed=7).shards_for(0, 0, num_workers=1)


def test_without_explicit_ranks_the_pipeline_takes_webdatasets_rank_and_world_size(
    local_root, monkeypatch
):
    explicit = [s["key"] for s in unit_pipeline(str(local_root), "km8", rank=1, world_size=2)]
    assert 0 < len(explicit) < 7  # Rank 1's shards: some of the seven labelled utterances.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    data = unit_pipeline(str(local_root), "km8")
    assert (data.rank, data.world_size) == (1, 2)
    assert [s["key"] for s in data] == explicit


def test_fewer_shards_than_ranks_times_workers_is_refused_unless_empty_check_is_off(
    local_root, labels, monkeypatch, caplog
):
    with pytest.raises(ValueError, match=r"4 label shards for 5 ranks x 1 workers: 1 of the 5"):
        unit_pipeline(str(local_root), "km8", rank=0, world_size=5)
    # Two ranks of three workers each: six pairs for four shards, found in the workers
    # (WORKER/NUM_WORKERS stand for a DataLoader's, as webdataset's split_by_worker reads).
    monkeypatch.setenv("NUM_WORKERS", "3")
    monkeypatch.setenv("WORKER", "0")
    data = unit_pipeline(str(local_root), "km8", rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"2 ranks x 3 workers: 2 of the 6 .*empty_check=False"):
        list(data)
    keys, empty = [], 0
    with caplog.at_level(logging.WARNING, logger="units.labels.streaming"):
        for rank in range(2):
            data = unit_pipeline(str(local_root), "km8", rank=rank, world_size=2, empty_check=False)
            for worker in range(3):
                monkeypatch.setenv("WORKER", str(worker))
                got = [s["key"] for s in data]
                empty += not got
                keys += got
    assert empty == 2 and sorted(keys) == sorted(labels)
    assert "would read nothing" in caplog.text


def test_an_audio_member_without_labels_is_skipped_undecoded_and_counted(
    root, labels, victim, local_root
):
    with pytest.raises(Exception):  # noqa: B017 - the zeroed member does not decode.
        shards.get(str(local_root), victim)
    data = unit_pipeline(root, "km8")
    assert victim not in labels and data.unlabelled == 1
    assert sorted(s["key"] for s in data) == sorted(labels)


# What a sample holds: UnitDataset's samples and crops.


@pytest.mark.slow
def test_crops_on_s3_take_the_stored_slice_and_the_label_span_of_its_units_and_repeat(
    s3_root, labels, index
):
    max_samples = 12_000  # 0.75 s: most utterances (0.5-2 s) are cropped.
    data = unit_pipeline(s3_root, "km8", max_samples=max_samples, seed=5)
    samples = loaded(data)
    assert sorted(s["key"] for s in samples) == sorted(labels)
    cropped = 0
    for s in samples:
        whole, units, start = index.get(s["key"]).waveform, labels[s["key"]], s["start"]
        if len(whole) <= max_samples:
            assert start == 0 and len(s["waveform"]) == len(whole)
            np.testing.assert_array_equal(s["units"].numpy(), units)
            continue
        cropped += 1
        assert 0 <= start <= len(whole) - max_samples
        np.testing.assert_array_equal(s["waveform"].numpy(), whole[start : start + max_samples])
        frm_start, frm_size = label_span(start, max_samples, 100, RATE, len(units))
        np.testing.assert_array_equal(s["units"].numpy(), units[frm_start : frm_start + frm_size])
    assert 4 <= cropped < len(labels)  # Four of the seven are longer: both kinds are seen.
    # Seeded by (seed, epoch, key): the same without workers, another epoch moves them.
    first = {s["key"]: s["start"] for s in samples}
    assert {s["key"]: s["start"] for s in data} == first
    data.set_epoch(1)
    moved = {s["key"]: s["start"] for s in data}
    assert moved.keys() == first.keys() and moved != first


def _as_tuples(samples) -> list[tuple]:
    return [
        (s["key"], s["start"], s["waveform"].numpy().tobytes(), s["units"].numpy().tobytes())
        for s in samples
    ]


def test_the_pipeline_yields_unit_datasets_samples_for_the_same_root(root, local_root):
    # In stored order, whole: the same samples in the same order, bit for bit.
    stored = UnitDataset(str(local_root), "km8", shuffle=False)
    assert _as_tuples(unit_pipeline(root, "km8", shuffle_shards=False)) == _as_tuples(stored)
    # Shuffled and cropped: UnitDataset also shuffles within shards, so compare by key.
    reference = UnitDataset(str(local_root), "km8", max_samples=12_000, seed=3)
    reference.set_epoch(2)
    data = unit_pipeline(root, "km8", max_samples=12_000, seed=3, epoch=2)
    assert sorted(_as_tuples(data)) == sorted(_as_tuples(reference))
    fixed = unit_pipeline(root, "km8", max_samples=12_000, random_crop=False)
    assert all(s["start"] == 0 and len(s["waveform"]) <= 12_000 for s in fixed)


def test_user_stages_append_after_the_samples_shuffled_and_batched_with_collate(local_root, labels):
    data = unit_pipeline(str(local_root), "km8", shuffle_shards=False)
    data.append(wds.shuffle(100, seed=0))
    data.append(wds.batched(4, collation_fn=collate))
    batches = list(data)
    assert [len(b["keys"]) for b in batches] == [4, 3]
    keys = [k for b in batches for k in b["keys"]]
    assert sorted(keys) == sorted(labels)
    assert keys != [s["key"] for s in unit_pipeline(str(local_root), "km8", shuffle_shards=False)]
    for b in batches:
        for i, key in enumerate(b["keys"]):
            u = int(b["unit_lengths"][i])
            np.testing.assert_array_equal(b["units"][i, :u].numpy(), labels[key])
            assert (b["units"][i, u:] == -100).all()


# Damaged labels, bad arguments.


def _damaged_copy(root, tmp_path, shard: str, edit) -> tuple:
    """A copy of the root whose label shard ``shard`` had ``edit(rows)`` done to its rows;
    returns the copy and the first row's key."""
    copy = tmp_path / "root"
    shutil.copytree(root / "shards", copy / "shards")
    shutil.copytree(root / "labels" / "km8", copy / "labels" / "km8")
    units = copy / "labels" / "km8" / "units" / f"{shard}.parquet"
    table = pq.read_table(units)
    rows = table.to_pylist()
    key = rows[0]["key"]
    edit(rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), units)
    commit = copy / "labels" / "km8" / "commits" / f"{shard}.json"
    record = json.loads(commit.read_text())
    commit.write_text(json.dumps(dict(record, bytes=units.stat().st_size)))
    return copy, key


def test_units_that_disagree_with_their_frame_count_name_the_key(local_root, tmp_path):
    def add_a_frame(rows):
        rows[0]["frames"] += 1

    copy, key = _damaged_copy(local_root, tmp_path, "000002", add_a_frame)
    with pytest.raises(LabelMismatchError, match=rf"key '{key}' has \d+ units but frames="):
        list(unit_pipeline(str(copy), "km8"))


def test_units_that_disagree_with_the_audio_length_by_the_frame_contract_name_the_key(
    local_root, tmp_path
):
    def add_a_unit(rows):  # Consistent with its frame count, not with the audio.
        rows[0]["units"].append(0)
        rows[0]["frames"] += 1

    copy, key = _damaged_copy(local_root, tmp_path, "000003", add_a_unit)
    pattern = rf"key '{key}' has \d+ units but its \d+ samples give \d+ frames \(window 400"
    with pytest.raises(LabelMismatchError, match=pattern):
        list(unit_pipeline(str(copy), "km8"))


def test_labels_for_keys_missing_from_the_audio_shard_are_an_error(local_root, tmp_path):
    def rename_a_key(rows):
        rows[0]["key"] = "1-2-9999"

    copy, _ = _damaged_copy(local_root, tmp_path, "000001", rename_a_key)
    with pytest.raises(LabelMismatchError, match=r"not in .*000001\.tar: \['1-2-9999'\]"):
        list(unit_pipeline(str(copy), "km8"))


def test_a_label_set_without_committed_shards_or_bad_arguments_is_refused(s3_root):
    with pytest.raises(ValueError, match="no committed label shard .*pipelines.label"):
        unit_pipeline(s3_root, "nope")
    with pytest.raises(ValueError, match="rank and world_size"):
        unit_pipeline(s3_root, "km8", rank=1)
    with pytest.raises(ValueError, match=r"rank=2 should be in \[0, world_size=2\)"):
        unit_pipeline(s3_root, "km8", rank=2, world_size=2)
    with pytest.raises(ValueError, match="max_samples=0"):
        unit_pipeline(s3_root, "km8", max_samples=0)
