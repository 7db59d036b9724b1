"""The lhotse export: a Shar CutSet that lhotse's own loader reads back as our audio and units."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from lhotse import CutSet

import shards
from shards.core.outputs import StageError
from tests.exports_root import build_exports_root
from units.exports import lhotse as export
from units.labels.stage import labels_schema

RATE = 16_000


@pytest.fixture(scope="module")
def root(tmp_path_factory, request):
    """The session's labelled root (tests/exports_root.py), a copy of its own: 8 utterances
    of 0.5-2 s in 4 audio shards of 2, MFCC k-means units (k=8) at 100 Hz.

    One member was zeroed before labelling, so it fails to decode and the label pass rejected
    it: the root holds an audio member without labels. The export runs without Ray: Ray
    starts only if this module is the first to build the root.
    """
    out = Path(build_exports_root(tmp_path_factory, request))
    meta = json.loads((out / "labels" / "km8" / "meta.json").read_text())
    assert meta["rejects"] == 1 and meta["utterances"] == 7 and len(meta["shards"]) == 4
    return out


@pytest.fixture(scope="module")
def victim(root) -> str:
    rejects = ds.dataset(str(root / "labels" / "km8" / "rejects")).to_table().to_pylist()
    return rejects[0]["key"]


@pytest.fixture(scope="module")
def labels(root) -> dict[str, dict]:
    """The label set's rows, key by key, as stored."""
    table = ds.dataset(str(root / "labels" / "km8" / "units")).to_table()
    return {r["key"]: r for r in table.to_pylist()}


@pytest.fixture(scope="module")
def manifest(root) -> dict[str, dict]:
    table = pq.read_table(root / "manifest" / "utterances.parquet")
    return {r["key"]: r for r in table.to_pylist()}


@pytest.fixture(scope="module")
def exported(root, tmp_path_factory):
    """The export of km8, shard by shard as the CLI's tasks call it, then finished."""
    out = tmp_path_factory.mktemp("export") / "lhotse"
    names = json.loads((root / "labels" / "km8" / "meta.json").read_text())["shards"]
    results = [export.export_shard(str(root), "km8", name, str(out)) for name in names]
    record = export.finish(str(root), "km8", str(out), results)
    return out, results, record


def export_all(root, labels: str, out) -> list[dict]:
    names = json.loads((root / "labels" / labels / "meta.json").read_text())["shards"]
    return [export.export_shard(str(root), labels, name, str(out)) for name in names]


def read_back(out) -> list:
    """Every cut through lhotse's own loader, with its audio and units loaded."""
    return list(CutSet.from_shar(in_dir=export.shar_dir(str(out))))


def file_bytes(directory) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


# What lhotse reads back.


def test_lhotses_own_loader_yields_every_labelled_key_once_with_our_samples_and_units(
    root, exported, labels, manifest
):
    out, _, _ = exported
    cuts = read_back(out)
    assert sorted(c.id for c in cuts) == sorted(labels)  # Each once: no repeats, none missing.
    index = shards.Index(str(root))
    for cut in cuts:
        row = manifest[cut.id]
        audio = cut.load_audio()
        assert audio.dtype == np.float32 and audio.shape == (1, row["num_samples"])
        # Our decode (shards.reader.decode_member), bit for bit: lhotse scales as we do.
        np.testing.assert_array_equal(audio[0], index.get(cut.id).waveform)
        assert cut.sampling_rate == RATE and cut.duration == row["num_samples"] / RATE
        units = cut.load_units()
        assert units.dtype == np.uint16
        np.testing.assert_array_equal(units, labels[cut.id]["units"])
        assert len(units) == labels[cut.id]["frames"]
        assert cut.units.frame_shift == 0.01  # 100 Hz MFCC labels.
        assert [s.speaker for s in cut.supervisions] == [row["speaker"]]


