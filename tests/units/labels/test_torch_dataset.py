"""The PyTorch dataset of audio and unit labels: each utterance once, crops that agree."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

import shards
from tests.exports_root import build_exports_root
from units.labels.torch_dataset import (
    LabelMismatchError,
    LengthBatches,
    UnitDataset,
    crop,
    label_span,
    pack,
)

RATE = 16_000


@pytest.fixture(scope="module")
def root(tmp_path_factory, request):
    """The session's labelled root (tests/exports_root.py), a copy of its own: 8 utterances
    of 0.5-2 s in 4 audio shards of 2, MFCC k-means units (k=8) at 100 Hz.

    One member was zeroed before labelling, so it fails to decode and the label pass rejected
    it: the root holds an audio member without labels, as real ones do. The data set reads
    it without Ray: Ray starts only if this module is the first to build the root.
    """
    out = Path(build_exports_root(tmp_path_factory, request))
    meta = json.loads((out / "labels" / "km8" / "meta.json").read_text())
    assert meta["rejects"] == 1 and meta["utterances"] == 7 and len(meta["shards"]) == 4
    return out


@pytest.fixture(scope="module")
def victim(root):
    rejects = ds.dataset(str(root / "labels" / "km8" / "rejects")).to_table().to_pylist()
    return rejects[0]["key"]


@pytest.fixture(scope="module")
def labels(root) -> dict[str, np.ndarray]:
    """The label set's units, key by key, as stored."""
    table = ds.dataset(str(root / "labels" / "km8" / "units")).to_table()
    return {r["key"]: np.array(r["units"], dtype=np.int64) for r in table.to_pylist()}


@pytest.fixture(scope="module")
def index(root):
    return shards.Index(str(root))


def keys_of(loader) -> list[str]:
    return [sample["key"] for sample in loader]


# Work splitting: each labelled utterance once per epoch.


def test_a_dataloader_with_two_workers_yields_every_labelled_key_once_per_epoch(root, labels):
    data = UnitDataset(str(root), "km8", seed=3)
    loader = DataLoader(data, batch_size=None, num_workers=2)
    epochs = []
    for epoch in range(2):
        data.set_epoch(epoch)
        keys = keys_of(loader)
        assert sorted(keys) == sorted(labels)  # Each once: no repeats, none missing.
        epochs.append(keys)
    assert epochs[0] != epochs[1]  # set_epoch reshuffles.
    assert data.utterances == len(labels) == 7


def test_without_shuffling_every_epoch_reads_the_shards_in_stored_order(root, labels):
    data = UnitDataset(str(root), "km8", shuffle=False)
    first = keys_of(data)
    data.set_epoch(1)
    assert keys_of(data) == first
    manifest = pq.read_table(root / "manifest" / "utterances.parquet").to_pylist()
    assert first == [r["key"] for r in manifest if r["key"] in labels]


def test_two_ranks_with_two_workers_each_read_disjoint_keys_that_cover_the_labels(root, labels):
    seen = []
    for rank in range(2):
        data = UnitDataset(str(root), "km8", rank=rank, world_size=2, seed=1)
        data.set_epoch(4)
        keys = keys_of(DataLoader(data, batch_size=None, num_workers=2))
        assert len(keys) == len(set(keys)) == data.utterances_per_rank(num_workers=2)[rank]
        seen.append(set(keys))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(labels)


def test_ranks_get_the_same_shard_order_and_a_shard_each_pair(root):
    ranks = [UnitDataset(str(root), "km8", rank=r, world_size=2, seed=7) for r in range(2)]
    pairs = [d.shards_for(d.rank, w, num_workers=2) for d in ranks for w in range(2)]
    assert sorted(s for p in pairs for s in p) == ranks[0].shards  # Four shards, four pairs.
    assert all(len(p) == 1 for p in pairs)
    one = UnitDataset(str(root), "km8", seed=7)
    assert [s for p in pairs for s in p] == one.shards_for(0, 0, num_workers=1)
    orders = set()
    for epoch in range(6):  # set_epoch draws another shard order.
        one.set_epoch(epoch)
        orders.add(tuple(one.shards_for(0, 0, num_workers=1)))
    assert len(orders) > 1


def test_an_audio_member_without_labels_is_skipped_undecoded_and_counted(root, labels, victim):
    with pytest.raises(Exception):  # noqa: B017 - the zeroed member does not decode.
        shards.get(str(root), victim)
    data = UnitDataset(str(root), "km8")
    assert victim not in labels and data.unlabelled == 1
    assert victim not in keys_of(data)


