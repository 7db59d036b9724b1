"""The streaming label pass: every utterance gets the units of its exact features."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

import shards
from shards.core.outputs import StageError
from tests.fairseq_checks import fairseq_get_audio, fairseq_label_checks
from tests.mfcc_root import build_mfcc_root
from tests.models import save_tiny
from tests.numerics import SSL_FEATURE_BOUND, UnitAgreement, assert_units_agree, kaldi_bound
from units.features.extractors import ExtractorOptions
from units.features.frames import MFCC, SSL
from units.features.kaldi import KaldiMFCC
from units.features.sampling import SampleRequest
from units.features.stage import run as extract
from units.kmeans.estimator import KMeans
from units.kmeans.stage import StageOptions
from units.kmeans.stage import run as fit_kmeans
from units.labels import fairseq as fairseq_export
from units.labels import stage as label_stage
from units.labels.model import KMeansModel, dedup, label_layout
from units.labels.stage import run as label
from units.stage import ShardActor, rows_by_shard

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def root(tmp_path_factory, request, ray_local):
    """The session's MFCC root (tests/mfcc_root.py), a copy of its own: 10 utterances of
    0.5-2 s in 3 audio shards of 4, 4 and 2, k-means km8 and km8pca; nothing labelled."""
    return Path(build_mfcc_root(tmp_path_factory, request))


@pytest.fixture(scope="module")
def alone(root) -> dict[str, dict]:
    """km8 and km8pca, each labelled by a pass of its own into the label set of its name, once
    for the module: each pass's result, for the test of a fresh pass, and the files a
    one-pass, resumed or refused run must equal or leave alone."""
    return {kmeans: label(str(root), kmeans, kmeans) for kmeans in ("km8", "km8pca")}


@pytest.fixture(scope="module")
def exported(root) -> None:
    """The label sets the export and reader tests read, in one pass: km8's into ``fs``,
    ``stream`` and ``hf``, km8pca's into ``checks`` (the files passes of their own write, as
    test_several_kmeans_in_one_pass_write_the_files_separate_passes_write checks)."""
    names = ["fs", "stream", "hf", "checks"]
    label_stage.run_many(str(root), ["km8", "km8", "km8", "km8pca"], names)


@pytest.mark.parametrize("kmeans", ["km8", "km8pca"])
def test_every_utterance_gets_the_units_of_its_exact_features(root, alone, kmeans):
    meta = alone[kmeans]  # The result of the pass that labelled it, on a fresh label set.
    manifest = pq.read_table(root / "manifest" / "utterances.parquet").to_pylist()
    assert meta["utterances"] == len(manifest) == 10 and meta["rejects"] == 0
    assert meta["kmeans"] == kmeans and meta["spec"]["extractor"] == "mfcc"
    rate = meta["throughput"]  # This run's accounting: all of the audio, read once.
    assert rate["hours_labelled"] == pytest.approx(sum(u["duration"] for u in manifest) / 3600)
    assert rate["bytes_read"] == sum(u["size"] for u in manifest) and rate["bytes_written"] > 0
    assert rate["audio_hours_per_second_per_worker"] * rate["workers"] == pytest.approx(
        rate["audio_hours_per_second"]
    )
    table = ds.dataset(str(root / "labels" / kmeans / "units"), format="parquet").to_table()
    labels = {r["key"]: r for r in table.to_pylist()}
    assert len(labels) == table.num_rows  # Once each.
    assert set(labels) == {u["key"] for u in manifest}
    model = KMeansModel.load(str(root), kmeans)
    index, mfcc = shards.Index(str(root)), KaldiMFCC()
    agreement = UnitAgreement()
    for row in manifest:
        got = labels[row["key"]]
        assert got["frames"] == len(got["units"]) == MFCC.frames(row["num_samples"])
        assert got["frame_rate"] == 100.0
        wav = index.get(row["key"]).waveform
        feats = mfcc([wav])[0]  # Alone, here; the worker batched it with its shard.
        bound = kaldi_bound(wav, mfcc=True)
        agreement.add(assert_units_agree(got["units"], feats, model, bound, row["key"]))
    agreement.check()
    again = label(str(root), kmeans, kmeans)
    assert again["shards_written"] == 0


def test_a_missing_kmeans_or_another_kmeans_under_the_same_name_is_refused(root, alone):
    with pytest.raises(StageError, match="no finished k-means 'nope'"):
        label(str(root), "nope", "x")
    assert not (root / "labels" / "x").exists()
    taken = root / "labels" / "km8"  # Labelled by km8.
    before = {p: p.read_bytes() for p in taken.rglob("*") if p.is_file()}
    with pytest.raises(StageError, match="another k-means"):
        label(str(root), "km8pca", "km8")
    assert {p: p.read_bytes() for p in taken.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("audio", ["shards", "source"])
def test_fairseq_export_lines_read_back_as_their_audio_with_aligned_units(root, exported, audio):
    record = fairseq_export.export(str(root), "fs", {"train": 70, "valid": 30}, seed=1, audio=audio)
    out = root / "labels" / "fs" / "fairseq"
    assert record["label_rate"] == 100.0 and record["k"] == 8 and record["audio"] == audio
    assert sum(record["splits"].values()) == 10
    assert (out / "dict.km.txt").read_text().splitlines() == [f"{i} 1" for i in range(8)]
    index = shards.Index(str(root))
    labels = {
        r["key"]: r["units"]
        for r in ds.dataset(str(root / "labels" / "fs" / "units")).to_table().to_pylist()
    }
    manifest = pq.read_table(root / "manifest" / "utterances.parquet").to_pylist()
    by_member = {(f"{r['shard']}.zip", r["offset"]): r["key"] for r in manifest}
    by_source = {r["source"]: r["key"] for r in manifest}
    seen = []
    for split in ("train", "valid"):
        tsv = (out / f"{split}.tsv").read_text().splitlines()
        km = (out / f"{split}.km").read_text().splitlines()
        audio_root, lines = tsv[0], tsv[1:]
        assert len(lines) == len(km) == record["splits"][split]
        for line, units in zip(lines, km, strict=True):
            name, frames = line.split("\t")
            (wav, rate), member = fairseq_get_audio(audio_root, name)
            if audio == "shards":
                key = by_member[(os.path.basename(member[0]), member[1])]
            else:  # The synthetic corpus is whole 16 kHz mono files: all are sources.
                assert member is None
                key = by_source[os.path.join(audio_root, name)]
            assert rate == 16000 and len(wav) == int(frames)
            np.testing.assert_array_equal(wav, index.get(key).waveform)
            assert [int(u) for u in units.split()] == list(labels[key])
            seen.append(key)
    assert sorted(seen) == sorted(labels)  # Every labelled utterance once, in one split.


def test_the_export_streams_shard_by_shard_and_an_empty_split_leaves_no_file(
    root, exported, monkeypatch
):
    """The export reads one shard's units at a time (never the whole label set: at
    Libri-light scale that is hundreds of GB), and a split that ends up empty fails the export
    with nothing of it published or left behind."""
    out = root / "labels" / "stream" / "fairseq"
    read = []
    real = fairseq_export.storage.read_parquet

    def recording(path, *args, **kwargs):
        read.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(fairseq_export.storage, "read_parquet", recording)
    record = fairseq_export.export(str(root), "stream", {"train": 70, "valid": 30}, seed=1)
    unit_files = [p for p in read if "/labels/stream/units/" in p]
    shards = {
        r["shard"] for r in pq.read_table(root / "manifest" / "utterances.parquet").to_pylist()
    }
    assert sorted(unit_files) == sorted(
        str(root / "labels" / "stream" / "units" / f"{s}.parquet") for s in shards
    )  # One read per shard file, none of the directory as a whole.
    assert sum(record["splits"].values()) == 10
    before = sorted(os.listdir(out))
    with pytest.raises(StageError, match="would be empty"):
        fairseq_export.export(str(root), "stream", {"a": 99.999, "b": 0.001}, seed=1)
    assert sorted(os.listdir(out)) == before  # No a/b files, no temporary files.


def test_splits_are_seeded_and_never_empty():
    rows = [{"key": f"k{i}", "speaker": f"s{i % 3}"} for i in range(30)]
    a = fairseq_export.assign_splits(rows, {"a": 50, "b": 50}, "utterance", 0)
    assert a == fairseq_export.assign_splits(list(rows), {"a": 50, "b": 50}, "utterance", 0)
    by_speaker = fairseq_export.assign_splits(rows, {"a": 60, "b": 40}, "speaker", 3)
    speakers = [{r["speaker"] for r in members} for members in by_speaker.values()]
    assert not speakers[0] & speakers[1]  # A speaker lands in one split only.
    with pytest.raises(StageError, match="would be empty"):
        fairseq_export.assign_splits(rows[:2], {"a": 99.9, "b": 0.1}, "utterance", 0)
    with pytest.raises(StageError, match="add up to 100"):
        fairseq_export.assign_splits(rows, {"a": 50}, "utterance", 0)


def test_a_member_that_fails_to_decode_is_a_reject_and_the_pass_goes_on(root, tmp_path):
    import shutil

    copy = tmp_path / "root"
    for sub in ("manifest", "shards", "kmeans"):
        shutil.copytree(root / sub, copy / sub)
    victim = pq.read_table(copy / "manifest" / "utterances.parquet").to_pylist()[3]
    tar = copy / "shards" / f"{victim['shard']}.tar"
    data = bytearray(tar.read_bytes())
    data[victim["offset"] : victim["offset"] + victim["size"]] = bytes(victim["size"])
    tar.write_bytes(bytes(data))
    meta = label(str(copy), "km8", "bad")
    assert meta["rejects"] == 1 and meta["utterances"] == 9
    rejects = ds.dataset(str(copy / "labels" / "bad" / "rejects")).to_table().to_pylist()
    assert [(r["key"], r["reason"]) for r in rejects] == [(victim["key"], "corrupt_audio")]
    labelled = ds.dataset(str(copy / "labels" / "bad" / "units")).to_table(columns=["key"])
    assert victim["key"] not in labelled.column("key").to_pylist()


def test_an_actor_decoding_ahead_on_threads_writes_the_same_shards_and_rejects(root, tmp_path):
    """A GPU actor decodes its members on threads ahead of the batch being computed; the
    label shards and the reject are the bytes an actor decoding inline writes. In this
    process, on CPU, with a corrupt member in the first shard."""
    import shutil

    copy = tmp_path / "root"
    for sub in ("manifest", "shards", "kmeans"):
        shutil.copytree(root / sub, copy / sub)
    manifest = pq.read_table(copy / "manifest" / "utterances.parquet")
    victim = manifest.to_pylist()[1]
    tar = copy / "shards" / f"{victim['shard']}.tar"
    data = bytearray(tar.read_bytes())
    data[victim["offset"] : victim["offset"] + victim["size"]] = bytes(victim["size"])
    tar.write_bytes(bytes(data))
    written = {}
    for threads in (0, 3):
        layout = label_layout(str(copy), f"threads{threads}")
        layout.make_dirs()
        actor = ShardActor(layout, label_stage.LabelWorker, (str(copy), "km8"), {}, "cpu", threads)
        for name, rows in rows_by_shard(manifest).items():
            assert actor.process_shard(name, rows)["written"]
        top = layout.path("")
        written[threads] = {
            os.path.relpath(os.path.join(d, f), top): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(top) for f in files if "commit" not in d
        }  # fmt: skip
    assert written[3] == written[0]
    rejects = ds.dataset(str(copy / "labels" / "threads3" / "rejects")).to_table().to_pylist()
    assert [(r["key"], r["reason"]) for r in rejects] == [(victim["key"], "corrupt_audio")]


def test_dedup_gives_runs_and_durations_that_repeat_back_to_the_units():
    values, durations = dedup(np.array([3, 3, 3, 7, 1, 1, 3], np.uint16))
    assert values.tolist() == [3, 7, 1, 3] and durations.tolist() == [3, 1, 2, 1]
    assert values.dtype == np.uint16 and durations.dtype == np.int32
    empty = dedup(np.array([], np.uint16))
    assert len(empty[0]) == len(empty[1]) == 0


@pytest.fixture(scope="module")
def gslm(root) -> dict:
    """km8 labelled with the dedup column, ``gslm``, once for the module: the pass's result."""
    return label(str(root), "km8", "gslm", dedup=True)


