"""The NeMo export: manifests and tar names that NeMo's two tarred readers match, by their own
rules, to exactly our labelled audio and units.

NeMo itself is not a dependency; each reader's matching rule is restated here from NeMo 3.0's
source (cited where used) and run on the real files with the real webdataset and tarfile.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections import defaultdict

import braceexpand
import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import webdataset as wds

import shards
from shards.core.outputs import StageError
from tests.exports_root import LABELS, build_exports_root
from units.exports import common, nemo

RATE = 16_000

#: nemo/collections/common/data/lhotse/nemo_adapters.py, LazyNeMoTarredIterator.__init__:
#: the shard id of each manifest and tar comes from its name.
MANIFEST_ID = re.compile(r"manifest[^/]*_(\d+)[^/]*\.json")
TAR_ID = re.compile(r"audio[^/]*_(\d+)[^/]*\.tar")


@pytest.fixture(scope="module")
def root(tmp_path_factory, request) -> str:
    return build_exports_root(tmp_path_factory, request)


@pytest.fixture(scope="module")
def shard_names(root) -> list[str]:
    with open(os.path.join(root, "labels", LABELS, "meta.json")) as f:
        return json.load(f)["shards"]


@pytest.fixture(scope="module")
def out(root, shard_names) -> str:
    out = os.path.join(root, "labels", LABELS, "nemo")
    results = [nemo.export_shard(root, LABELS, shard, out) for shard in shard_names]
    assert not any(r["skipped"] for r in results)
    nemo.finish(root, LABELS, out, results)
    return out


@pytest.fixture(scope="module")
def record(out) -> dict:
    with open(os.path.join(out, "export.json")) as f:
        return json.load(f)


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


def expand(pattern: str) -> list[str]:
    """A NeMo path pattern as NeMo expands it (nemo/collections/asr/data/audio_to_text.py,
    expand_sharded_filepaths: ``_OP_`` and ``_CL_`` become braces, then
    ``braceexpand.braceexpand(..., escape=False)``)."""
    return list(braceexpand.braceexpand(pattern.replace("_OP_", "{").replace("_CL_", "}"), False))


def entries(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def nemo_read(data: bytes, duration: float) -> np.ndarray:
    """What NeMo's AudioSegment.from_file reads of a member: ``f.read(int(duration *
    sample_rate))`` (nemo/collections/asr/parts/preprocessing/segment.py)."""
    with sf.SoundFile(io.BytesIO(data)) as f:
        assert f.samplerate == RATE
        return f.read(int(duration * RATE), dtype="float32")


# ------------------------------------------------------------------ names and patterns


def test_the_config_patterns_expand_to_one_manifest_and_one_tar_per_shard(out, record, shard_names):
    manifests, tars = expand(record["manifest_filepath"]), expand(record["tarred_audio_filepaths"])
    assert len(manifests) == len(tars) == len(shard_names) == record["shards"] == 4
    assert all(os.path.isfile(p) for p in manifests + tars)
    for shard, tar in zip(shard_names, tars, strict=True):
        assert os.path.islink(tar)  # No copy of the audio.
        assert os.path.samefile(tar, os.path.join(out, "..", "..", "..", "shards", f"{shard}.tar"))


def test_the_lhotse_reader_finds_the_same_shard_ids_in_manifest_and_tar_names(record):
    # LazyNeMoTarredIterator._validate: both sets of ids must be equal.
    manifest_ids = [
        int(MANIFEST_ID.search(p).group(1)) for p in expand(record["manifest_filepath"])
    ]
    tar_ids = [int(TAR_ID.search(p).group(1)) for p in expand(record["tarred_audio_filepaths"])]
    assert manifest_ids == tar_ids == [0, 1, 2, 3]


def test_our_shard_names_would_not_give_the_lhotse_reader_a_shard_id(root):
    # Why the export links audio_N.tar: the tars' own names match no id pattern.
    assert TAR_ID.search(os.path.join(root, "shards", "000000.tar")) is None


def test_every_line_has_the_fields_nemo_reads_and_its_shard_id(out, record):
    for path in expand(record["manifest_filepath"]):
        shard_id = int(MANIFEST_ID.search(path).group(1))
        for entry in entries(path):
            assert {"audio_filepath", "duration", "text", "token_labels"} <= entry.keys()
            assert entry["shard_id"] == shard_id
            assert entry["audio_filepath"] == f"{entry['key']}.flac"


# ------------------------------------------------------------------ the readers' rules


def test_nemo_lhotse_reader_matches_each_labelled_member_to_its_line(record, labels, index, victim):
    """LazyNeMoTarredIterator.__iter__ / _iter_sequential: the manifest grouped by
    ``audio_filepath``, each tar member looked up by its name (``shard_manifest[
    tar_info.name]``), members without a line skipped (skip_missing_manifest_entries)."""
    matched, skipped = [], []
    manifests, tars = expand(record["manifest_filepath"]), expand(record["tarred_audio_filepaths"])
    for manifest, tar_path in zip(manifests, tars, strict=True):
        by_name = defaultdict(list)
        for entry in entries(manifest):
            by_name[entry["audio_filepath"]].append(entry)
        with tarfile.open(tar_path, mode="r|*") as tar:
            for member in tar:
                if member.name not in by_name:
                    skipped.append(member.name)
                    continue
                (entry,) = by_name.pop(member.name)
                data = tar.extractfile(member).read()
                key = member.name[: -len(".flac")]
                ours = index.get(key).waveform
                assert np.array_equal(nemo_read(data, entry["duration"]), ours), key
                assert entry["token_labels"] == labels[key]
                assert entry["text"].split() == [str(u) for u in labels[key]]
                matched.append(key)
        assert not by_name  # Every line found its member.
    assert sorted(matched) == sorted(labels)
    assert f"{victim}.flac" in skipped and all(
        name.endswith(".json") for name in skipped if name != f"{victim}.flac"
    )


def test_nemo_webdataset_reader_matches_each_labelled_sample_to_its_line(record, labels, index):
    """_TarredAudioToTextDataset (nemo/collections/asr/data/audio_to_text.py):
    ``wds.rename(audio=VALID_FILE_FORMATS, key='__key__')``, ``wds.to_tuple('audio', 'key')``,
    then ``mapping[os.path.splitext(os.path.basename(key))[0]]`` (``_filter``,
    ``_build_sample``), the mapping keyed the same way from each line's ``audio_filepath``
    (collections.py, AudioText with index_by_file_id)."""
    mapping = {}
    for path in expand(record["manifest_filepath"]):
        for entry in entries(path):
            file_id, _ = os.path.splitext(os.path.basename(entry["audio_filepath"]))
            assert file_id not in mapping
            mapping[file_id] = entry
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(expand(record["tarred_audio_filepaths"])),
        wds.tarfile_to_samples(),
        # NeMo's VALID_FILE_FORMATS starts "wav;mp3;flac;opus" (then soundfile's formats).
        wds.rename(audio="wav;mp3;flac;opus", key="__key__"),
        wds.to_tuple("audio", "key"),
    )
    seen = []
    for audio, key in pipeline:
        file_id, _ = os.path.splitext(os.path.basename(key))
        if file_id not in mapping:  # _filter: a member without a line is dropped.
            continue
        entry = mapping[file_id]
        assert np.array_equal(nemo_read(audio, entry["duration"]), index.get(file_id).waveform)
        assert entry["token_labels"] == labels[file_id]
        seen.append(file_id)
    assert sorted(seen) == sorted(labels)


def test_durations_give_nemo_exactly_every_sample():
    counts = np.arange(1, 400_000)
    durations = np.array([nemo.nemo_duration(int(n)) for n in counts])
    assert np.array_equal((durations * RATE).astype(np.int64), counts)
    # The plain quotient would lose the last sample of some lengths; the export's is at most
    # one float step above it.
    assert ((counts / RATE * RATE).astype(np.int64) != counts).any()
    assert np.all(np.nextafter(counts / RATE, np.inf) >= durations)


# ------------------------------------------------------------------ what is exported


def test_the_rejected_member_is_in_no_manifest_and_is_counted(record, victim, labels):
    keys = [e["key"] for p in expand(record["manifest_filepath"]) for e in entries(p)]
    assert victim not in keys and sorted(keys) == sorted(labels)
    assert (record["utterances"], record["unlabelled"]) == (7, 1)
    assert (record["k"], record["label_rate"], record["format"]) == (8, 100.0, "nemo")


def test_a_rerun_finds_every_shard_complete_and_writes_nothing(root, out, shard_names):
    before = {name: os.stat(os.path.join(out, "sharded_manifests", name)).st_mtime_ns
              for name in os.listdir(os.path.join(out, "sharded_manifests"))}  # fmt: skip
    results = [nemo.export_shard(root, LABELS, shard, out) for shard in shard_names]
    assert all(r["skipped"] for r in results)
    assert [r["utterances"] for r in results] == [2, 2, 1, 2]
    after = {name: os.stat(os.path.join(out, "sharded_manifests", name)).st_mtime_ns
             for name in os.listdir(os.path.join(out, "sharded_manifests"))}  # fmt: skip
    assert after == before


def test_a_deleted_manifest_is_written_again_with_the_same_bytes(root, out):
    path = os.path.join(out, "sharded_manifests", "manifest_2.json")
    with open(path, "rb") as f:
        first = f.read()
    os.remove(path)
    os.remove(os.path.join(out, "audio_2.tar"))
    result = nemo.export_shard(root, LABELS, "000002", out)
    assert not result["skipped"] and (result["utterances"], result["unlabelled"]) == (1, 1)
    with open(path, "rb") as f:
        assert f.read() == first
    assert os.path.islink(os.path.join(out, "audio_2.tar"))


def test_shard_ids_with_a_gap_cannot_be_named_by_one_brace_range(root, out, shard_names):
    results = [nemo.export_shard(root, LABELS, shard, out) for shard in shard_names]
    with pytest.raises(StageError, match="0..N-1"):
        nemo.finish(root, LABELS, out, [results[0], *results[2:]])


def test_an_object_store_root_or_output_is_refused_before_any_work(root, out):
    with pytest.raises(StageError, match="object store has no links"):
        nemo.check("s3://bucket/root", LABELS, out)
    with pytest.raises(StageError, match="object store has no links"):
        nemo.check(root, LABELS, "s3://bucket/nemo")


def test_units_that_break_the_frame_contract_fail_the_shard(tmp_path_factory, request):
    root = build_exports_root(tmp_path_factory, request)
    path = os.path.join(root, "labels", LABELS, "units", "000001.parquet")
    table = pq.read_table(path)
    rows = table.to_pylist()
    rows[0]["units"] = rows[0]["units"][:-1]  # One unit short of its frames.
    pq.write_table(type(table).from_pylist(rows, schema=table.schema), path)
    out = os.path.join(root, "labels", LABELS, "nemo")
    with pytest.raises(RuntimeError, match=rf"key '{rows[0]['key']}'.*frame|damaged"):
        nemo.export_shard(root, LABELS, "000001", out)
    assert not os.path.exists(nemo.manifest_path(out, "000001"))


def test_an_unfinished_label_set_is_named_as_such(tmp_path_factory, request):
    root = build_exports_root(tmp_path_factory, request)
    os.remove(os.path.join(root, "labels", LABELS, "meta.json"))
    with pytest.raises(StageError, match="unfinished"):
        common.finished_meta(root, LABELS)
    with pytest.raises(StageError, match=r"no label set 'other'.*label sets: km8"):
        common.finished_meta(root, "other")