# What a sample holds.


def test_without_a_crop_a_sample_is_the_stored_waveform_and_its_stored_units(root, labels, index):
    samples = list(UnitDataset(str(root), "km8", max_samples=None))
    assert len(samples) == len(labels)
    for s in samples:
        assert s["waveform"].dtype == torch.float32 and s["units"].dtype == torch.int64
        np.testing.assert_array_equal(s["waveform"].numpy(), index.get(s["key"]).waveform)
        np.testing.assert_array_equal(s["units"].numpy(), labels[s["key"]])
        assert s["start"] == 0


# Crops, as fairseq's HubertDataset.


class FixedStart:
    """An rng whose crop start is chosen by the test; it checks fairseq's draw range."""

    def __init__(self, start: int, high: int):
        self.start, self.high = start, high

    def integers(self, low, high):
        assert (low, high) == (0, self.high)  # randint(0, diff + 1): every start, end included.
        return self.start


def test_the_label_span_is_fairseqs_rounded_frame_start_and_size():
    # 50 Hz at 16 kHz: 320 samples a frame. 321 / 320 = 1.003 -> 1; 32000 / 320 = 100
    # frames, but only 100 - 1 = 99 are left after frame 1.
    assert label_span(321, 32_000, 50, RATE, available=100) == (1, 99)
    assert label_span(321, 32_000, 50, RATE, available=149) == (1, 100)
    # Python's round, as fairseq: halves go to the even neighbour (1.5 -> 2, 2.5 -> 2).
    assert label_span(480, 800, 50, RATE, available=99) == (2, 2)  # 1.5 and 2.5 frames.
    assert label_span(800, 480, 50, RATE, available=99) == (2, 2)  # 2.5 and 1.5 frames.
    # 100 Hz (MFCC): 160 samples a frame. 1000 / 160 = 6.25 -> 6; 12000 / 160 = 75.
    assert label_span(1000, 12_000, 100, RATE, available=200) == (6, 75)
    # A start past the labels leaves none (fairseq's slice is empty too).
    assert label_span(32_000, 16_000, 50, RATE, available=90) == (100, 0)


def test_a_crop_cuts_the_units_at_the_label_rate_where_the_audio_is_cut():
    wav, units = np.arange(48_000), np.arange(149)  # 3 s; 149 frames at 50 Hz.
    got_wav, got_units, start = crop(wav, units, 32_000, 50, FixedStart(321, 16_001))
    assert start == 321
    np.testing.assert_array_equal(got_wav, np.arange(321, 32_321))
    np.testing.assert_array_equal(got_units, np.arange(1, 101))
    # The last possible start: frame 50 onwards, 99 frames left of the 100 asked for.
    got_wav, got_units, start = crop(wav, units, 32_000, 50, FixedStart(16_000, 16_001))
    np.testing.assert_array_equal(got_wav, np.arange(16_000, 48_000))
    np.testing.assert_array_equal(got_units, np.arange(50, 149))
    # random_crop=False: fairseq crops at 0.
    got_wav, got_units, start = crop(wav, units, 32_000, 50, None)
    assert start == 0 and len(got_wav) == 32_000
    np.testing.assert_array_equal(got_units, np.arange(100))


def test_a_waveform_no_longer_than_the_crop_is_kept_whole_without_drawing():
    wav, units = np.arange(32_000), np.arange(99)
    for max_samples in (32_000, 40_000):
        got_wav, got_units, start = crop(wav, units, max_samples, 50, rng=object())
        assert got_wav is wav and got_units is units and start == 0


def _crops(data) -> dict[str, int]:
    return {s["key"]: s["start"] for s in DataLoader(data, batch_size=None, num_workers=2)}


