"""The Hugging Face export: Parquet that ``datasets.load_dataset`` types and reads back as our
audio and units, and the no-copy alternative over the shards themselves.

Decoding an ``Audio`` column goes through torchcodec (datasets >= 4), which is not installed
here (nor FFmpeg): the tests load with the real ``load_dataset``, check the feature types,
then take the bytes with ``Audio(decode=False)`` and decode them with soundfile, the decoder
the shards were checked with.
"""

from __future__ import annotations

import glob
import io
import json
import os

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from datasets import Audio, Features, Value, load_dataset

import shards
from tests.exports_root import LABELS, build_exports_root
from units.exports import hf

#: Feature types that datasets 3.x knows (its _FEATURE_TYPES; ``List`` came with 4.0).
DATASETS_3_TYPES = {"Value", "ClassLabel", "Translation", "TranslationVariableLanguages",
                    "LargeList", "Sequence", "Array2D", "Array3D", "Array4D", "Array5D",
                    "Audio", "Image", "Video", "Pdf"}  # fmt: skip


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Everything is local: a test that reached for the Hub would fail, not download."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def root(tmp_path_factory, request) -> str:
    return build_exports_root(tmp_path_factory, request)


@pytest.fixture(scope="module")
def shard_names(root) -> list[str]:
    with open(os.path.join(root, "labels", LABELS, "meta.json")) as f:
        return json.load(f)["shards"]


@pytest.fixture(scope="module")
def out(root, shard_names) -> str:
    out = os.path.join(root, "labels", LABELS, "hf")
    results = [hf.export_shard(root, LABELS, shard, out) for shard in shard_names]
    assert not any(r["skipped"] for r in results)
    hf.finish(root, LABELS, out, results)
    return out


@pytest.fixture(scope="module")
def manifest(root) -> list[dict]:
    return pq.read_table(os.path.join(root, "manifest", "utterances.parquet")).to_pylist()


@pytest.fixture(scope="module")
def labels(root) -> dict[str, list[int]]:
    table = ds.dataset(os.path.join(root, "labels", LABELS, "units")).to_table()
    return {r["key"]: r["units"] for r in table.to_pylist()}


@pytest.fixture(scope="module")
def victim(root) -> str:
    rejects = ds.dataset(os.path.join(root, "labels", LABELS, "rejects")).to_table()
    return rejects.column("key")[0].as_py()


@pytest.fixture(scope="module")
def index(root):
    return shards.Index(root)


@pytest.fixture(scope="module")
def loaded(out, tmp_path_factory):
    """The export as a user loads it: the real load_dataset, its own cache directory."""
    cache = str(tmp_path_factory.mktemp("hf-cache"))
    return load_dataset("parquet", data_dir=out, split="train", cache_dir=cache)


def member(root: str, row: dict) -> bytes:
    with open(os.path.join(root, "shards", f"{row['shard']}.tar"), "rb") as f:
        f.seek(row["offset"])
        return f.read(row["size"])


def test_load_dataset_types_audio_as_16khz_audio_by_itself(loaded):
    assert loaded.features["audio"] == Audio(sampling_rate=16_000)
    # Typed from Arrow (see the metadata test): a list of uint16, whatever datasets calls it.
    assert loaded.features["units"] == Features.from_arrow_schema(hf.schema())["units"]
    assert loaded.features["units"].feature == Value("uint16")
    assert loaded.features["key"] == Value("string")
    assert loaded.features["frames"] == Value("int32")
    assert loaded.num_rows == 7


def test_rows_are_the_labelled_utterances_in_stored_order_with_our_units(
    loaded, manifest, labels, victim
):
    keys = loaded["key"]
    assert keys == [r["key"] for r in manifest if r["key"] in labels]
    assert victim not in keys
    for row in loaded.select_columns(["key", "units", "frames", "speaker"]):
        assert row["units"] == labels[row["key"]]
        assert row["frames"] == len(row["units"])
    speakers = {r["key"]: r["speaker"] for r in manifest}
    assert loaded["speaker"] == [speakers[k] for k in keys]


