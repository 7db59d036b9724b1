"""Acoustic pieces: sentencepiece (BPE or unigram) over deduplicated unit sequences.

HuBERT-AP (Ren et al., Interspeech 2022) deduplicates each utterance's frame-level k-means
units (GSLM's runs, :func:`units.labels.model.dedup`), learns a subword vocabulary over those
sequences with sentencepiece, and trains on the pieces. Here each unit id is one Unicode
character (:func:`units_to_text`), so sentencepiece sees a "sentence" of characters and no
text processing of its own applies (:func:`trainer_options` says why each option is set).

Every unit of the label set gets a piece of its own, even one the training sample never
saw: :func:`train` adds a one-unit sentence for each missing unit, which adds no pair to
BPE's merge counts and a count of one to unigram's. Encoding therefore never meets
``<unk>``; :class:`Pieces` checks every encoding against its input and raises on any
difference (a bug, never a silent loss).

Example:
    >>> import numpy as np
    >>> seqs = [np.array([3, 1, 2, 3, 1, 2, 0], np.uint16)] * 20
    >>> pieces = Pieces(train(seqs, vocab_size=8, num_units=4))
    >>> ids, starts, lengths = pieces.encode_frames(np.array([3, 3, 1, 2, 2, 2], np.uint16))
    >>> [pieces.piece_units(i).tolist() for i in ids], starts.tolist(), lengths.tolist()
    ([[3, 1, 2]], [0], [6])
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator

import numpy as np

from units.labels.model import dedup

#: Unit ``u`` is the character ``chr(FIRST_CHAR + u)``: Supplementary Private Use Area-B,
#: U+100000..U+10FFFF, exactly 65,536 code points, one per uint16 unit. Private use
#: characters have no case, no compatibility form and no script that sentencepiece would
#: normalise or split on (with ``identity`` normalisation it would normalise none anyway),
#: none of them is whitespace, and none is a character sentencepiece reserves (U+2581 for
#: whitespace, U+2585 for unknowns, tab). Each is 4 bytes of UTF-8.
FIRST_CHAR = 0x100000

#: Units a model can hold: every uint16 id.
MAX_UNITS = 65_536

#: sentencepiece's ``<unk>``: the only special piece, always id 0, so the pieces themselves
#: start at 1 and no begin/end/pad piece shifts them (the encoder never emits one either).
UNK_ID = 0

MODEL_TYPES = ("bpe", "unigram")

#: sentencepiece's limit on a sentence, in bytes (it skips longer ones, so the largest it
#: allows: 268 million units, where 30 s of speech at 100 Hz is 3,000 frames).
_MAX_SENTENCE_BYTES = 1 << 30


def units_to_text(units: np.ndarray) -> str:
    """The units as sentencepiece's text: one character per unit (see :data:`FIRST_CHAR`),
    converted as one UTF-32 buffer rather than a ``chr`` per unit."""
    codes = np.asarray(units, dtype=np.uint32) + np.uint32(FIRST_CHAR)
    return codes.astype("<u4").tobytes().decode("utf-32-le")


def text_to_units(text: str) -> np.ndarray:
    """The units of :func:`units_to_text`'s text, as uint16.

    Raises:
        ValueError: A character that is not a unit (``<unk>``'s surface, say).
    """
    codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4").astype(np.int64) - FIRST_CHAR
    if len(codes) and (codes.min() < 0 or codes.max() >= MAX_UNITS):
        raise ValueError(f"{text!r} is not a sequence of unit characters")
    return codes.astype(np.uint16)


def trainer_options(vocab_size: int, model_type: str) -> dict:
    """sentencepiece's trainer options for unit sequences, each set for a reason:

    - ``normalization_rule_name="identity"``: the default ``nmt_nfkc`` rewrites characters;
      a unit must stay the unit it is.
    - ``add_dummy_prefix=False``, ``remove_extra_whitespaces=False``: there is no text and
      no word boundary; a dummy ``▁`` would become a piece of its own at every start.
    - ``split_by_unicode_script``, ``split_by_number``, ``split_by_whitespace``,
      ``split_digits`` off: a piece may span any units (all are one script anyway).
    - ``character_coverage=1.0``: every unit seen is a piece (the default 0.9995 maps rare
      characters to ``<unk>``, a lost unit).
    - ``byte_fallback=False``: never needed, as every unit is a piece; byte pieces would
      only take 256 places of the vocabulary.
    - ``unk_id=0`` and no ``<s>``, ``</s>``, ``<pad>``: see :data:`UNK_ID`.
    - ``max_sentencepiece_length=16``: units per piece at most (sentencepiece's default,
      said here because the piece table and the frame spans depend on it).
    - ``max_sentence_length``: the largest allowed, so no utterance is skipped.
    - ``num_threads=1``, ``shuffle_input_sentence=False``: the same sample gives the same
      model bytes (threads would sum unigram's EM statistics in varying order; shuffling
      matters only when sentencepiece subsamples, which ``input_sentence_size=0`` stops).
    - ``hard_vocab_limit=True``: exactly ``vocab_size`` pieces, or an error saying the
      sample cannot give that many.
    - ``minloglevel=2``: sentencepiece's progress lines go nowhere; errors still raise.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r}: use one of {', '.join(MODEL_TYPES)}")
    return dict(
        model_type=model_type,
        vocab_size=int(vocab_size),
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_by_unicode_script=False,
        split_by_number=False,
        split_by_whitespace=False,
        split_digits=False,
        character_coverage=1.0,
        byte_fallback=False,
        unk_id=UNK_ID,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        max_sentencepiece_length=16,
        max_sentence_length=_MAX_SENTENCE_BYTES,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        hard_vocab_limit=True,
        minloglevel=2,
    )


def check_vocab_size(vocab_size: int, num_units: int) -> None:
    """Raises :class:`ValueError` unless ``vocab_size`` holds ``<unk>`` and a piece for each
    of ``num_units`` units."""
    if not 0 < num_units <= MAX_UNITS:
        raise ValueError(f"num_units={num_units} should be between 1 and {MAX_UNITS}")
    if vocab_size < num_units + 1:
        raise ValueError(
            f"vocab_size={vocab_size} should be >= {num_units + 1}: one piece for each of the "
            f"{num_units} units and <unk>, before any piece of two units or more"
        )


def train(
    sequences: Iterable[np.ndarray],
    vocab_size: int,
    model_type: str = "bpe",
    seed: int = 0,
    *,
    num_units: int | None = None,
) -> bytes:
    """Trains a sentencepiece model over deduplicated unit sequences; returns its bytes.

    The sequences are read once, in order, straight into sentencepiece (which keeps its
    own copy of them: 4 bytes per unit), so a caller can stream them from storage.

    Args:
        sequences: Deduplicated units (uint16) of each utterance of the sample.
        vocab_size: Pieces, ``<unk>`` included.
        model_type: ``bpe`` or ``unigram``.
        seed: sentencepiece's random seed (unigram's seeding and pruning use it).
        num_units: Units ``0 .. num_units - 1`` each get a piece, seen in the sample or not
            (the label set's k). ``None``: the units seen.

    Returns:
        The serialized ``ModelProto``: :class:`Pieces` loads it, and so does
        ``sentencepiece.SentencePieceProcessor(model_proto=...)``.

    Raises:
        ValueError: A ``vocab_size`` below the units plus ``<unk>``, or above what the
            sample can give; a unit id not below ``num_units``; an empty sample.
    """
    import sentencepiece as spm

    options = trainer_options(vocab_size, model_type)  # Checks model_type first.
    if num_units is not None:
        check_vocab_size(vocab_size, num_units)
    sentences = _Sentences(sequences, num_units)
    model = io.BytesIO()
    spm.set_random_generator_seed(int(seed))
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model,
                                       **options)  # fmt: skip
    except RuntimeError as e:
        if sentences.error is not None:  # Raised inside the iterator, passed through C++.
            raise sentences.error from None
        raise _vocab_error(e, vocab_size, sentences) from None
    if sentences.error is not None:
        raise sentences.error
    return model.getvalue()


