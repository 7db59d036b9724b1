"""The shard plan: which input goes to which shard, computed once and saved in the root.

The plan is a pure function of the probed inputs and the options, so it is the same on
every run; saving it means a resumed job never lists or probes the corpus again and can
never assign an input to a different shard than the interrupted run did.
"""

from __future__ import annotations

import collections.abc
import concurrent.futures
import dataclasses
import hashlib
import json
import math
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import vad
from .core import storage
from .core.atomic import fsync_dir, read_json, write_atomic, write_parquet_atomic
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


class Plan:
    """A saved plan: one Arrow table of input rows ordered by shard, plus what discovery and
    probing turned away.

    The rows stay columnar on the driver (a few hundred bytes per input: 10 million inputs
    fit in a few GB, where a dict per row took 2.3 KB); :attr:`shards` hands out one shard's
    rows at a time.

    Attributes:
        table: Rows of :data:`shards.schemas.PLAN`, shard by shard, in shard order.
        rejects: Reject rows from discovery, probing and planning.
        meta: What the plan was made from (``plan.json``).
    """

    def __init__(self, table: pa.Table, rejects: list[dict], meta: dict):
        self.table = table
        self.rejects = rejects
        self.meta = meta
        shard = table.column("shard").to_numpy()
        count = meta.get("shards", int(shard[-1]) + 1 if len(shard) else 0)
        # Row offsets of each shard (rows are grouped by shard, in order).
        self._offsets = np.searchsorted(shard, np.arange(count + 1), side="left")

    @property
    def num_files(self) -> int:
        return self.meta["files"]

    def shard_size(self, i: int) -> int:
        """How many input rows shard ``i`` has."""
        return int(self._offsets[i + 1] - self._offsets[i])

    def shard_hours(self) -> np.ndarray:
        """Source audio hours of each shard, from the inputs' headers (for progress)."""
        frames = self.table.column("frames").to_numpy()
        seconds = frames / self.table.column("sample_rate").to_numpy()
        # Sequential sums from offsets: np.add.reduceat on an empty shard would give a row.
        ends = np.concatenate([[0.0], np.cumsum(seconds)])
        return (ends[self._offsets[1:]] - ends[self._offsets[:-1]]) / 3600

    @property
    def shards(self) -> _Shards:
        """``shards[i]``: shard ``i``'s rows as their own small table; ``len(shards)``."""
        return _Shards(self)


class _Shards(collections.abc.Sequence):
    def __init__(self, plan: Plan):
        self._plan = plan

    def __len__(self) -> int:
        return len(self._plan._offsets) - 1

    def __getitem__(self, i: int) -> pa.Table:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        lo, hi = self._plan._offsets[i], self._plan._offsets[i + 1]
        # take() copies the rows out: a slice would drag (and pickle, when it is sent to a
        # task) the buffers of the whole plan.
        return self._plan.table.take(np.arange(lo, hi))


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


#: :data:`shards.schemas.PLAN` without the shard column: a probed input's row.
PROBED = pa.schema([f for f in PLAN if f.name != "shard"])


def probed_rows(probes: list[Probe], opts: ShardingOptions) -> pa.Table:
    """The plan rows of probed inputs, with their size estimates (no shard yet).

    Runs where the probes were made (a probe task), so that what the driver receives is a
    table, and a file's voice activity never travels.
    """
    cols: dict[str, list] = {name: [] for name in PROBED.names}
    for p in probes:
        s = p.source
        nbytes, nsamples = estimate(p, opts)
        values = (
            s.key, s.path, s.sidecar, s.speaker, s.group, s.text, p.frames, p.sample_rate,
            p.channels, p.format, p.subtype, p.file_bytes, p.passthrough, nbytes, nsamples,
        )  # fmt: skip
        for name, value in zip(PROBED.names, values, strict=True):
            cols[name].append(value)
    return pa.table(cols, schema=PROBED)


