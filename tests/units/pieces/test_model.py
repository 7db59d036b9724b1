"""Acoustic pieces: deterministic training, encodings that give back their units exactly."""

from __future__ import annotations

import numpy as np
import pytest

from units.labels.model import dedup
from units.pieces.model import (
    FIRST_CHAR,
    MAX_UNITS,
    UNK_ID,
    Pieces,
    text_to_units,
    train,
    units_to_text,
)


def speech_like(rng: np.random.Generator, k: int, utterances: int) -> list[np.ndarray]:
    """Frame-level units as k-means gives them: a sticky Markov chain over a few recurring
    "syllables" (so there is something to merge), each unit held for a few frames."""
    syllables = [rng.integers(0, k, rng.integers(2, 5)) for _ in range(12)]
    out = []
    for _ in range(utterances):
        runs = np.concatenate([syllables[i] for i in rng.integers(0, 12, rng.integers(3, 20))])
        noise = rng.random(len(runs)) < 0.1  # Some units off the syllables.
        runs[noise] = rng.integers(0, k, noise.sum())
        out.append(np.repeat(runs, rng.integers(1, 6, len(runs))).astype(np.uint16))
    return out


def random_frames(rng: np.random.Generator, k: int, utterances: int) -> list[np.ndarray]:
    return [
        np.repeat(rng.integers(0, k, n), rng.integers(1, 4, n)).astype(np.uint16)
        for n in rng.integers(1, 80, utterances)
    ]


def dedups(frames: list[np.ndarray]) -> list[np.ndarray]:
    return [dedup(u)[0] for u in frames]


def test_units_are_one_private_use_character_each_and_back():
    units = np.array([0, 1, 500, MAX_UNITS - 1], np.uint16)
    text = units_to_text(units)
    assert [ord(c) for c in text] == [FIRST_CHAR, FIRST_CHAR + 1, FIRST_CHAR + 500, 0x10FFFF]
    np.testing.assert_array_equal(text_to_units(text), units)
    with pytest.raises(ValueError, match="not a sequence of unit characters"):
        text_to_units("<unk>")


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_training_is_deterministic(model_type):
    seqs = dedups(speech_like(np.random.default_rng(0), 20, 200))
    a = train(seqs, 60, model_type, seed=3, num_units=20)
    b = train(iter(seqs), 60, model_type, seed=3, num_units=20)  # Any iterable, read once.
    assert a == b


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
@pytest.mark.parametrize("make", [speech_like, random_frames])
def test_pieces_give_back_the_dedup_and_the_frame_units_exactly(model_type, make):
    rng = np.random.default_rng(1)
    k = 24
    frames = make(rng, k, 300)
    pieces = Pieces(train(dedups(frames[:200]), 80, model_type, num_units=k))
    assert pieces.vocab_size == 80 and pieces.piece_units(UNK_ID).size == 0
    longer = 0
    for units in frames:  # Held-out utterances too.
        values, durations = dedup(units)
        ids, starts, lengths = pieces.encode(values)
        np.testing.assert_array_equal(pieces.units(ids), values)
        np.testing.assert_array_equal(np.concatenate([pieces.piece_units(i) for i in ids]), values)
        np.testing.assert_array_equal(starts, np.r_[0, np.cumsum(lengths)[:-1]])
        ids_f, start_f, length_f = pieces.encode_frames(units)
        np.testing.assert_array_equal(ids_f, ids)
        assert ids_f.dtype == start_f.dtype == length_f.dtype == np.int32
        rebuilt = []
        for piece, start, length in zip(ids_f, start_f, length_f, strict=True):
            span = units[start : start + length]
            np.testing.assert_array_equal(dedup(span)[0], pieces.piece_units(piece))
            rebuilt.append(span)
        np.testing.assert_array_equal(np.concatenate(rebuilt), units)
        assert length_f.sum() == len(units) and start_f[0] == 0
        longer += int((lengths > 1).sum())
    assert longer > 0  # Some pieces are more than one unit: there was something to learn.


def test_a_unit_the_sample_never_saw_still_has_a_piece():
    seqs = [np.array([0, 1, 2, 0, 1, 2], np.uint16)] * 10
    pieces = Pieces(train(seqs, 12, num_units=8))
    ids, _, _ = pieces.encode(np.array([7, 0, 1, 2, 5], np.uint16))
    assert UNK_ID not in ids
    np.testing.assert_array_equal(pieces.units(ids), [7, 0, 1, 2, 5])


def test_a_unit_outside_the_model_is_an_error_not_a_silent_unk():
    pieces = Pieces(train([np.array([0, 1, 2, 0, 1], np.uint16)] * 10, 6))
    with pytest.raises(RuntimeError, match=r"units \[9\] have no piece"):
        pieces.encode(np.array([0, 9, 1], np.uint16))


def test_empty_utterances_encode_to_no_pieces():
    pieces = Pieces(train([np.array([0, 1, 0, 1], np.uint16)] * 5, 4, num_units=2))
    for out in (pieces.encode(np.empty(0, np.uint16)), pieces.encode_frames(np.empty(0))):
        assert [len(a) for a in out] == [0, 0, 0]


def test_vocabulary_sizes_that_cannot_work_are_clear_errors():
    seqs = dedups(speech_like(np.random.default_rng(2), 20, 50))
    with pytest.raises(ValueError, match=r"vocab_size=15 should be >= 21"):
        train(seqs, 15, num_units=20)
    with pytest.raises(ValueError, match=r"vocab_size=5 should be >= \d+: one piece for each"):
        train(seqs, 5)  # Without num_units: sentencepiece's own check, reworded.
    with pytest.raises(ValueError, match="is more pieces than 50 sequences"):
        train(seqs, 5000, "unigram", num_units=20)
    with pytest.raises(ValueError, match="model_type 'wordpiece'"):
        train(seqs, 60, "wordpiece")
    with pytest.raises(ValueError, match="not below num_units=4"):
        train(seqs, 60, num_units=4)
    with pytest.raises(ValueError, match="the sample is empty"):
        train([np.empty(0, np.uint16)], 60, num_units=20)
