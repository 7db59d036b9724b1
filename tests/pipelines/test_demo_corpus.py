"""The demo corpus: exact phone alignments for speech-like audio, seeded, and phones that
MFCC can tell apart."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import numpy as np
import pytest
import soundfile as sf

from pipelines.demo import corpus as demo_corpus
from pipelines.demo.corpus import (
    CLASSES,
    INVENTORY,
    PHONES,
    Segment,
    frame_phones,
    write_demo_corpus,
)
from shards.discover import discover
from units.features.frames import MFCC, SSL
from units.features.kaldi import KaldiMFCC

SEED = 7
MINUTES = 1.0
SPEAKERS = 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    summary = write_demo_corpus(
        str(root), minutes=MINUTES, speakers=SPEAKERS, chapters_per_speaker=2, seed=SEED
    )
    return root, summary


def _alignments(root) -> dict[str, dict]:
    with open(os.path.join(root, "alignments.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    out = {row["key"]: row for row in rows}
    assert len(out) == len(rows)  # One line per utterance.
    return out


def _phone_labels(root) -> dict[str, list[str]]:
    out = {}
    with open(os.path.join(root, "phones.tsv")) as f:
        for line in f:
            key, phones = line.rstrip("\n").split("\t")  # fairseq's read_phn does the same.
            assert key not in out
            out[key] = phones.split(",")
    return out


def _flac(root, key: str) -> str:
    speaker, chapter, _ = key.split("-")
    return os.path.join(root, speaker, chapter, f"{key}.flac")


def _files(root) -> dict[str, bytes]:
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def _check_corpus(root) -> dict[str, dict]:
    """Every invariant that ties the labels to the audio; returns the alignments."""
    alignments = _alignments(root)
    labels = _phone_labels(root)
    flacs = {
        name[: -len(".flac")]
        for _, _, names in os.walk(root)
        for name in names
        if name.endswith(".flac")
    }
    assert set(alignments) == set(labels) == flacs and flacs
    for key, row in alignments.items():
        info = sf.info(_flac(root, key))
        assert (info.samplerate, info.channels, info.subtype) == (16_000, 1, "PCM_16")
        assert info.frames == row["num_samples"]
        position = 0
        for phone, start, end in row["segments"]:
            assert start == position and end > start, (key, phone, start, end)
            position = end
        assert position == row["num_samples"]
        phones = labels[key]
        assert len(phones) == MFCC.frames(row["num_samples"]) > 0
        for i, phone in enumerate(phones):
            centre = i * MFCC.hop + MFCC.window // 2
            (inside,) = [p for p, a, b in row["segments"] if a <= centre < b]
            assert phone == inside, (key, i)
    return alignments


def test_alignments_match_the_audio_and_labels_match_mfcc_frames(corpus):
    root, summary = corpus
    alignments = _check_corpus(root)
    assert summary["utterances"] == len(alignments)
    assert summary["frames"] == sum(MFCC.frames(a["num_samples"]) for a in alignments.values())
    # The label count is the count of the features they label.
    key = sorted(alignments)[0]
    audio, _ = sf.read(_flac(root, key), dtype="float32")
    assert KaldiMFCC()([audio])[0].shape[0] == len(_phone_labels(root)[key])


def test_the_tree_is_a_librispeech_tree_with_transcripts(corpus):
    root, _ = corpus
    found = discover(str(root))
    assert found.layout == "librispeech" and not found.rejects
    alignments = _alignments(root)
    assert sorted(s.key for s in found.sources) == sorted(alignments)
    for source in found.sources:
        assert re.fullmatch(r"\d+-\d+-\d{4}", source.key)
        assert source.speaker == alignments[source.key]["speaker"]
        assert source.text and source.text == source.text.upper()


def test_frame_phones_takes_the_phone_at_each_frame_centre():
    segments = [Segment("sil", 0, 360), Segment("AA", 360, 520), Segment("S", 520, 1000)]
    # MFCC frames centre on 200, 360, 520, 680 (1000 samples: 4 frames).
    assert frame_phones(segments, 1000) == ["sil", "AA", "S", "S"]
    assert len(frame_phones(segments, 1000)) == MFCC.frames(1000)
    # HuBERT's 50 Hz frames centre on 200, 520.
    assert frame_phones(segments, 1000, SSL.window, SSL.hop) == ["sil", "S"]
    assert frame_phones([("sil", 0, 399)], 399) == []
    with pytest.raises(ValueError, match="gaps or overlaps"):
        frame_phones([("sil", 0, 300), ("AA", 301, 800)], 800)
    with pytest.raises(ValueError, match="end at sample 800"):
        frame_phones([("sil", 0, 800)], 900)


def test_the_same_seed_writes_the_same_bytes_and_another_seed_other_audio(corpus, tmp_path):
    root, summary = corpus
    again = write_demo_corpus(
        str(tmp_path / "again"),
        minutes=MINUTES,
        speakers=SPEAKERS,
        chapters_per_speaker=2,
        seed=SEED,
    )
    assert again == summary
    first, second = _files(root), _files(tmp_path / "again")
    assert first.keys() == second.keys()
    for name in first:
        assert first[name] == second[name], name
    write_demo_corpus(str(tmp_path / "other"), minutes=0.25, speakers=2, seed=SEED + 1)
    audio = {
        hashlib.sha256(data).hexdigest() for name, data in first.items() if name.endswith(".flac")
    }
    other = {
        hashlib.sha256(data).hexdigest()
        for name, data in _files(tmp_path / "other").items()
        if name.endswith(".flac")
    }
    assert other and not audio & other


def test_the_length_asked_for_is_what_is_written(corpus, tmp_path):
    root, summary = corpus
    samples = sum(a["num_samples"] for a in _alignments(root).values())
    assert summary["seconds"] == samples / 16_000
    assert abs(summary["seconds"] - MINUTES * 60) <= 0.1 * MINUTES * 60
    small = write_demo_corpus(str(tmp_path / "small"), minutes=0.2, speakers=1, seed=1)
    assert abs(small["seconds"] - 12.0) <= 1.2
    for row in _alignments(tmp_path / "small").values():
        assert 1.0 <= row["num_samples"] / 16_000 <= 8.5  # Utterances of a few seconds.


def test_every_class_and_nearly_every_phone_occurs(corpus):
    root, summary = corpus
    assert 25 <= len(INVENTORY) <= 35 and {p.kind for p in INVENTORY} == set(CLASSES)
    labels = _phone_labels(root)
    used = {p for phones in labels.values() for p in phones}
    assert {PHONES[p].kind for p in used} == set(CLASSES)
    assert set(summary["classes"]) == set(CLASSES)
    assert len(used) >= len(INVENTORY) - 3  # One minute of speech: the rarest may be missing.
    counts = {p: sum(ph.count(p) for ph in labels.values()) for p in used}
    assert counts == summary["phones"]


def _f0(frame: np.ndarray) -> float:
    """F0 by autocorrelation, searched between 60 and 400 Hz."""
    x = frame - frame.mean()
    r = np.correlate(x, x, "full")[x.size - 1 :]
    low, high = 16_000 // 400, 16_000 // 60
    return 16_000 / (low + int(np.argmax(r[low:high])))


def test_speakers_differ_in_pitch_and_the_audio_has_it(corpus):
    root, summary = corpus
    pitch = {s["name"]: s["pitch_hz"] for s in summary["speakers"]}
    assert len(pitch) == SPEAKERS
    assert all(90 <= p <= 240 for p in pitch.values())
    assert max(pitch.values()) > 1.5 * min(pitch.values())
    estimates: dict[str, list[float]] = {}
    for key, row in _alignments(root).items():
        audio, _ = sf.read(_flac(root, key))
        for phone, start, end in row["segments"]:
            if PHONES[phone].kind == "vowel" and end - start >= 960:
                middle = (start + end) // 2
                estimates.setdefault(row["speaker"], []).append(
                    _f0(audio[middle - 320 : middle + 320])
                )
    assert estimates.keys() == pitch.keys()
    for speaker, values in estimates.items():
        assert np.median(values) == pytest.approx(pitch[speaker], rel=0.1), speaker


def _tokens(root):
    """(speaker, key, phone, mean static MFCC of the segment's middle frames) per segment."""
    mfcc = KaldiMFCC()
    out = []
    for key, row in _alignments(root).items():
        audio, _ = sf.read(_flac(root, key), dtype="float32")
        feats = np.asarray(mfcc([audio])[0])[:, :13]
        centres = np.arange(len(feats)) * MFCC.hop + MFCC.window // 2
        for phone, start, end in row["segments"]:
            (inside,) = np.nonzero((centres >= start) & (centres < end))
            if inside.size >= 4:
                middle = inside[inside.size // 4 : inside.size - inside.size // 4]
                out.append((row["speaker"], key, phone, feats[middle].mean(axis=0)))
    return out


def _split_half_accuracy(tokens, keep) -> tuple[float, int]:
    """Nearest-centroid phone recognition, per speaker: centroids from half the
    utterances, tested on the other half."""
    correct = total = 0
    for speaker in sorted({t[0] for t in tokens}):
        mine = [t for t in tokens if t[0] == speaker and keep(t[2])]
        keys = sorted({t[1] for t in mine})
        train = set(keys[0::2])
        centroids: dict[str, list] = {}
        for _, key, phone, x in mine:
            if key in train:
                centroids.setdefault(phone, []).append(x)
        names = sorted(centroids)
        means = np.stack([np.mean(centroids[n], axis=0) for n in names])
        for _, key, phone, x in mine:
            if key not in train and phone in centroids:
                guess = names[int(np.argmin(((means - x) ** 2).sum(axis=1)))]
                correct += guess == phone
                total += 1
    return correct / max(total, 1), total


def test_phones_are_acoustically_distinct_to_mfcc(corpus):
    root, _ = corpus
    tokens = _tokens(root)
    # The same vowel in other utterances of a speaker is nearer than any other vowel, for
    # most tokens (chance: about 1 in 10; 1 in 33 over all phones).
    vowels, n = _split_half_accuracy(tokens, lambda p: PHONES[p].kind == "vowel")
    assert n >= 40 and vowels >= 0.6
    everything, n = _split_half_accuracy(tokens, lambda p: True)
    assert n >= 100 and everything >= 0.6


def test_fricatives_are_high_frequency_noise_and_silence_is_quiet(corpus):
    root, _ = corpus
    high: dict[str, list[float]] = {}
    power: dict[str, list[float]] = {}
    freqs = np.fft.rfftfreq(512, 1 / 16_000)
    for key, row in _alignments(root).items():
        audio, _ = sf.read(_flac(root, key))
        for phone, start, end in row["segments"]:
            if end - start < 800:
                continue
            middle = (start + end) // 2
            spectrum = np.abs(
                np.fft.rfft(audio[middle - 200 : middle + 200] * np.hanning(400), 512)
            )
            spectrum **= 2
            kind = PHONES[phone].kind
            if kind == "vowel" or phone in ("S", "SH", "F", "TH"):
                high.setdefault(kind, []).append(spectrum[freqs >= 2500].sum() / spectrum.sum())
            edge = 480  # 30 ms: transitions in and out of the segment are left out.
            if end - start > 2 * edge + 160:
                power.setdefault(kind, []).append(np.mean(audio[start + edge : end - edge] ** 2))
    assert np.median(high["fricative"]) > 0.5 > 0.1 > np.median(high["vowel"])
    vowel_db = 10 * np.log10(np.median(power["vowel"]))
    silence_db = 10 * np.log10(np.median(power["silence"]))
    assert silence_db < vowel_db - 25
    assert silence_db > -100  # Room noise, never digital silence.


def test_text_to_speech_is_refused_clearly_when_it_cannot_run(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="unknown tts 'espeak'"):
        write_demo_corpus(str(tmp_path), minutes=0.1, tts="espeak")
    with pytest.raises(RuntimeError, match="flite.*no phone timings"):
        write_demo_corpus(str(tmp_path), minutes=0.1, tts="flite")
    monkeypatch.setattr(demo_corpus.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install festival"):
        write_demo_corpus(str(tmp_path), minutes=0.1, tts="festival")
    assert not os.listdir(tmp_path)  # Refused before writing anything.


@pytest.mark.skipif(shutil.which("festival") is None, reason="Festival is not installed")
def test_festival_sentences_come_with_exact_alignments(tmp_path):
    summary = write_demo_corpus(str(tmp_path), minutes=0.25, speakers=2, seed=3, tts="festival")
    alignments = _check_corpus(tmp_path)
    assert summary["tts"] == "festival" and summary["utterances"] == len(alignments)
    assert abs(summary["seconds"] - 15.0) <= 8.0  # Whole sentences: one may overshoot.
    assert {"sil", "DH", "AH"} <= set(summary["phones"])
    found = discover(str(tmp_path))
    assert found.layout == "librispeech" and len(found.sources) == len(alignments)
