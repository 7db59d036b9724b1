"""The shard stage end to end on in-process Ray: layouts, segmentation, accounting, reruns."""

from __future__ import annotations

import filecmp
import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import webdataset as wds

import shards
from shards import synthetic
from shards.plan import ShardingOptions
from shards.ray_sharding import PROBE_BATCH, UsageError, probe_batch, run
from tests.conftest import tone
from tests.corpora import write_bad_corpus, write_vad_corpus

pytestmark = pytest.mark.usefixtures("ray_local")


def _manifest(root, name):
    return pq.read_table(os.path.join(root, "manifest", f"{name}.parquet")).to_pylist()


def _tree_files(root):
    out = []
    for d, _, files in os.walk(root):
        out.extend(os.path.relpath(os.path.join(d, f), root) for f in files)
    return sorted(out)


@pytest.fixture(scope="module")
def librispeech(tmp_path_factory):
    root = tmp_path_factory.mktemp("librispeech")
    keys = synthetic.write_librispeech(str(root), speakers=2, chapters=2, utterances=3)
    return root, keys


@pytest.fixture(scope="module")
def librilight(tmp_path_factory):
    root = tmp_path_factory.mktemp("librilight")
    synthetic.write_librilight(str(root), speakers=2, books=1, files=2, seconds=(20, 35))
    return root


def test_librispeech_is_passed_through_byte_for_byte_with_a_complete_manifest(
    librispeech, tmp_path
):
    src, keys = librispeech
    summary = run([str(src)], str(tmp_path), ShardingOptions(max_samples=5))
    assert summary["layout"] == "librispeech"
    assert (summary["files"], summary["segments"], summary["rejects"]) == (12, 12, 0)
    assert summary["shards"] == 3 and summary["speakers"] == 2
    utts = _manifest(tmp_path, "utterances")
    assert sorted(u["key"] for u in utts) == sorted(keys)
    assert all(u["passthrough"] for u in utts)
    for u in utts:
        tar = (tmp_path / "shards" / f"{u['shard']}.tar").read_bytes()
        assert tar[u["offset"] : u["offset"] + u["size"]] == open(u["source"], "rb").read()
        assert u["num_samples"] == sf.info(u["source"]).frames
    shard_rows = _manifest(tmp_path, "shards")
    assert [s["name"] for s in shard_rows] == ["000000", "000001", "000002"]
    assert sum(s["samples"] for s in shard_rows) == 12
    sample = shards.get(str(tmp_path), keys[0])
    assert sample.meta["text"].startswith("WORDS OF UTTERANCE 0")
    assert sample.meta["speaker"] == keys[0].split("-")[0]
    # This run's throughput: every hour and byte it read and wrote, over its 2 workers.
    speed = summary["throughput"]
    assert speed["hours_written"] == pytest.approx(sum(u["duration"] for u in utts) / 3600)
    assert speed["bytes_written"] == sum(
        os.path.getsize(tmp_path / "shards" / f) for f in os.listdir(tmp_path / "shards")
    )
    assert speed["bytes_read"] == sum(os.path.getsize(u["source"]) for u in utts)
    assert speed["workers"] == 2 and speed["audio_hours_per_second"] == pytest.approx(
        speed["hours_written"] / speed["wall_seconds"]
    )
    assert speed["audio_hours_per_second_per_worker"] == speed["audio_hours_per_second"] / 2


def test_reading_back_with_open_get_index_and_plain_webdataset_agree(librispeech, tmp_path):
    src, _ = librispeech
    run([str(src)], str(tmp_path), ShardingOptions(max_samples=4, seed=7))
    opened = {s.key: s for s in shards.open(str(tmp_path))}
    order = [u["key"] for u in _manifest(tmp_path, "utterances")]
    assert list(opened) == order  # shards.open yields in shard order, as the manifest lists.
    index = shards.Index(str(tmp_path))
    urls = sorted(str(p) for p in (tmp_path / "shards").glob("*.tar"))
    plain = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in plain] == order
    for s in plain:
        key = s["__key__"]
        wav, rate = sf.read(io.BytesIO(s["flac"]), dtype="float32")
        got = shards.get(str(tmp_path), key)
        assert rate == opened[key].sample_rate == got.sample_rate == 16000
        np.testing.assert_array_equal(wav, opened[key].waveform)
        np.testing.assert_array_equal(wav, got.waveform)
        np.testing.assert_array_equal(wav, index.get(key).waveform)
        assert json.loads(s["json"]) == opened[key].meta == got.meta
    with pytest.raises(KeyError):
        shards.get(str(tmp_path), "no-such-key")