def test_each_audio_shard_is_the_shar_shard_of_its_number_with_our_flac_bytes_as_stored(
    root, exported, manifest
):
    out, results, _ = exported
    shar = out / "shar"
    expected = {
        name
        for r in results
        for name in (
            f"cuts.{int(r['shard']):06d}.jsonl.gz",
            f"recording.{int(r['shard']):06d}.tar",
            f"units.{int(r['shard']):06d}.tar",
        )
    }
    assert set(os.listdir(shar)) == expected and len(expected) == 12
    for r in results:
        audio = (root / "shards" / f"{r['shard']}.tar").read_bytes()
        with tarfile.open(shar / f"recording.{r['shard']}.tar") as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        flacs = {n.removesuffix(".flac"): d for n, d in members.items() if n.endswith(".flac")}
        assert len(flacs) == r["cuts"] > 0
        for key, data in flacs.items():  # Not decoded and encoded again: the same bytes.
            row = manifest[key]
            assert data == audio[row["offset"] : row["offset"] + row["size"]]


def test_a_label_reject_is_not_exported_and_export_json_counts_what_was(
    exported, victim, labels, manifest
):
    out, results, record = exported
    keys = {c.id for c in read_back(out)}
    assert victim in manifest and victim not in keys and len(keys) == 7
    assert json.loads((out / "export.json").read_text()) == record
    assert record["cuts"] == sum(r["cuts"] for r in results) == 7
    assert record["unlabelled"] == 1 and record["shards"] == record["shar_shards"] == 4
    seconds = sum(manifest[k]["num_samples"] for k in labels) / RATE
    assert record["hours"] == pytest.approx(seconds / 3600, rel=1e-12)
    assert (record["k"], record["frame_rate"], record["frame_shift"]) == (8, 100, 0.01)
    assert record["fields"] == ["recording", "units"] and record["format"] == "lhotse"
    assert record["lhotse"] == __import__("lhotse").__version__


# Exactly once.


def test_a_rerun_skips_every_shard_and_writes_nothing(root, exported):
    out, results, _ = exported
    before = {name: os.stat(out / "shar" / name).st_mtime_ns for name in os.listdir(out / "shar")}
    again = export_all(root, "km8", out)
    assert all(r["skipped"] for r in again)
    assert [dict(r, skipped=False) for r in again] == results
    after = {name: os.stat(out / "shar" / name).st_mtime_ns for name in os.listdir(out / "shar")}
    assert after == before


def test_a_shard_whose_files_were_deleted_is_redone_alone_byte_for_byte(root, exported, tmp_path):
    out, results, _ = exported
    copy = tmp_path / "lhotse"
    shutil.copytree(out, copy)
    before = file_bytes(copy / "shar")
    (copy / "shar" / "recording.000001.tar").unlink()
    (copy / "shar" / "cuts.000001.jsonl.gz").unlink()
    again = export_all(root, "km8", copy)
    assert [r["shard"] for r in again if not r["skipped"]] == ["000001"]
    assert file_bytes(copy / "shar") == before
    # Deterministic whenever it runs: the gzip header's MTIME field (bytes 4-7) holds no time.
    assert all(data[4:8] == bytes(4) for n, data in before.items() if n.endswith(".gz"))
    assert export.finish(str(root), "km8", str(copy), again)["cuts"] == 7


def test_a_shard_exported_from_other_labels_is_redone(root, exported, tmp_path):
    out, _, _ = exported
    copy = tmp_path / "lhotse"
    shutil.copytree(out, copy)
    commit = copy / "commits" / "000002.json"
    record = json.loads(commit.read_text())
    record["labels"]["bytes"] += 1  # What a relabelled shard's commit record would differ in.
    commit.write_text(json.dumps(record))
    again = export_all(root, "km8", copy)
    assert [r["shard"] for r in again if not r["skipped"]] == ["000002"]


def test_finish_refuses_results_that_miss_a_shard_or_files_lhotse_would_misread(
    root, exported, tmp_path
):
    out, results, _ = exported
    with pytest.raises(StageError, match=r"missing \['000002', '000003'\]"):
        export.finish(str(root), "km8", str(out), results[:2])
    copy = tmp_path / "lhotse"
    shutil.copytree(out, copy)
    (copy / "shar" / "notes.txt").write_text("mine")
    with pytest.raises(StageError, match=r"holds files no shard of this export wrote: \['notes"):
        export.finish(str(root), "km8", str(copy), results)


# Other label sets and states.