def test_dataset_crops_take_the_stored_slice_and_its_units_and_repeat_with_the_seed(
    root, labels, index
):
    max_samples = 12_000  # 0.75 s: most utterances (0.5-2 s) are cropped.
    data = UnitDataset(str(root), "km8", max_samples=max_samples, seed=5)
    cropped = 0
    for s in data:
        whole, units = index.get(s["key"]).waveform, labels[s["key"]]
        start = s["start"]
        if len(whole) <= max_samples:
            assert start == 0 and len(s["waveform"]) == len(whole)
            np.testing.assert_array_equal(s["units"].numpy(), units)
            continue
        cropped += 1
        assert 0 <= start <= len(whole) - max_samples
        np.testing.assert_array_equal(s["waveform"].numpy(), whole[start : start + max_samples])
        frm_start, frm_size = label_span(start, max_samples, 100, RATE, len(units))
        assert frm_start == int(round(start / 160)) and frm_size <= 75
        np.testing.assert_array_equal(s["units"].numpy(), units[frm_start : frm_start + frm_size])
    assert 4 <= cropped < len(labels)  # Four of the seven are longer: both kinds are seen.
    # Seeded by (seed, epoch, key): the same with workers as without, another epoch moves them.
    first = _crops(data)
    assert first == {s["key"]: s["start"] for s in data}
    assert _crops(UnitDataset(str(root), "km8", max_samples=max_samples, seed=5)) == first
    data.set_epoch(1)
    moved = _crops(data)
    assert moved.keys() == first.keys() and moved != first
    fixed = UnitDataset(str(root), "km8", max_samples=max_samples, random_crop=False)
    assert all(s["start"] == 0 and len(s["waveform"]) <= max_samples for s in fixed)


# Batches by length.


def test_pack_keeps_padded_size_under_max_tokens_and_puts_a_long_sample_alone():
    assert pack([5, 1, 4, 2, 9], max_tokens=8) == [[1, 3], [2], [0], [4]]
    assert pack([3, 3, 3, 3], max_tokens=9) == [[0, 1, 2], [3]]
    assert pack([20], max_tokens=8) == [[0]]
    assert pack([], max_tokens=8) == []


def test_length_batches_hold_every_key_once_with_exact_padding(root, labels, index):
    max_tokens, pad = 48_000, 500
    data = UnitDataset(str(root), "km8", seed=2)
    loader = DataLoader(
        LengthBatches(data, max_tokens=max_tokens, buffer=6, pad_unit=pad),
        batch_size=None,
        num_workers=2,
    )
    keys, padded = [], 0
    for batch in loader:
        size, width = batch["waveforms"].shape
        assert size * width <= max_tokens or size == 1
        assert width == int(batch["lengths"].max())
        assert batch["units"].shape == (size, int(batch["unit_lengths"].max()))
        for i, key in enumerate(batch["keys"]):
            n, u = int(batch["lengths"][i]), int(batch["unit_lengths"][i])
            whole = index.get(key).waveform
            assert n == len(whole) and u == len(labels[key])
            np.testing.assert_array_equal(batch["waveforms"][i, :n].numpy(), whole)
            assert not batch["waveforms"][i, n:].any()
            assert batch["padding_mask"][i].tolist() == [t >= n for t in range(width)]
            np.testing.assert_array_equal(batch["units"][i, :u].numpy(), labels[key])
            assert (batch["units"][i, u:] == pad).all()
            padded += width - n
        keys += batch["keys"]
    assert sorted(keys) == sorted(labels)
    assert padded > 0  # Some batch held several lengths, so padding was checked.


def test_samples_longer_than_max_tokens_come_one_per_batch(root, labels):
    data = UnitDataset(str(root), "km8")
    batches = list(LengthBatches(data, max_tokens=7_000, buffer=4))  # Every utterance is longer.
    assert all(len(b["keys"]) == 1 for b in batches)
    assert sorted(k for b in batches for k in b["keys"]) == sorted(labels)
    assert all(not b["padding_mask"].any() for b in batches)


# Damaged labels.


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


def test_units_that_disagree_with_their_frame_count_name_the_key(root, tmp_path):
    def add_a_frame(rows):
        rows[0]["frames"] += 1

    copy, key = _damaged_copy(root, tmp_path, "000002", add_a_frame)
    with pytest.raises(LabelMismatchError, match=rf"key '{key}' has \d+ units but frames="):
        list(UnitDataset(str(copy), "km8"))


def test_labels_for_keys_missing_from_the_audio_shard_are_an_error(root, tmp_path):
    def rename_a_key(rows):
        rows[0]["key"] = "1-2-9999"

    copy, _ = _damaged_copy(root, tmp_path, "000001", rename_a_key)
    with pytest.raises(LabelMismatchError, match=r"not in .*000001\.tar: \['1-2-9999'\]"):
        list(UnitDataset(str(copy), "km8"))


def test_a_label_set_without_committed_shards_or_bad_arguments_is_refused(root, tmp_path):
    with pytest.raises(ValueError, match="no committed label shard .*pipelines.label"):
        UnitDataset(str(root), "nope")
    with pytest.raises(ValueError, match="rank and world_size"):
        UnitDataset(str(root), "km8", rank=1)
    with pytest.raises(ValueError, match=r"rank=2 should be in \[0, world_size=2\)"):
        UnitDataset(str(root), "km8", rank=2, world_size=2)