def test_librilight_vad_segments_follow_the_sidecar_and_stitch_voiced_audio(librilight, tmp_path):
    summary = run(
        [str(librilight)], str(tmp_path), ShardingOptions(segment="vad", target_seconds=8)
    )
    assert summary["layout"] == "librilight" and summary["rejects"] == 0
    samples = list(shards.open(str(tmp_path)))
    assert summary["segments"] == len(samples) > summary["files"]
    by_source: dict[str, list] = {}
    for s in samples:
        by_source.setdefault(s.meta["source"], []).append(s)
    for source, segs in by_source.items():
        sidecar = json.load(open(source[: -len(".flac")] + ".json"))
        original, _ = sf.read(source, dtype="float32")
        intervals = [tuple(i) for s in segs for i in s.meta["segment"]["intervals"]]
        assert intervals == [tuple(v) for v in sidecar["voice_activity"]]  # All voiced audio kept.
        for i, s in enumerate(segs):
            assert s.key.endswith(f"_{i:04d}") and s.meta["segment"]["vad"] == "sidecar"
            voiced = sum(b - a for a, b in s.meta["segment"]["intervals"])
            n_intervals = len(s.meta["segment"]["intervals"])
            assert voiced <= 8 or n_intervals == 1  # Greedy up to the target, never cut inside.
            expected = np.concatenate(
                [
                    original[int(a * 16000) : int(b * 16000)]
                    for a, b in s.meta["segment"]["intervals"]
                ]
            )
            np.testing.assert_allclose(s.waveform, expected, atol=1 / 32768)


@pytest.mark.parametrize("detector", ["energy", "webrtc"])
def test_files_without_sidecars_are_segmented_by_the_detector(librilight, tmp_path, detector):
    bare = tmp_path / "bare"
    for flac in librilight.rglob("*.flac"):  # The audio without its sidecars.
        target = bare / flac.relative_to(librilight)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(flac.read_bytes())
    summary = run(
        [str(bare)],
        str(tmp_path / "root"),
        ShardingOptions(segment="vad", vad=detector, target_seconds=8),
    )
    samples = list(shards.open(str(tmp_path / "root")))
    assert len(samples) == summary["segments"] > 4
    assert {s.meta["segment"]["vad"] for s in samples} == {detector}
    assert all(s.waveform.size >= 400 for s in samples)


def test_list_inputs_and_several_inputs_in_one_run(librispeech, tmp_path):
    src, keys = librispeech
    audio = tmp_path / "extra"
    audio.mkdir()
    sf.write(audio / "x.wav", tone(0.5, 16000), 16000)
    tsv = tmp_path / "extra.tsv"
    tsv.write_text(f"{audio}\nx.wav\t8000\n")
    summary = run([str(src), str(tsv)], str(tmp_path / "root"), ShardingOptions())
    assert summary["segments"] == len(keys) + 1
    assert "x" in shards.Index(str(tmp_path / "root"))