def test_dedup_column_and_lineage_in_meta(root, gslm):
    meta = gslm
    assert meta["dedup"] is True and meta["version"] not in ("", None)
    assert meta["manifest_sha256"] and meta["kmeans_fingerprint"]
    assert meta["features"] == "mfcc" and meta["layer"] is None
    rows = ds.dataset(str(root / "labels" / "gslm" / "units")).to_table().to_pylist()
    assert len(rows) == 10
    for row in rows:
        np.testing.assert_array_equal(np.repeat(row["dedup_units"], row["durations"]), row["units"])
        assert np.all(np.diff(np.asarray(row["dedup_units"], np.int64)) != 0)


def test_a_label_shard_is_streamed_in_fixed_row_groups_with_the_same_rows(root, gslm, monkeypatch):
    """A worker writes its units a row group at a time (its memory does not grow with the
    shard); the rows are those of the shard written whole (by the pass, ``gslm``). The worker
    runs in this process here, with row groups of 3 utterances."""
    monkeypatch.setattr(label_stage, "UNITS_ROW_GROUP", 3)
    layout = label_layout(str(root), "grouped")
    layout.make_dirs()
    worker = ShardActor(layout, label_stage.LabelWorker, (str(root), "km8"), {"dedup": True}, "cpu")
    manifest = pq.read_table(root / "manifest" / "utterances.parquet")
    groups = []
    for name, rows in rows_by_shard(manifest).items():
        assert worker.process_shard(name, rows)["written"]
        grouped = pq.ParquetFile(layout.shard_path("units", name))
        whole = pq.ParquetFile(root / "labels" / "gslm" / "units" / f"{name}.parquet")
        assert grouped.read().equals(whole.read())
        assert grouped.metadata.num_row_groups == -(-grouped.metadata.num_rows // 3)
        assert whole.metadata.num_row_groups == 1
        groups.append(grouped.metadata.num_row_groups)
    assert groups == [2, 2, 1]  # Shards of 4, 4 and 2 utterances.


def test_hugging_face_datasets_and_pyarrow_read_the_labels_and_join_the_manifest(
    root, exported, tmp_path, monkeypatch
):
    import datasets
    import pyarrow.compute as pc

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    units_dir = root / "labels" / "hf" / "units"
    (units_dir / ".000000.parquet.tmp-left-by-a-kill").write_bytes(b"not parquet")
    hf = datasets.load_dataset(
        "parquet", data_dir=str(units_dir), split="train", cache_dir=str(tmp_path / "cache")
    )
    expected = ds.dataset(str(units_dir), format="parquet").to_table()
    assert hf.num_rows == expected.num_rows == 10
    assert sorted(hf["key"]) == sorted(expected.column("key").to_pylist())
    by_key = {r["key"]: r for r in expected.to_pylist()}
    for row in hf:
        assert row["units"] == by_key[row["key"]]["units"]
        assert row["frames"] == len(row["units"])
    manifest = ds.dataset(str(root / "manifest" / "utterances.parquet")).to_table()
    # Acero joins carry no list columns: the units come back by key after the join.
    joined = expected.select(["key", "frames"]).join(manifest, keys="key", join_type="inner")
    assert joined.num_rows == 10
    want = pc.cast(
        pc.add(pc.floor(pc.divide(pc.subtract(joined["num_samples"], 400), 160)), 1), pa.int32()
    )
    assert joined["frames"].to_pylist() == want.to_pylist()


def test_the_export_passes_fairseqs_label_checks(root, exported):
    record = fairseq_export.export(str(root), "checks", {"train": 60, "valid": 20, "test": 20})
    out = root / "labels" / "checks" / "fairseq"
    total = 0
    for split in record["splits"]:
        total += fairseq_label_checks(
            out / f"{split}.tsv", out / f"{split}.km", out / "dict.km.txt", record["label_rate"]
        )
    assert total == 10
    # And the checks do catch a label rate that is off by two (fairseq#5097).
    with pytest.raises(AssertionError, match="durations differ"):
        fairseq_label_checks(out / "train.tsv", out / "train.km", out / "dict.km.txt", 50.0)


def test_resume_after_lost_shards_equals_the_uninterrupted_run(root, alone):
    whole = root / "labels" / "km8"  # The uninterrupted pass's.
    reference = {p.name: p.read_bytes() for p in (whole / "units").iterdir()}
    assert len(reference) >= 2
    import shutil

    shutil.copytree(whole, root / "labels" / "cut")
    cut = root / "labels" / "cut"
    # A kill after a shard's Parquet was written but before its commit, and another
    # before anything: the first shard's Parquet stays without a commit, a temp is left.
    first, second = sorted(reference)[:2]
    (cut / "commits" / first.replace(".parquet", ".json")).unlink()
    (cut / "commits" / second.replace(".parquet", ".json")).unlink()
    (cut / "units" / second).rename(cut / "units" / f".{second}.tmp-1234")
    (cut / "meta.json").unlink()
    meta = label(str(root), "km8", "cut")
    assert meta["shards_written"] == 2
    got = {p.name: p.read_bytes() for p in (cut / "units").iterdir()}
    assert got == reference  # Same files, byte for byte; no temp left behind.


def test_several_kmeans_in_one_pass_write_the_files_separate_passes_write(root, alone):
    """One extractor, features once per batch, a label set per k-means: each equal, byte
    for byte, to its own pass's."""
    results = label_stage.run_many(str(root), ["km8", "km8pca"], ["both8", "both8pca"])
    assert [r["kmeans"] for r in results] == ["km8", "km8pca"]
    for kmeans, name in (("km8", "both8"), ("km8pca", "both8pca")):
        own = root / "labels" / kmeans  # The files of a pass of its own.
        together = root / "labels" / name
        for part in ("units", "rejects", "commits"):
            files = sorted(p.name for p in (own / part).iterdir())
            assert files and files == sorted(p.name for p in (together / part).iterdir())
            for f in files:
                assert (together / part / f).read_bytes() == (own / part / f).read_bytes()
        meta = json.loads((together / "meta.json").read_text())
        assert meta["kmeans"] == kmeans and meta["utterances"] == 10


def test_a_shard_committed_by_some_targets_only_is_written_for_the_rest(root):
    label_stage.run_many(str(root), ["km8", "km8pca"], ["part8", "part8pca"])
    first = root / "labels" / "part8"
    shard = sorted(p.stem for p in (first / "commits").iterdir())[0]
    kept = {p: p.stat().st_mtime_ns for p in (root / "labels" / "part8pca").rglob("*.parquet")}
    reference = (first / "units" / f"{shard}.parquet").read_bytes()
    # Killed between the two commits of one shard: part8pca has it, part8 does not.
    (first / "commits" / f"{shard}.json").unlink()
    (first / "units" / f"{shard}.parquet").unlink()
    (first / "meta.json").unlink()
    again = label_stage.run_many(str(root), ["km8", "km8pca"], ["part8", "part8pca"])
    assert [r["shards_written"] for r in again] == [1, 1]  # The pass wrote one shard.
    assert (first / "units" / f"{shard}.parquet").read_bytes() == reference
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # The other set was left alone.
    assert json.loads((first / "meta.json").read_text())["utterances"] == 10
    done = label_stage.run_many(str(root), ["km8", "km8pca"], ["part8", "part8pca"])
    assert [r["shards_written"] for r in done] == [0, 0]


def test_targets_of_other_features_or_names_not_one_per_target_are_refused(root, hubert):
    with pytest.raises(StageError, match="'km8' and 'h4' read features of different extractors"):
        label_stage.run_many(str(root), ["km8", "h4"], ["x8", "xh4"])
    with pytest.raises(StageError, match="one distinct label set name per target"):
        label_stage.run_many(str(root), ["km8", "km8pca"], ["same", "same"])
    assert not (root / "labels" / "x8").exists() and not (root / "labels" / "same").exists()


@pytest.fixture(scope="module")
def hubert(root, tmp_path_factory):
    """A tiny random HuBERT saved locally, its layer-2 features and a k=4 k-means on them."""
    directory = save_tiny(tmp_path_factory.mktemp("hubert"))
    options = ExtractorOptions(f"hf:{directory}", layer=2)
    extract(str(root), "hubert2", options, SampleRequest(percent=50, seed=0))
    fit_kmeans(str(root), "hubert2", "h4", KMeans(4, seed=0, block_rows=256), StageOptions())
    return directory


@pytest.fixture(scope="module")
def h4(root, hubert) -> dict:
    """h4 labelled by a pass of its own into label set ``h4``, once for the module: the
    pass's result, and the files a one-pass or moved-extractor run must equal."""
    return label(str(root), "h4", "h4")


@pytest.mark.parametrize("pca", [None, 3])
def test_units_searched_beside_the_features_on_their_device_agree(root, hubert, pca):
    """The GPU label path (features left on the device, centroid search there, units back)
    run on CPU tensors: the units of the exact features, up to float32 near ties."""
    name = "h4" if pca is None else "h4pca"
    if pca is not None:
        fit_kmeans(
            str(root), "hubert2", name, KMeans(4, seed=0, block_rows=256), StageOptions(pca=pca)
        )
    labeller = label_stage.Labeller(str(root), name)
    manifest = pq.read_table(root / "manifest" / "utterances.parquet").to_pylist()
    index = shards.Index(str(root))
    batch = [(row, index.get(row["key"]).waveform) for row in manifest]
    on_device = labeller.units_on_device(batch)
    assert all(u.dtype == np.uint16 for u in on_device)
    agreement = UnitAgreement()
    for (row, wav), units in zip(batch, on_device, strict=True):
        feats = labeller.extractor([wav])[0]
        agreement.add(
            assert_units_agree(units, feats, labeller.model, SSL_FEATURE_BOUND, row["key"])
        )
    agreement.check()
    assert labeller.units(batch)[0].dtype == np.uint16  # On CPU: the NumPy path.


def test_several_layers_of_one_model_label_in_one_forward_pass_as_they_would_alone(
    root, hubert, h4
):
    options = ExtractorOptions(f"hf:{hubert}", layer=1)
    extract(str(root), "hubert1", options, SampleRequest(percent=50, seed=0))
    fit_kmeans(str(root), "hubert1", "h1k4", KMeans(4, seed=0, block_rows=256), StageOptions())
    results = label_stage.run_many(str(root), ["h4", "h1k4"], ["two-2", "two-1"])
    assert [r["layer"] for r in results] == [2, 1]
    label(str(root), "h1k4", "h1k4")  # h4 was labelled alone by its fixture.
    for kmeans, name in (("h4", "two-2"), ("h1k4", "two-1")):
        alone, together = (root / "labels" / n / "units" for n in (kmeans, name))
        files = sorted(p.name for p in alone.iterdir())
        assert files and files == sorted(p.name for p in together.iterdir())
        for f in files:
            assert (together / f).read_bytes() == (alone / f).read_bytes(), (kmeans, f)


def test_ssl_labels_follow_the_50hz_contract_on_odd_lengths(root, hubert, h4):
    from units.features.ssl import SSLExtractor, load_hf

    meta = h4
    assert meta["frame_rate"] == 50.0 and meta["layer"] == 2 and meta["checkpoint_sha256"]
    manifest = pq.read_table(root / "manifest" / "utterances.parquet").to_pylist()
    assert any(r["num_samples"] % 2 for r in manifest)  # Odd lengths are in the corpus,
    assert any(r["num_samples"] % 320 for r in manifest)  # and lengths off the hop.
    labels = {
        r["key"]: r
        for r in ds.dataset(str(root / "labels" / "h4" / "units")).to_table().to_pylist()
    }
    model, direct = KMeansModel.load(str(root), "h4"), SSLExtractor(load_hf(hubert), 2)
    index = shards.Index(str(root))
    agreement = UnitAgreement()
    for row in manifest:
        got = labels[row["key"]]
        assert got["frames"] == len(got["units"]) == SSL.frames(row["num_samples"])
        feats = direct([index.get(row["key"]).waveform])[0]
        agreement.add(assert_units_agree(got["units"], feats, model, SSL_FEATURE_BOUND, row["key"]))
    agreement.check()


def test_an_extractor_with_other_features_is_refused_and_a_moved_one_is_not(
    root, hubert, h4, tmp_path
):
    import shutil

    with pytest.raises(StageError, match=r"layer: k-means 2, extractor 3"):
        label(str(root), "h4", "other", extractor=ExtractorOptions(f"hf:{hubert}", layer=3))
    with pytest.raises(StageError, match=r"extractor: k-means 'mfcc', extractor 'fbank'"):
        label(str(root), "km8", "other", extractor=ExtractorOptions("fbank"))
    assert not (root / "labels" / "other").exists()
    moved = tmp_path / "moved"
    shutil.copytree(hubert, moved)
    label(str(root), "h4", "moved", extractor=ExtractorOptions(f"hf:{moved}", layer=2))
    a, b = (
        ds.dataset(str(root / "labels" / n / "units")).to_table().sort_by("key")
        for n in ("h4", "moved")
    )
    assert a.column("units").equals(b.column("units"))


def test_the_driver_checks_the_recorded_spec_without_building_an_extractor(
    root, hubert, h4, monkeypatch
):
    from units.features import extractors

    def refuse(options):
        raise AssertionError("the driver built an extractor")

    # The workers are other processes: only the driver's build is refused.
    monkeypatch.setattr(extractors, "build", refuse)
    with pytest.raises(StageError, match=r"layer: k-means 2, extractor 3"):
        label(str(root), "h4", "refused", extractor=ExtractorOptions(f"hf:{hubert}", layer=3))
    with pytest.raises(StageError, match=r"its features cannot be rebuilt: .*does not exist"):
        label(str(root), "h4", "gone", extractor=ExtractorOptions("hf:/no/such/model", layer=2))
    meta = label(str(root), "h4", "rebuilt")  # From the recorded spec's own fields.
    assert meta["spec"] == KMeansModel.load(str(root), "h4").spec.to_json()
    assert label(str(root), "h4", "h4")["shards_written"] == 0  # Labelled by the fixture.
    a, b = (
        ds.dataset(str(root / "labels" / n / "units")).to_table().sort_by("key")
        for n in ("h4", "rebuilt")
    )
    assert a.column("units").equals(b.column("units"))


def test_only_a_whole_16khz_mono_absolute_source_of_its_own_is_exported_as_a_source(tmp_path):
    rows = [  # source, start, original_sample_rate, original_channels, expected
        ("/a.flac", 0, 16000, 1, True),
        ("/b.flac", 0, 16000, 1, False),  # Two utterances of one file (segments, or listed
        ("/b.flac", 0, 16000, 1, False),  # twice under two keys): neither is the whole file.
        ("/c.flac", 800, 16000, 1, False),  # A segment that starts later.
        ("/d.flac", 0, 8000, 1, False),  # Resampled from 8 kHz.
        ("/e.flac", 0, 16000, 2, False),  # Downmixed.
        ("e.flac", 0, 16000, 1, False),  # Relative: fairseq joins it with the tsv's root.
        ("/f.flac", 0, None, 1, False),  # Unknown original rate.
    ]
    path = tmp_path / "utterances.parquet"
    names = ["source", "start", "original_sample_rate", "original_channels"]
    pq.write_table(pa.table({n: [r[i] for r in rows] for i, n in enumerate(names)}), path)
    assert fairseq_export._whole_sources(str(path)).tolist() == [r[-1] for r in rows]
