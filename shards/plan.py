"""The shard plan: which input goes to which shard, computed once and saved in the root.

The plan is a pure function of the probed inputs and the options, so it is the same on
every run; saving it means a resumed job never lists or probes the corpus again and can
never assign an input to a different shard than the interrupted run did.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re

import numpy as np

from . import vad
from .core import storage
from .core.atomic import read_json, write_atomic, write_parquet_atomic
from .discover import AUDIO_EXTENSIONS, LAYOUTS
from .probe import Probe
from .root import RootLayout
from .schemas import PLAN, REJECTS, Reason, Stage, reject_row

PLAN_VERSION = 1

#: Tar headers and the json member of one sample, roughly (for shard size estimates).
_SAMPLE_OVERHEAD = 2048

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}


def parse_size(text: str | int) -> int:
    """Parses ``1GiB``, ``500MB``, ``65536`` into bytes.

    Example:
        >>> parse_size("1GiB")
        1073741824
    """
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    unit = (m.group(2) or "").lower() if m else None
    if not m or unit not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size; write for example 1GiB, 512MiB or 100MB")
    return int(float(m.group(1)) * _UNITS[unit])


@dataclasses.dataclass(frozen=True)
class ShardingOptions:
    """Everything that decides what the shard stage writes.

    Attributes:
        layout: Input layout, one of ``auto``, ``librispeech``, ``librilight``, ``dir``, ``list``.
        segment: ``none`` (one sample per file) or ``vad``.
        target_seconds: Voiced seconds per segment with ``vad``.
        shard_bytes: A shard is closed before its estimated size would pass this.
        max_samples: And before it would hold more samples than this.
        seed: Shuffle inputs across shards with this seed; ``None`` keeps key order.
        verify: Decode pass-through files completely (otherwise only their last frame).
        vad: Detector for files without a sidecar: ``webrtc`` or ``energy``.
        extensions: Audio extensions taken from directory trees.
    """

    layout: str = "auto"
    segment: str = "none"
    target_seconds: float = 30.0
    shard_bytes: int = 1 << 30
    max_samples: int = 10_000
    seed: int | None = None
    verify: bool = False
    vad: str = "webrtc"
    extensions: tuple[str, ...] = AUDIO_EXTENSIONS

    def validate(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; choose one of {', '.join(LAYOUTS)}")
        if self.segment not in ("none", "vad"):
            raise ValueError(f"unknown segmentation {self.segment!r}; choose 'none' or 'vad'")
        if self.vad not in vad.DETECTORS:
            raise ValueError(f"unknown VAD {self.vad!r}; choose one of {', '.join(vad.DETECTORS)}")
        if not self.target_seconds > 0:
            raise ValueError(f"--target-seconds must be > 0, got {self.target_seconds}")
        if self.shard_bytes <= 0 or self.max_samples <= 0:
            raise ValueError("--shard-bytes and --max-samples must be positive")

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["extensions"] = list(self.extensions)
        return d


@dataclasses.dataclass
class Plan:
    """A saved plan: per-shard rows, plus what discovery and probing turned away."""

    shards: list[list[dict]]
    rejects: list[dict]
    meta: dict

    @property
    def num_files(self) -> int:
        return self.meta["files"]


def estimate(p: Probe, opts: ShardingOptions) -> tuple[int, int]:
    """Estimated stored bytes and sample count of one input.

    Transcoded audio is counted at its 16-bit PCM size, an upper bound of its FLAC size, so
    shards of transcoded audio come out smaller than ``shard_bytes``.
    """
    nbytes = p.file_bytes if p.passthrough else 2 * p.output_samples
    if opts.segment == "none":
        samples = 1
    elif p.voice_activity is not None:
        samples = max(
            1, len(vad.group(vad.clip(p.voice_activity, p.duration)[0], opts.target_seconds))
        )
    else:
        samples = max(1, math.ceil(p.duration / opts.target_seconds))
    return nbytes + samples * _SAMPLE_OVERHEAD, samples


def make_plan(probes: list[Probe], rejects: list[dict], opts: ShardingOptions, meta: dict) -> Plan:
    """Dedupes keys, orders the inputs and packs them into shards.

    The first source (in path order) of a key is kept; every other one is rejected with
    ``duplicate_key``: a collision never overwrites.
    """
    rejects = list(rejects)
    kept: dict[str, Probe] = {}
    for p in sorted(probes, key=lambda p: (p.source.key, p.source.path)):
        first = kept.get(p.source.key)
        if first is None:
            kept[p.source.key] = p
        else:
            rejects.append(
                reject_row(
                    p.source.path,
                    Stage.PLAN,
                    Reason.DUPLICATE_KEY,
                    f"key {p.source.key!r} is already taken by {first.source.path}",
                    p.source.key,
                )
            )
    ordered = list(kept.values())
    if opts.seed is not None:
        ordered = [ordered[i] for i in np.random.default_rng(opts.seed).permutation(len(ordered))]
    shards: list[list[dict]] = []
    size = count = 0
    for p in ordered:
        nbytes, nsamples = estimate(p, opts)
        if (
            shards
            and shards[-1]
            and (size + nbytes > opts.shard_bytes or count + nsamples > opts.max_samples)
        ):
            shards.append([])
            size = count = 0
        if not shards:
            shards.append([])
        shards[-1].append(_row(len(shards) - 1, p, nbytes, nsamples))
        size += nbytes
        count += nsamples
    meta = dict(meta, shards=len(shards), planned=len(ordered))
    return Plan(shards, sorted(rejects, key=lambda r: (r["source"], r["reason"])), meta)


def _row(shard: int, p: Probe, nbytes: int, nsamples: int) -> dict:
    s = p.source
    return {
        "shard": shard,
        "key": s.key,
        "source": s.path,
        "sidecar": s.sidecar,
        "speaker": s.speaker,
        "group": s.group,
        "text": s.text,
        "frames": p.frames,
        "sample_rate": p.sample_rate,
        "channels": p.channels,
        "format": p.format,
        "subtype": p.subtype,
        "file_bytes": p.file_bytes,
        "passthrough": p.passthrough,
        "est_bytes": nbytes,
        "est_samples": nsamples,
    }


def fingerprint(inputs: list[str], opts: ShardingOptions) -> str:
    blob = json.dumps(
        {"inputs": inputs, "options": opts.to_json(), "version": PLAN_VERSION}, sort_keys=True
    ).encode()
    return hashlib.sha256(blob).hexdigest()


def save(layout: RootLayout, plan: Plan) -> None:
    """Writes the plan; ``plan.json`` goes last and is what marks the plan as complete."""
    rows = [row for shard in plan.shards for row in shard]
    write_parquet_atomic(layout.plan_path("plan.parquet"), rows, PLAN)
    write_parquet_atomic(layout.plan_path("rejects.parquet"), plan.rejects, REJECTS)
    write_atomic(
        layout.plan_path("plan.json"), json.dumps(plan.meta, sort_keys=True, indent=1).encode()
    )


def load(layout: RootLayout) -> Plan | None:
    """The saved plan, or ``None`` when the root has no complete plan."""
    meta = read_json(layout.plan_path("plan.json"))
    if meta is None:
        return None
    rows = storage.read_parquet(layout.plan_path("plan.parquet")).to_pylist()
    shards: list[list[dict]] = [[] for _ in range(meta["shards"])]
    for row in rows:
        shards[row["shard"]].append(row)
    rejects = storage.read_parquet(layout.plan_path("rejects.parquet")).to_pylist()
    return Plan(shards, rejects, meta)