def test_transcoding_resamples_downmixes_and_records_the_original_format(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    sf.write(src / "stereo48.wav", tone(1.0, 48000, freq=300, channels=2), 48000)
    sf.write(src / "mono8.flac", tone(1.0, 8000, freq=300), 8000)
    run([str(src)], str(tmp_path / "root"), ShardingOptions())
    got = {s.key: s for s in shards.open(str(tmp_path / "root"))}
    assert got["stereo48"].meta["original_sample_rate"] == 48000
    assert got["stereo48"].meta["original_channels"] == 2
    assert got["stereo48"].meta["original_format"] == "WAV/PCM_16"
    assert got["stereo48"].waveform.size == 16000 and got["mono8"].waveform.size == 16000
    for s in got.values():
        spectrum = np.abs(np.fft.rfft(s.waveform))
        assert abs(np.argmax(spectrum) - 300) <= 1  # 1 s at 16 kHz: bin k is k Hz.
        assert s.meta["passthrough"] is False


def test_every_bad_input_is_accounted_for_with_its_reason(tmp_path):
    expected = write_bad_corpus(str(tmp_path / "bad"))
    summary = run([str(tmp_path / "bad")], str(tmp_path / "root"), ShardingOptions())
    utts = _manifest(tmp_path / "root", "utterances")
    rejects = _manifest(tmp_path / "root", "rejects")
    taken = {os.path.basename(u["source"]) for u in utts}
    rejected = {os.path.basename(r["source"]): r["reason"] for r in rejects}
    assert len(rejects) == len(rejected)  # One reject row per rejected input.
    assert taken.isdisjoint(rejected)
    assert taken | set(rejected) == set(expected)  # Nothing lost, nothing invented.
    for name, reason in expected.items():
        assert rejected.get(name) == reason, name
    assert summary["files"] == len(expected)
    assert summary["rejects_by_reason"]["non_finite"] == 2
    assert all(r["message"] for r in rejects)
    keys = {u["key"] for u in utts}
    assert {"spaces_and_dots_v2", "ünïcödé_名前", "dup_key"} <= keys
    dup = next(r for r in rejects if r["reason"] == "duplicate_key")
    assert "dup key.wav" in dup["message"]
    eight = next(u for u in utts if u["key"] == "eight_channels")
    assert eight["original_channels"] == 8
    plain = {
        s["__key__"]
        for s in wds.WebDataset(
            sorted(str(p) for p in (tmp_path / "root" / "shards").glob("*.tar")), shardshuffle=False
        )
    }
    assert plain == keys


def test_verify_decodes_pass_through_files_and_rejects_corrupt_ones(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    sf.write(src / "good.flac", tone(2.0, 16000), 16000)
    sf.write(src / "bad.flac", tone(2.0, 16000, seed=3), 16000)
    data = bytearray((src / "bad.flac").read_bytes())
    data[len(data) // 2 : len(data) // 2 + 300] = bytes(300)
    (src / "bad.flac").write_bytes(bytes(data))
    fast = run([str(src)], str(tmp_path / "fast"), ShardingOptions())
    assert fast["segments"] == 2  # Header and last frame are fine: copied unchecked.
    checked = run([str(src)], str(tmp_path / "checked"), ShardingOptions(verify=True))
    assert checked["segments"] == 1 and checked["rejects_by_reason"] == {"corrupt": 1}


def test_sidecar_intervals_outside_the_file_are_clipped_or_rejected_as_no_speech(tmp_path):
    write_vad_corpus(str(tmp_path / "in"))
    summary = run(
        [str(tmp_path / "in")],
        str(tmp_path / "root"),
        ShardingOptions(layout="dir", segment="vad", target_seconds=30),
    )
    samples = {s.key: s for s in shards.open(str(tmp_path / "root"))}
    late = samples["late_0000"].meta["segment"]
    assert late["intervals"] == [[0.5, 1.5], [2.5, 3.0]]
    assert (late["clipped_intervals"], late["dropped_intervals"]) == (1, 1)
    assert samples["late_0000"].waveform.size == 16000 + 8000
    assert summary["rejects_by_reason"] == {"no_speech": 1}


def test_reruns_are_byte_identical_and_a_finished_job_does_no_work(
    librispeech, librilight, tmp_path
):
    src, _ = librispeech
    opts = ShardingOptions(max_samples=3, seed=11)
    inputs = [str(src), str(librilight)]
    first = run(inputs, str(tmp_path / "a"), opts)
    run(inputs, str(tmp_path / "b"), opts)
    files = _tree_files(tmp_path / "a")
    assert files == _tree_files(tmp_path / "b")
    for f in files:
        if f != "manifest/summary.json":
            assert filecmp.cmp(tmp_path / "a" / f, tmp_path / "b" / f, shallow=False), f
    summaries = [json.load(open(tmp_path / r / "manifest" / "summary.json")) for r in "ab"]
    for s in summaries:
        del s["throughput"]  # Wall time is the one thing that may differ.
    assert summaries[0] == summaries[1]
    before = {f: os.stat(tmp_path / "a" / f).st_mtime_ns for f in files}
    again = run(inputs, str(tmp_path / "a"), opts)
    assert (again["shards_written"], again["shards_skipped"]) == (0, first["shards"])
    assert {f: os.stat(tmp_path / "a" / f).st_mtime_ns for f in files} == before


def test_a_lost_shard_is_rewritten_alone_and_identically(librispeech, tmp_path):
    src, _ = librispeech
    opts = ShardingOptions(max_samples=3)
    run([str(src)], str(tmp_path), opts)
    tar = tmp_path / "shards" / "000002.tar"
    original = tar.read_bytes()
    other = os.stat(tmp_path / "shards" / "000001.tar").st_mtime_ns
    tar.unlink()  # As if the writer had died before its commit.
    (tmp_path / "manifest" / "parts" / "000002.commit.json").unlink()
    again = run([str(src)], str(tmp_path), opts)
    assert (again["shards_written"], again["shards_skipped"]) == (1, 3)
    assert tar.read_bytes() == original
    assert os.stat(tmp_path / "shards" / "000001.tar").st_mtime_ns == other


def test_a_root_planned_with_other_options_is_refused(librispeech, tmp_path):
    src, _ = librispeech
    run([str(src)], str(tmp_path), ShardingOptions())
    with pytest.raises(UsageError, match="already holds a plan"):
        run([str(src)], str(tmp_path), ShardingOptions(segment="vad"))


def test_seeded_shuffle_changes_the_order_deterministically(librispeech, tmp_path):
    src, keys = librispeech
    run([str(src)], str(tmp_path / "sorted"), ShardingOptions())
    run([str(src)], str(tmp_path / "shuffled"), ShardingOptions(seed=1))
    in_order = [u["key"] for u in _manifest(tmp_path / "sorted", "utterances")]
    shuffled = [u["key"] for u in _manifest(tmp_path / "shuffled", "utterances")]
    assert in_order == sorted(keys) and shuffled != in_order and sorted(shuffled) == in_order


def test_an_input_without_audio_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="found no audio"):
        run([str(tmp_path / "empty")], str(tmp_path / "root"))


@pytest.mark.parametrize(
    "inputs,root,opts,message",
    [
        (["/nonexistent/corpus"], "out", ShardingOptions(), "does not exist"),
        (["IN"], "IN/inside", ShardingOptions(), "inside input"),
        (["IN"], "out", ShardingOptions(layout="timit"), "unknown layout"),
        (["IN"], "out", ShardingOptions(segment="words"), "unknown segmentation"),
    ],
)
def test_bad_arguments_fail_before_any_work(librispeech, tmp_path, inputs, root, opts, message):
    src, _ = librispeech
    inputs = [str(src) if i == "IN" else i for i in inputs]
    root = str(src / "inside") if root.startswith("IN") else str(tmp_path / root)
    with pytest.raises(UsageError, match=message):
        run(inputs, root, opts)
    assert not os.path.exists(root)


@pytest.mark.slow
def test_a_multi_hour_recording_is_stored_whole_and_split_by_vad(tmp_path):
    """Two hours at 8 kHz go through the stage in blocks (see test_audio for the memory bound)."""
    src = tmp_path / "in"
    src.mkdir()
    minute, _ = synthetic.speechlike(60.0, rate=8000, seed=9)
    with sf.SoundFile(src / "long.flac", "w", 8000, 1, "PCM_16", format="FLAC") as f:
        for _ in range(120):
            f.write(minute)
    whole = run([str(src)], str(tmp_path / "whole"), ShardingOptions())
    [row] = _manifest(tmp_path / "whole", "utterances")
    assert row["num_samples"] == whole["segments"] * 2 * 3600 * 16000
    tar = (tmp_path / "whole" / "shards" / f"{row['shard']}.tar").read_bytes()
    stored = sf.info(io.BytesIO(tar[row["offset"] : row["offset"] + row["size"]]))
    assert (stored.frames, stored.samplerate) == (2 * 3600 * 16000, 16000)
    cut = run([str(src)], str(tmp_path / "cut"), ShardingOptions(segment="vad", vad="energy"))
    durations = [u["duration"] for u in _manifest(tmp_path / "cut", "utterances")]
    assert cut["segments"] == len(durations) > 100
    assert max(durations) < 60  # Voiced stretches are at most 2.5 s: segments stay near 30 s.


@pytest.mark.parametrize(
    ("inputs", "cpus", "tasks"),
    [
        (100, 2, 1),  # Fewer than PROBE_BATCH: one task.
        (2_000, 2, 2),  # A small corpus: one task per CPU.
        (10_000, 16, 16),
        (100_000, 16, 64),  # A large one: four per CPU, so that slow storage evens out.
        (7_000_000, 400, 1_600),
    ],
)
def test_probe_tasks_are_one_per_cpu_on_small_corpora_and_four_per_cpu_on_large(
    inputs, cpus, tasks
):
    per_task = probe_batch(inputs, cpus)
    assert -(-inputs // per_task) == tasks
    assert per_task >= min(inputs, PROBE_BATCH)
