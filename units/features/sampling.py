"""A seeded sample of utterances for fitting, stratified across shards and speakers.

Each utterance gets a priority from a hash of the seed and its key, so the sample does not
depend on the order rows are read in, on the number of workers, or on the Python version.
Every stratum (shard, speaker) gives its share: ``percent`` of its utterances, or the
fraction of its audio that ``hours`` asks of the whole corpus.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


class SampleError(ValueError):
    """A sample that cannot be drawn (asks for more than exists, or nothing)."""


@dataclasses.dataclass(frozen=True)
class SampleRequest:
    """How much to sample: exactly one of ``percent`` or ``hours``."""

    percent: float | None = None
    hours: float | None = None
    seed: int = 0

    def __post_init__(self):
        # The request is part of the feature store's plan fingerprint: ``percent=50`` from
        # Python and ``--percent 50`` (a float) from the CLI must name the same store.
        for name in ("percent", "hours"):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, name, float(value))

    def validate(self) -> None:
        if (self.percent is None) == (self.hours is None):
            raise SampleError("give exactly one of --percent or --hours")
        if self.percent is not None and not 0 < self.percent <= 100:
            raise SampleError(f"--percent must be in (0, 100], got {self.percent}")
        if self.hours is not None and not self.hours > 0:
            raise SampleError(f"--hours must be > 0, got {self.hours}")


def priority(seed: int, key: str) -> float:
    """A uniform number in [0, 1) fixed by the seed and the key."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def priorities(seed: int, keys: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """:func:`priority` of every key, as float64 (keys are converted a chunk at a time)."""
    out = np.empty(len(keys), dtype=np.float64)
    at = 0
    for start in range(0, len(keys), _CHUNK):
        chunk = keys.slice(start, _CHUNK).to_pylist()
        out[at : at + len(chunk)] = [priority(seed, k) for k in chunk]
        at += len(chunk)
    return out


#: Keys turned into Python strings at a time (their memory is transient).
_CHUNK = 65_536


def draw(rows: pa.Table | list[dict], request: SampleRequest) -> pa.Table | list[dict]:
    """Selects rows (``key``, ``shard``, ``speaker``, ``duration``) for the sample.

    The work is columnar (numpy over the table's columns): the driver holds a few numbers
    per utterance, not a Python object, so a 7-million-utterance manifest samples in
    seconds. Sums of durations run in row order (``numpy.cumsum``, sequential), so the
    sample is the same on every machine and Python version.

    Args:
        rows: One per utterance, as a table (or a list of dicts, for small inputs).
        request: Percent of utterances or hours of audio, and the seed.

    Returns:
        The selected rows, in the order they were given, of the type given.

    Raises:
        SampleError: For a request larger than the corpus or one that selects nothing.
    """
    request.validate()
    given_list = isinstance(rows, list)
    table = pa.Table.from_pylist(rows) if given_list else rows
    n = table.num_rows
    if not n:
        raise SampleError("the corpus has no utterances to sample from")
    duration = table.column("duration").to_numpy().astype(np.float64)
    stratum, tiebreak = _strata(table)
    counts = np.bincount(stratum, minlength=len(tiebreak))
    prio = priorities(request.seed, table.column("key"))
    total_hours = float(np.cumsum(duration)[-1]) / 3600
    if request.hours is not None and request.hours > total_hours * (1 + 1e-9):
        raise SampleError(
            f"--hours {request.hours} asks for more than the corpus holds ({total_hours:.3f} h)"
        )
    fraction = request.percent / 100 if request.percent is not None else request.hours / total_hours
    # Each stratum's members by priority (ties in row order: lexsort is stable).
    order = np.lexsort((prio, stratum))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    chosen_in_order = np.zeros(n, dtype=bool)
    if request.percent is not None:
        quota = _largest_remainder(counts * fraction, round(n * fraction), tiebreak)
        rank = np.arange(n) - starts[stratum[order]]
        chosen_in_order = rank < quota[stratum[order]]
    else:
        in_row_order = np.argsort(stratum, kind="stable")
        for lo, c in zip(starts.tolist(), counts.tolist(), strict=True):
            want = float(np.cumsum(duration[in_row_order[lo : lo + c]])[-1]) * fraction
            by_priority = duration[order[lo : lo + c]]
            got_before = np.concatenate([[0.0], np.cumsum(by_priority)[:-1]])
            # Members are taken by priority until the stratum has what it wants.
            chosen_in_order[lo : lo + c] = got_before < want - 1e-9
    chosen = np.zeros(n, dtype=bool)
    chosen[order] = chosen_in_order
    if not chosen.any():
        raise SampleError("the sample is empty; ask for a larger --percent or --hours")
    picked = table.filter(pa.array(chosen))
    return picked.to_pylist() if given_list else picked


def _strata(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Each row's stratum number, and each stratum's rank in the order of the ``repr`` of
    its ``(shard, speaker)`` (the quotas' tie-break), from numbers only: a corpus can have
    nearly a stratum per utterance, and a Python tuple each cost the driver ~400 B."""
    shard = table.column("shard").combine_chunks().dictionary_encode()
    speaker = (
        table.column("speaker").combine_chunks().cast(pa.string())
        if "speaker" in table.column_names
        else pa.nulls(table.num_rows, pa.string())
    ).dictionary_encode()
    width = len(speaker.dictionary) + 1  # 0: no speaker.
    code = shard.indices.to_numpy().astype(np.int64) * width + (
        pc.fill_null(speaker.indices, -1).to_numpy().astype(np.int64) + 1
    )
    unique, stratum = np.unique(code, return_inverse=True)
    # repr((shard, speaker)) orders as repr(shard), then repr(speaker): no repr of a string
    # (or None) is a proper prefix of another's, so the first difference lies in one part.
    shard_rank = _repr_ranks(shard.dictionary.to_pylist())
    speaker_rank = _repr_ranks([None, *speaker.dictionary.to_pylist()])
    order = np.lexsort((speaker_rank[unique % width], shard_rank[unique // width]))
    tiebreak = np.empty(len(unique), dtype=np.int64)
    tiebreak[order] = np.arange(len(unique))
    return stratum.astype(np.int64), tiebreak


def _repr_ranks(values: list) -> np.ndarray:
    """Each value's rank in the order of the values' ``repr`` (a few thousand distinct shard
    and speaker names: Python strings here are cheap)."""
    ranks = np.empty(len(values), dtype=np.int64)
    ranks[sorted(range(len(values)), key=lambda i: repr(values[i]))] = np.arange(len(values))
    return ranks


def _largest_remainder(shares: np.ndarray, total: int, tiebreak: np.ndarray) -> np.ndarray:
    """Integer quotas that sum to ``total`` and are each within 1 of their share: the floors,
    plus one for the largest remainders (equal ones in ``tiebreak`` order)."""
    floors = np.floor(shares)
    left = total - int(floors.sum())
    by_remainder = np.lexsort((tiebreak, floors - shares))
    quota = floors.astype(np.int64)
    quota[by_remainder[: max(0, left)]] += 1
    return quota