def derive(root, tmp_path, name: str, edit, meta: dict, codebooks: int = 1, spec=None):
    """A copy of the root with label set ``name``: km8's rows after ``edit(row, num_samples)``
    in the schema of ``codebooks`` codebooks, its meta.json updated with ``meta`` and its
    feature spec with ``spec``."""
    copy = tmp_path / "root"
    for part in ("shards", "manifest"):
        shutil.copytree(root / part, copy / part)
    samples = {
        r["key"]: r["num_samples"]
        for r in pq.read_table(root / "manifest" / "utterances.parquet").to_pylist()
    }
    source, target = root / "labels" / "km8", copy / "labels" / name
    (target / "units").mkdir(parents=True)
    (target / "commits").mkdir()
    for path in sorted((source / "units").glob("*.parquet")):
        rows = [edit(r, samples[r["key"]]) for r in pq.read_table(path).to_pylist()]
        units = target / "units" / path.name
        pq.write_table(pa.Table.from_pylist(rows, schema=labels_schema(codebooks, False)), units)
        commit = json.loads((source / "commits" / f"{path.stem}.json").read_text())
        text = json.dumps(dict(commit, bytes=units.stat().st_size))
        (target / "commits" / f"{path.stem}.json").write_text(text)
    record = json.loads((source / "meta.json").read_text())
    record = dict(record, **meta, spec=dict(record["spec"], **(spec or {})))
    (target / "meta.json").write_text(json.dumps(record))
    return copy


def at_50_hz_with_two_codebooks(row: dict, num_samples: int) -> dict:
    frames = (num_samples - 400) // 320 + 1  # The HuBERT / wav2vec 2.0 frame contract.
    units = row["units"][:frames]
    return dict(
        row, units=units, units_1=[(u * 3 + 1) % 8 for u in units], frames=frames, frame_rate=50
    )


def test_a_50_hz_two_codebook_set_gives_units_1_and_a_20_ms_frame_shift(root, tmp_path):
    meta = {"frame_rate": 50, "codebooks": 2}
    ssl_framing = {"hop": 320, "frame_rate": 50.0}  # Units on the 50 Hz contract.
    copy = derive(root, tmp_path, "b2", at_50_hz_with_two_codebooks, meta, 2, ssl_framing)
    stored = ds.dataset(str(copy / "labels" / "b2" / "units")).to_table().to_pylist()
    out = tmp_path / "lhotse"
    record = export.finish(str(copy), "b2", str(out), export_all(copy, "b2", out))
    assert record["fields"] == ["recording", "units", "units_1"] and record["frame_shift"] == 0.02
    cuts = {c.id: c for c in read_back(out)}
    assert sorted(cuts) == sorted(r["key"] for r in stored)
    for row in stored:
        cut = cuts[row["key"]]
        assert cut.units.frame_shift == cut.units_1.frame_shift == 0.02
        np.testing.assert_array_equal(cut.load_units(), row["units"])
        np.testing.assert_array_equal(cut.load_units_1(), row["units_1"])
        assert len(cut.load_units_1()) == row["frames"]


def test_units_that_outlast_their_audio_at_the_recorded_rate_are_refused(root, tmp_path):
    def claim_50_hz(row, num_samples):  # 100 Hz units said to be 50 Hz: twice too long.
        return dict(row, frame_rate=50)

    copy = derive(root, tmp_path, "wrong", claim_50_hz, {"frame_rate": 50})
    with pytest.raises(ValueError, match=r"unit frames at 0\.02 s outlast"):
        export.export_shard(str(copy), "wrong", "000000", str(tmp_path / "lhotse"))
    assert not list((tmp_path / "lhotse" / "shar").iterdir())  # Nothing left behind.


def test_an_uncommitted_label_shard_is_refused(root, tmp_path):
    copy = derive(root, tmp_path, "part", lambda row, _: row, {})
    (copy / "labels" / "part" / "commits" / "000001.json").unlink()
    with pytest.raises(StageError, match="label shard 000001 of 'part' is not committed"):
        export.export_shard(str(copy), "part", "000001", str(tmp_path / "lhotse"))


def test_without_lhotse_the_export_says_how_to_install_it(root, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lhotse", None)  # Python's way to make an import fail.
    with pytest.raises(ImportError, match=r"pip install 'unitpipe\[lhotse\]'"):
        export.export_shard(str(root), "km8", "000000", str(tmp_path / "lhotse"))
    with pytest.raises(ImportError, match=r"pip install 'unitpipe\[lhotse\]'"):
        export.finish(str(root), "km8", str(tmp_path / "lhotse"), [])