def make_plan(rows: pa.Table, rejects: list[dict], opts: ShardingOptions, meta: dict) -> Plan:
    """Dedupes keys, orders the inputs and packs them into shards.

    The first source (in path order) of a key is kept; every other one is rejected with
    ``duplicate_key``: a collision never overwrites. Sorting and deduping are Arrow kernels;
    only the packing walks the inputs, over two integer columns.

    Args:
        rows: Probed rows (:data:`PROBED`, from :func:`probed_rows`), in any order.
        rejects: Rejects so far (discovery, probing).
        opts: The sharding options.
        meta: What the plan is made from; ``shards`` and ``planned`` are added.
    """
    rejects = list(rejects)
    rows = rows.select(PROBED.names).cast(PROBED)
    rows = rows.take(pc.sort_indices(rows, [("key", "ascending"), ("source", "ascending")]))
    key = rows.column("key")
    repeated = np.zeros(len(rows), dtype=bool)
    if len(rows) > 1:
        repeated[1:] = pc.equal(key.slice(1), key.slice(0, len(rows) - 1)).to_numpy()
    if repeated.any():
        # The kept row of each run of one key is where the run starts.
        first = np.maximum.accumulate(np.where(repeated, 0, np.arange(len(rows))))
        sources = rows.column("source")
        for i in np.flatnonzero(repeated).tolist():
            rejects.append(
                reject_row(
                    sources[i].as_py(),
                    Stage.PLAN,
                    Reason.DUPLICATE_KEY,
                    f"key {key[i].as_py()!r} is already taken by {sources[int(first[i])].as_py()}",
                    key[i].as_py(),
                )
            )
        rows = rows.filter(pa.array(~repeated))
    if opts.seed is not None:
        rows = rows.take(np.random.default_rng(opts.seed).permutation(len(rows)))
    shard = _pack(rows.column("est_bytes").to_numpy(), rows.column("est_samples").to_numpy(), opts)
    table = rows.add_column(0, PLAN.field("shard"), pa.array(shard, pa.int32()))
    meta = dict(meta, shards=int(shard[-1]) + 1 if len(shard) else 0, planned=len(rows))
    return Plan(table, sorted(rejects, key=lambda r: (r["source"], r["reason"])), meta)


def _pack(nbytes: np.ndarray, nsamples: np.ndarray, opts: ShardingOptions) -> np.ndarray:
    """Each input's shard: a shard is closed before its size or sample count would pass the
    limits (an input larger than the limits gets a shard of its own)."""
    shard = np.empty(len(nbytes), dtype=np.int32)
    index = -1
    size = count = 0
    limit_bytes, limit_samples = opts.shard_bytes, opts.max_samples
    # Sequential by nature; plain ints in a list walk cost about 0.1 us per input.
    for i, (b, n) in enumerate(zip(nbytes.tolist(), nsamples.tolist(), strict=True)):
        if index < 0 or (count and (size + b > limit_bytes or count + n > limit_samples)):
            index += 1
            size = count = 0
        shard[i] = index
        size += b
        count += n
    return shard


def fingerprint(inputs: list[str], opts: ShardingOptions) -> str:
    blob = json.dumps(
        {"inputs": inputs, "options": opts.to_json(), "version": PLAN_VERSION}, sort_keys=True
    ).encode()
    return hashlib.sha256(blob).hexdigest()


def save(layout: RootLayout, plan: Plan) -> None:
    """Writes the plan; ``plan.json`` goes last and is what marks the plan as complete."""
    # Each fsync waits on the disk: the two tables are synced side by side (the file system
    # commits them together) and their directory once, before plan.json.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        table = pool.submit(
            write_parquet_atomic,
            layout.plan_path("plan.parquet"),
            plan.table.cast(PLAN),
            None,
            False,
        )
        write_parquet_atomic(layout.plan_path("rejects.parquet"), plan.rejects, REJECTS, False)
        table.result()
    fsync_dir(layout.plan_dir)
    write_atomic(
        layout.plan_path("plan.json"), json.dumps(plan.meta, sort_keys=True, indent=1).encode()
    )


def load(layout: RootLayout) -> Plan | None:
    """The saved plan, or ``None`` when the root has no complete plan."""
    meta = read_json(layout.plan_path("plan.json"))
    if meta is None:
        return None
    table = storage.read_parquet(layout.plan_path("plan.parquet"), schema=PLAN)
    rejects = storage.read_parquet(layout.plan_path("rejects.parquet")).to_pylist()
    return Plan(table, rejects, meta)