def test_audio_is_the_stored_flac_member_and_decodes_to_our_samples(loaded, root, manifest, index):
    rows = {r["key"]: r for r in manifest}
    raw = loaded.cast_column("audio", Audio(decode=False))  # No torchcodec here: see above.
    for row in raw:
        audio = row["audio"]
        assert audio["path"] == f"{row['key']}.flac"
        assert audio["bytes"] == member(root, rows[row["key"]])  # As stored, not re-encoded.
        wav, rate = sf.read(io.BytesIO(audio["bytes"]), dtype="float32")
        assert rate == 16_000 and np.array_equal(wav, index.get(row["key"]).waveform)


def test_the_metadata_names_only_feature_types_that_older_datasets_load(out):
    # A file whose metadata says "List" cannot be loaded by datasets < 4 at all
    # (huggingface/datasets#7739); the lists are typed from Arrow instead.
    for path in glob.glob(os.path.join(out, "data", "*.parquet")):
        metadata = json.loads(pq.read_schema(path).metadata[b"huggingface"])
        features = metadata["info"]["features"]
        assert features == {"audio": {"sampling_rate": 16_000, "_type": "Audio"}}
        assert Features.from_dict(features)["audio"] == Audio(sampling_rate=16_000)
        assert {f["_type"] for f in features.values()} <= DATASETS_3_TYPES


def test_files_use_the_hub_names_and_the_record_counts_the_reject(out):
    names = sorted(os.listdir(os.path.join(out, "data")))
    assert names == [f"train-{i:05d}-of-00004.parquet" for i in range(4)]
    with open(os.path.join(out, "export.json")) as f:
        record = json.load(f)
    assert (record["utterances"], record["unlabelled"], record["shards"]) == (7, 1, 4)
    assert record["load"] == f'load_dataset("parquet", data_dir="{out}", split="train")'


def test_a_rerun_finds_every_file_and_writes_nothing(root, out, shard_names):
    files = sorted(glob.glob(os.path.join(out, "data", "*.parquet")))
    before = [os.stat(p).st_mtime_ns for p in files]
    results = [hf.export_shard(root, LABELS, shard, out) for shard in shard_names]
    assert all(r["skipped"] for r in results)
    assert sum(r["utterances"] for r in results) == 7
    assert sum(r["unlabelled"] for r in results) == 1
    assert [os.stat(p).st_mtime_ns for p in files] == before


def test_a_deleted_file_is_written_again_with_the_same_rows(root, out):
    path = hf.data_path(out, "000002", 4)
    first = pq.read_table(path)
    os.remove(path)
    result = hf.export_shard(root, LABELS, "000002", out)
    assert not result["skipped"] and (result["utterances"], result["unlabelled"]) == (1, 1)
    again = pq.read_table(path)
    assert again.equals(first) and again.schema.metadata == first.schema.metadata
    assert not [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".")]


def test_the_webdataset_loader_reads_our_shards_and_joins_the_units_by_key(
    root, labels, index, victim, tmp_path
):
    """The no-copy alternative of the module docstring. datasets encodes every Audio value
    through torchcodec even when it only stores bytes, so without it ``flac`` is binary."""
    features = Features(
        {"__key__": Value("string"), "__url__": Value("string"), "flac": Value("binary")}
    )
    audio = load_dataset(
        "webdataset",
        data_files={"train": sorted(glob.glob(os.path.join(root, "shards", "*.tar")))},
        split="train",
        features=features,
        cache_dir=str(tmp_path / "wds"),
    )
    units = load_dataset(
        "parquet",
        data_dir=os.path.join(root, "labels", LABELS, "units"),
        split="train",
        cache_dir=str(tmp_path / "units"),
    )
    assert audio.num_rows == 8 and victim in audio["__key__"]  # Every member of the tars.
    by_key = dict(zip(units["key"], units["units"], strict=True))
    joined = [row for row in audio if row["__key__"] in by_key]  # The inner join on key.
    assert sorted(row["__key__"] for row in joined) == sorted(labels)
    for row in joined:
        wav, _ = sf.read(io.BytesIO(row["flac"]), dtype="float32")
        assert np.array_equal(wav, index.get(row["__key__"]).waveform)
        assert by_key[row["__key__"]] == labels[row["__key__"]]