class _Sentences:
    """The training sentences: the sample's, then one per unit of ``range(num_units)`` that
    the sample lacks; counts what went by, and keeps an error for :func:`train` to raise
    (sentencepiece's C++ iterator turns a Python exception into a bare ``RuntimeError``)."""

    def __init__(self, sequences: Iterable[np.ndarray], num_units: int | None):
        self.sequences, self.num_units = sequences, num_units
        self.seen = np.zeros(MAX_UNITS, dtype=bool)
        self.count = self.units = 0
        self.error: Exception | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            for units in self.sequences:
                units = np.asarray(units)
                if len(units) == 0:
                    continue  # Nothing to learn from; sentencepiece would skip it too.
                self._check(units)
                self.seen[units] = True
                self.count += 1
                self.units += len(units)
                yield units_to_text(units)
        except Exception as e:
            self.error = e
            raise
        if self.count == 0:
            self.error = ValueError("no unit sequence to train on: the sample is empty")
            raise self.error
        if self.num_units is not None:
            for unit in np.flatnonzero(~self.seen[: self.num_units]):
                yield units_to_text(np.array([unit]))

    def _check(self, units: np.ndarray) -> None:
        if units.dtype.kind not in "iu" or units.min() < 0 or units.max() >= MAX_UNITS:
            raise ValueError(f"units must be integers in [0, {MAX_UNITS}), got {units[:8]}...")
        if self.num_units is not None and units.max() >= self.num_units:
            raise ValueError(f"unit {int(units.max())} is not below num_units={self.num_units}")


