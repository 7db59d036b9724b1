"""A seeded sample of utterances for fitting, stratified across shards and speakers.

Each utterance gets a priority from a hash of the seed and its key, so the sample does not
depend on the order rows are read in, on the number of workers, or on the Python version.
Every stratum (shard, speaker) gives its share: ``percent`` of its utterances, or the
fraction of its audio that ``hours`` asks of the whole corpus.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import math


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


def draw(rows: list[dict], request: SampleRequest) -> list[dict]:
    """Selects rows (``key``, ``shard``, ``speaker``, ``duration``) for the sample.

    Args:
        rows: One per utterance.
        request: Percent of utterances or hours of audio, and the seed.

    Returns:
        The selected rows, in the order they were given.

    Raises:
        SampleError: For a request larger than the corpus or one that selects nothing.
    """
    request.validate()
    if not rows:
        raise SampleError("the corpus has no utterances to sample from")
    strata: dict[tuple, list[dict]] = collections.defaultdict(list)
    for row in rows:
        strata[(row["shard"], row.get("speaker"))].append(row)
    total_hours = sum(r["duration"] for r in rows) / 3600
    if request.hours is not None and request.hours > total_hours * (1 + 1e-9):
        raise SampleError(
            f"--hours {request.hours} asks for more than the corpus holds ({total_hours:.3f} h)"
        )
    fraction = request.percent / 100 if request.percent is not None else request.hours / total_hours
    chosen: set[str] = set()
    if request.percent is not None:
        quotas = _largest_remainder(
            {s: len(v) * fraction for s, v in strata.items()}, round(len(rows) * fraction)
        )
        for stratum, members in strata.items():
            ranked = sorted(members, key=lambda r: priority(request.seed, r["key"]))
            chosen.update(r["key"] for r in ranked[: quotas[stratum]])
    else:
        for members in strata.values():
            want = sum(r["duration"] for r in members) * fraction
            got = 0.0
            for r in sorted(members, key=lambda r: priority(request.seed, r["key"])):
                if got >= want - 1e-9:
                    break
                chosen.add(r["key"])
                got += r["duration"]
    if not chosen:
        raise SampleError("the sample is empty; ask for a larger --percent or --hours")
    return [r for r in rows if r["key"] in chosen]


def _largest_remainder(shares: dict, total: int) -> dict:
    """Integer quotas that sum to ``total`` and are each within 1 of their share."""
    floors = {s: math.floor(v) for s, v in shares.items()}
    left = total - sum(floors.values())
    by_remainder = sorted(shares, key=lambda s: (floors[s] - shares[s], repr(s)))
    for s in by_remainder[: max(0, left)]:
        floors[s] += 1
    return floors
