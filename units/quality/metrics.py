"""How good are the units: purity and PNMI against frame-level phones, usage without them.

With reference phones per frame, the joint distribution p(phone, unit) over all frames gives
the HuBERT paper's measures (§IV-E), as fairseq's ``measure_teacher_quality.py`` computes
them:

- phone purity ``sum_u max_y p(y, u)``: how well one unit predicts one phone;
- cluster purity ``sum_y max_u p(y, u)``: how well one phone predicts one unit;
- PNMI ``I(phone; unit) / H(phone)``: the share of phone information the units carry.

Per utterance, both sequences are cut to the shorter one; the length differences and the
utterances found on one side only are counted and reported, never hidden. Entropies are in
nats with ``0 log 0 = 0`` (fairseq adds 1e-8 inside its logarithms, a difference in the
eighth decimal).

Without references: unit usage (perplexity, dead units, entropy), mean run length and the
dedup ratio.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np


class MetricsError(ValueError):
    """References and hypotheses that cannot be compared (no utterance in common, ...)."""


@dataclasses.dataclass
class JointCounts:
    """Frame counts of (phone, unit) pairs over the utterances both sides have.

    Attributes:
        counts: int64 (phones, units) matrix.
        phones: Row labels, sorted.
        units: Column labels (unit ids), sorted.
        utterances: Utterances counted.
        frames: Frames counted.
        frame_difference: Sum over utterances of ``|len(ref) - len(hyp)|`` (after rate
            conversion), the frames cut away.
        missing: Reference utterances without units.
        extra: Utterances with units but no reference.
    """

    counts: np.ndarray
    phones: list[str]
    units: list[int]
    utterances: int
    frames: int
    frame_difference: int
    missing: list[str]
    extra: list[str]

    @property
    def p(self) -> np.ndarray:
        return self.counts / self.counts.sum()


def joint_counts(
    refs: Mapping[str, Sequence[str]],
    hyps: Mapping[str, Sequence[int]],
    *,
    ref_rate: float = 100.0,
    hyp_rate: float = 100.0,
) -> JointCounts:
    """Counts (phone, unit) frame pairs; units at another rate are repeated to the phones'.

    Args:
        refs: Utterance id to one phone per reference frame.
        hyps: Utterance id to one unit per label frame.
        ref_rate: Reference frames per second (fairseq's phone tsv: 100).
        hyp_rate: Unit frames per second (100 for MFCC, 50 for SSL). The finer of the two
            is kept: the coarser sequence is repeated by the integer ratio (fairseq's
            ``--upsample``).

    Raises:
        MetricsError: Rates that are not integer multiples, or no utterance in common.
    """
    ref_repeat, hyp_repeat = _repeats(ref_rate, hyp_rate)
    common = [u for u in refs if u in hyps]
    if not common:
        raise MetricsError(
            f"no utterance has both reference phones ({len(refs)} utterances) and units "
            f"({len(hyps)}): are the ids the same (e.g. 103-1240-0000)?"
        )
    phone_ids: dict[str, int] = {}
    ref_chunks, hyp_chunks, difference = [], [], 0
    for uid in common:
        ref = np.array([phone_ids.setdefault(p, len(phone_ids)) for p in refs[uid]], np.int64)
        hyp = np.asarray(hyps[uid], np.int64)
        ref, hyp = np.repeat(ref, ref_repeat), np.repeat(hyp, hyp_repeat)
        difference += abs(len(ref) - len(hyp))
        n = min(len(ref), len(hyp))
        ref_chunks.append(ref[:n])
        hyp_chunks.append(hyp[:n])
    ref_all, hyp_all = np.concatenate(ref_chunks), np.concatenate(hyp_chunks)
    units, hyp_index = np.unique(hyp_all, return_inverse=True)
    phones = sorted(phone_ids)
    remap = np.empty(len(phones), np.int64)  # first-seen id -> row of the sorted phones
    for row, phone in enumerate(phones):
        remap[phone_ids[phone]] = row
    counts = np.zeros((len(phones), len(units)), np.int64)
    np.add.at(counts, (remap[ref_all], hyp_index), 1)
    seen = counts.sum(1) > 0  # Phones only in frames that were cut away are not rows.
    counts, phones = counts[seen], [p for p, keep in zip(phones, seen, strict=True) if keep]
    return JointCounts(
        counts=counts,
        phones=phones,
        units=[int(u) for u in units],
        utterances=len(common),
        frames=int(len(ref_all)),
        frame_difference=int(difference),
        missing=sorted(u for u in refs if u not in hyps),
        extra=sorted(u for u in hyps if u not in refs),
    )


def _repeats(ref_rate: float, hyp_rate: float) -> tuple[int, int]:
    if ref_rate <= 0 or hyp_rate <= 0:
        raise MetricsError(f"rates must be positive: phones {ref_rate} Hz, units {hyp_rate} Hz")
    ratio = max(ref_rate, hyp_rate) / min(ref_rate, hyp_rate)
    if abs(ratio - round(ratio)) > 1e-9:
        raise MetricsError(
            f"phones at {ref_rate:g} Hz and units at {hyp_rate:g} Hz: one rate must be an "
            "integer multiple of the other"
        )
    r = int(round(ratio))
    return (1, r) if ref_rate >= hyp_rate else (r, 1)


def entropy(p: np.ndarray) -> float:
    """Entropy in nats of a distribution (zeros contribute nothing)."""
    p = np.asarray(p, np.float64).ravel()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def quality(joint: JointCounts) -> dict:
    """Phone purity, cluster purity, PNMI, MI, H(phone), H(unit) and the coverage counts."""
    p = joint.p
    p_phone, p_unit = p.sum(1), p.sum(0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(p_phone, p_unit)[nz])).sum())
    h_phone, h_unit = entropy(p_phone), entropy(p_unit)
    return {
        "phone_purity": float(p.max(0).sum()),
        "cluster_purity": float(p.max(1).sum()),
        "pnmi": mi / h_phone if h_phone > 0 else 0.0,
        "mutual_information": mi,
        "h_phone": h_phone,
        "h_unit": h_unit,
        "phones": len(joint.phones),
        "units_seen": len(joint.units),
        "frames": joint.frames,
        "frame_difference": joint.frame_difference,
        "utterances": joint.utterances,
        "missing_utterances": len(joint.missing),
        "extra_utterances": len(joint.extra),
    }


class UnitUsage:
    """Unit usage accumulated over utterances, without references.

    :meth:`add_flat` takes Arrow-style flat values and offsets, so a label shard's Parquet
    column is counted without a Python loop over its utterances.
    """

    def __init__(self, k: int):
        self.k = k
        self.counts = np.zeros(k, np.int64)
        self.frames = 0
        self.runs = 0

    def add(self, units: Sequence[int]) -> None:
        u = np.asarray(units, np.int64)
        self.add_flat(u, np.array([0, len(u)]))

    def add_flat(self, values: np.ndarray, offsets: np.ndarray) -> None:
        """Utterance ``i`` is ``values[offsets[i]:offsets[i + 1]]``."""
        values = np.asarray(values, np.int64)
        if len(values) == 0:
            return
        self.counts += np.bincount(values, minlength=self.k)[: self.k]
        self.frames += len(values)
        # A run starts where the unit changes or an utterance starts.
        starts = np.union1d(np.flatnonzero(np.diff(values)) + 1, np.asarray(offsets[:-1]))
        self.runs += int(np.count_nonzero(starts < len(values)))

    def summary(self) -> dict:
        """``entropy`` (nats) and ``perplexity`` (its exponential) of the unit distribution,
        ``used``/``dead`` units of ``k``, ``mean_run_length`` (frames per run of one unit)
        and ``dedup_ratio`` (runs per frame: GSLM's deduplicated length over the frames)."""
        h = entropy(self.counts / max(self.frames, 1))
        used = int(np.count_nonzero(self.counts))
        return {
            "k": self.k,
            "frames": self.frames,
            "entropy": h,
            "perplexity": float(np.exp(h)),
            "used": used,
            "dead": self.k - used,
            "mean_run_length": self.frames / self.runs if self.runs else 0.0,
            "dedup_ratio": self.runs / self.frames if self.frames else 0.0,
        }


def usage(hyps: Mapping[str, Sequence[int]], k: int) -> dict:
    """:meth:`UnitUsage.summary` of ``hyps``, plus the per-unit ``counts``."""
    counter = UnitUsage(k)
    for units in hyps.values():
        counter.add(units)
    return dict(counter.summary(), counts=counter.counts.tolist())