def _vocab_error(error: RuntimeError, vocab_size: int, sentences: _Sentences) -> Exception:
    """sentencepiece's vocabulary errors as one clear :class:`ValueError`; others as they are."""
    message = str(error)
    distinct = int(sentences.seen.sum()) if sentences.num_units is None else sentences.num_units
    if "smaller than required_chars" in message:
        return ValueError(
            f"vocab_size={vocab_size} should be >= {distinct + 1}: one piece for each of the "
            f"{distinct} distinct units and <unk>"
        )
    if "too high" in message:
        limit = message.rsplit("<=", 1)[-1].strip(" .") if "<=" in message else "?"
        return ValueError(
            f"vocab_size={vocab_size} is more pieces than {sentences.count} sequences of "
            f"{sentences.units} units can give (at most {limit}): lower it or sample more"
        )
    return error


class Pieces:
    """A trained acoustic-piece model: unit sequences to piece ids and back.

    Args:
        model: The bytes :func:`train` returned (or a ``.model`` file's content).

    Attributes:
        vocab_size: Pieces, ``<unk>`` (id 0) included.

    Example:
        >>> pieces = Pieces(model_bytes)  # doctest: +SKIP
        >>> ids, starts, lengths = pieces.encode(dedup_units)  # doctest: +SKIP
    """

    def __init__(self, model: bytes):
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_proto=model)
        self.vocab_size = int(self._sp.get_piece_size())
        if self._sp.unk_id() != UNK_ID:
            raise ValueError(f"not an acoustic-piece model: <unk> is {self._sp.unk_id()}")
        # Every piece's units, flat, with offsets: expanding ids is then array indexing.
        units = [self._units_of(i) for i in range(self.vocab_size)]
        self._offsets = np.zeros(self.vocab_size + 1, dtype=np.int64)
        np.cumsum([len(u) for u in units], out=self._offsets[1:])
        self._flat = np.concatenate(units).astype(np.uint16)
        self._lengths = np.diff(self._offsets).astype(np.int32)

    def _units_of(self, piece: int) -> np.ndarray:
        if self._sp.is_unknown(piece) or self._sp.is_control(piece):
            return np.empty(0, np.uint16)
        return text_to_units(self._sp.id_to_piece(piece))

    def piece_units(self, piece: int) -> np.ndarray:
        """The units (uint16) piece ``piece`` stands for; empty for ``<unk>``."""
        if not 0 <= piece < self.vocab_size:
            raise IndexError(f"piece {piece} is not in a vocabulary of {self.vocab_size}")
        return self._flat[self._offsets[piece] : self._offsets[piece + 1]]

    def units(self, pieces: np.ndarray) -> np.ndarray:
        """The deduplicated units that ``pieces`` spell, concatenated."""
        pieces = np.asarray(pieces, dtype=np.int64)
        lengths = self._lengths[pieces]
        starts = np.repeat(self._offsets[pieces] - np.cumsum(lengths) + lengths, lengths)
        return self._flat[starts + np.arange(len(starts))]

    def encode(self, dedup_units: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Encodes one utterance's deduplicated units.

        Returns:
            ``(pieces, starts, lengths)``, int32 each: the piece ids, each piece's first
            index in ``dedup_units`` and its length in deduplicated units.

        Raises:
            RuntimeError: The pieces do not spell ``dedup_units`` exactly (a unit the
                model has no piece for, or a bug).
        """
        dedup_units = np.asarray(dedup_units)
        ids = np.asarray(self._sp.encode(units_to_text(dedup_units), out_type=int), np.int32)
        lengths = self._lengths[ids]
        starts = (np.cumsum(lengths) - lengths).astype(np.int32)
        self._check(dedup_units, ids)
        return ids, starts, lengths

    def encode_frames(self, units: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Encodes one utterance's frame-level units (a label set's ``units``): deduplicated
        first (:func:`units.labels.model.dedup`), each piece then spans whole runs.

        Returns:
            ``(pieces, starts, lengths)``, int32 each: the piece ids, each piece's first
            frame and its length in frames. The spans tile the utterance, and the frames of
            each are exactly its piece's units, each repeated over its run.

        Raises:
            RuntimeError: See :meth:`encode`; or spans that do not give back ``units``.
        """
        units = np.asarray(units)
        values, durations = dedup(units)
        ids, dedup_starts, dedup_lengths = self.encode(values)
        run_starts = np.zeros(len(durations) + 1, dtype=np.int64)
        np.cumsum(durations, out=run_starts[1:])
        starts = run_starts[dedup_starts]
        lengths = run_starts[dedup_starts + dedup_lengths] - starts
        self._check_frames(units, ids, starts, lengths)
        return ids, starts.astype(np.int32), lengths.astype(np.int32)

    def _check(self, dedup_units: np.ndarray, ids: np.ndarray) -> None:
        if (ids == UNK_ID).any():
            missing = np.setdiff1d(dedup_units, self._flat)
            raise RuntimeError(
                f"units {missing[:10].tolist()} have no piece in this model (<unk>): was it "
                "trained with num_units covering this label set?"
            )
        spelled = self.units(ids)
        if len(spelled) != len(dedup_units) or not np.array_equal(spelled, dedup_units):
            raise RuntimeError(
                f"{len(ids)} pieces spell {len(spelled)} units that differ from the "
                f"{len(dedup_units)} deduplicated units encoded"
            )

    def _check_frames(self, units, ids, starts, lengths) -> None:
        """The frame spans tile ``units``, each starts a run, and each holds as many runs as
        its piece has units: with :meth:`_check`, the runs of each span are its piece's units."""
        ends = starts + lengths
        tiled = len(ids) == 0 or (starts[0] == 0 and (starts[1:] == ends[:-1]).all())
        if not tiled or (ends[-1] if len(ids) else 0) != len(units) or (lengths <= 0).any():
            raise RuntimeError(f"piece spans do not tile the {len(units)} frames")
        if not len(ids):
            return
        run_start = np.r_[True, units[1:] != units[:-1]]
        runs = np.add.reduceat(run_start.astype(np.int64), starts)
        if not run_start[starts].all() or not np.array_equal(runs, self._lengths[ids]):
            raise RuntimeError("a piece's frame span does not hold whole runs of its units")
