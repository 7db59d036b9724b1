"""Whether k-means workers hold their rows in memory or stream them from the feature store.

A worker that holds its rows reads the store once and keeps every row as float32; one that
streams reads its rows from the store on every pass (bounded memory, a read per pass). This
module is the arithmetic of that choice, with no Ray: :func:`bytes_per_frame` says what a
:class:`~units.kmeans.parts.Part` keeps per frame of its share, and :func:`decide` compares
the largest share with what a worker can get. :mod:`units.kmeans.stage` asks Ray for the
memory and records the decision.

Example:
    >>> ll = decide(frames=2_200_000_000, dim=39, workers=64, memory_per_worker=4 * 2**30)
    >>> ll.rows, ll.fits, ll.hold_bytes_per_worker // 2**30  # 168 B x 34.4M frames each
    ('stream', False, 5)
    >>> decide(frames=10_000_000, dim=39, workers=8, memory_per_worker=4 * 2**30).rows
    'hold'
"""

from __future__ import annotations

import dataclasses

from units.kmeans.parts import DEFAULT_BLOCK_ROWS, Blocks

#: The choices: ``auto`` decides by :func:`decide`; ``hold`` and ``stream`` are obeyed.
ROWS = ("auto", "hold", "stream")

#: The share of a worker's memory that its held rows may take; ``auto`` streams beyond it.
#: The rest is for what the estimate leaves out, none of it proportional to the rows: the
#: worker process itself (Python, numpy, scipy and Ray's core worker: a few hundred MB), the
#: per-block temporaries of a pass (a float64 copy of a block for the sums and the PCA
#: moments, the projected block, the labels: 8-16 B per value of one block, measured 20-40 MB
#: at 39-d with the default 65,536-row blocks, up to 0.8 GB at 768-d), allocator fragmentation,
#: and the other tasks on the node. Ray's ``memory`` resource is also what the node had free
#: when Ray started there, not now, and Ray's memory monitor kills workers when the node
#: passes 95% used: a job that is killed and restarted loses more time than streaming costs.
MEMORY_MARGIN = 0.7

# What a Part keeps per frame of its share (units/kmeans/parts.py), in bytes per value:
#: Held rows: ``Part.block`` keeps each block as float32 (after the PCA projection, if any;
#: the PCA is fitted on rows held at the store's dimension, so that is the peak).
HELD_BYTES_PER_VALUE = 4
#: A store read from a URL: ``StoreSource`` reads each float16 shard file whole and keeps it
#: for the part's life, held or streamed. A local store is memory-mapped instead: page cache,
#: which the kernel can drop and Ray's memory monitor does not count as used.
URL_SOURCE_BYTES_PER_VALUE = 2
#: k-means|| seeding (``Part.seed_update``): every row's distance to its nearest candidate
#: (float32, 4 B) and that candidate's index (int64, 8 B), kept from the first round until
#: ``Part.seed_weights`` frees them, held or streamed. The other inits keep nothing per row.
SEEDING_BYTES_PER_FRAME = 4 + 8


def bytes_per_frame(dim: int, *, hold: bool, seeding: bool = True, url_source: bool = False) -> int:
    """The peak bytes a part keeps per frame of its share: the rows it holds, the k-means||
    state and a store read from a URL (the module constants say why each).

    ``4 * dim + 12`` held, ``12`` streamed, for a local store seeded with k-means||: 168 B
    and 12 B at 39-d. A fixed amount per block and the process itself are the margin's
    (:data:`MEMORY_MARGIN`). Measured with tracemalloc on a 2M-frame, 39-d store: 156 B per
    frame held after the first pass, 168 B during k-means||; the worker's RSS shows 78 B
    more, the local store's memory-mapped float16 pages.

    Args:
        dim: The store's dimension.
        hold: The part holds its rows (``False``: it streams them).
        seeding: The fit seeds with k-means|| (``init="k-means||"``).
        url_source: The store is read from a URL (``s3://``), not local files.
    """
    per = SEEDING_BYTES_PER_FRAME if seeding else 0
    if hold:
        per += HELD_BYTES_PER_VALUE * dim
    if url_source:
        per += URL_SOURCE_BYTES_PER_VALUE * dim
    return per


def largest_share(
    frames: int, workers: int, block_rows: int = DEFAULT_BLOCK_ROWS
) -> tuple[int, int]:
    """The parts that ``frames`` rows are cut into for ``workers`` workers (never more than
    the blocks), and the frames of the largest part: the one that must fit."""
    if frames <= 0:
        return 0, 0
    blocks = Blocks(frames, block_rows)
    ranges = blocks.split(max(1, workers))
    share = max(end - first for first, end in (blocks.rows_of(lo, hi) for lo, hi in ranges))
    return len(ranges), share


@dataclasses.dataclass(frozen=True)
class RowsDecision:
    """What the workers do with their rows, and the numbers that decided it.

    Attributes:
        rows: ``hold`` or ``stream``: what the workers do.
        requested: ``auto``, ``hold`` or ``stream``: what was asked for.
        frames: The store's frames.
        dim: The store's dimension.
        workers: The parts the rows are split over.
        share_frames: The frames of the largest part.
        hold_bytes: Bytes to hold every row, all workers together.
        hold_bytes_per_worker: Bytes the largest part keeps when holding.
        stream_bytes_per_worker: Bytes the largest part keeps when streaming.
        memory_per_worker: Bytes a worker can get (``None``: unknown).
        cluster_memory: Bytes of the whole cluster, for the record (``None``: unknown).
        margin: The share of ``memory_per_worker`` that the rows may take.
        fits: Holding fits within the margin (``None``: memory unknown).
        reason: One line that says why, with the numbers.
    """

    rows: str
    requested: str
    frames: int
    dim: int
    workers: int
    share_frames: int
    hold_bytes: int
    hold_bytes_per_worker: int
    stream_bytes_per_worker: int
    memory_per_worker: int | None
    cluster_memory: int | None
    margin: float
    fits: bool | None
    reason: str

    @property
    def hold(self) -> bool:
        return self.rows == "hold"

    @property
    def budget(self) -> int | None:
        """The bytes per worker the rows may take (``None``: unknown)."""
        if self.memory_per_worker is None:
            return None
        return int(self.margin * self.memory_per_worker)

    @property
    def stream_fits(self) -> bool | None:
        """Streaming fits within the margin (k-means|| state and a URL store's cache are
        kept per row even then)."""
        if self.budget is None:
            return None
        return self.stream_bytes_per_worker <= self.budget

    @property
    def warning(self) -> str | None:
        """What the user must hear at WARNING (``None``: nothing): holding asked for where it
        does not fit, or rows that do not fit even streamed."""
        if self.rows == "hold" and self.fits is False:
            return (
                f"holding the rows was asked for, but {self.reason}; workers may be killed "
                "for memory: stream them (--rows stream or auto), or add workers or nodes"
            )
        if self.rows == "stream" and self.stream_fits is False:
            kept = format_bytes(self.stream_bytes_per_worker)
            offered = format_bytes(self.memory_per_worker)
            return (
                f"even streaming, the largest worker keeps {kept} (the k-means|| distances of "
                f"its {self.share_frames:,} frames, and the store's files when it is read "
                f"from a URL), more than {self.margin:.0%} of the {offered} a worker can get: "
                "add workers or nodes, or seed with --init k-means++"
            )
        return None

    def to_json(self) -> dict:
        """The decision as the stage records it (``kmeans.json``'s ``rows``)."""
        return dict(dataclasses.asdict(self), budget=self.budget, stream_fits=self.stream_fits)


def decide(
    frames: int,
    dim: int,
    workers: int,
    memory_per_worker: int | None,
    *,
    requested: str = "auto",
    block_rows: int = DEFAULT_BLOCK_ROWS,
    seeding: bool = True,
    url_source: bool = False,
    cluster_memory: int | None = None,
    margin: float = MEMORY_MARGIN,
) -> RowsDecision:
    """Whether workers hold their rows or stream them.

    ``auto`` holds when the largest part's held rows (:func:`bytes_per_frame`) take at most
    ``margin`` of ``memory_per_worker``, and streams otherwise; when the memory is unknown it
    holds (streaming costs a read of the store per pass, and nothing says it is needed).
    ``hold`` and ``stream`` are obeyed; the decision says whether holding fits, and
    :attr:`RowsDecision.warning` what to tell the user when it does not.

    Args:
        frames: The store's frames (its index's total).
        dim: The store's dimension.
        workers: Workers asked for; the rows are cut into at most as many parts as blocks.
        memory_per_worker: Bytes a worker can get (``None``: unknown).
        requested: ``auto``, ``hold`` or ``stream``.
        block_rows: Rows per block (how the rows are cut into parts).
        seeding: The fit seeds with k-means|| (per-row state, held or streamed).
        url_source: The store is read from a URL.
        cluster_memory: Bytes of the whole cluster, recorded with the decision.
        margin: The share of ``memory_per_worker`` that the rows may take.

    Raises:
        ValueError: ``requested`` is not one of :data:`ROWS`.
    """
    if requested not in ROWS:
        raise ValueError(f"rows must be one of {', '.join(ROWS)}, got {requested!r}")
    parts, share = largest_share(frames, workers, block_rows)
    held = bytes_per_frame(dim, hold=True, seeding=seeding, url_source=url_source)
    streamed = bytes_per_frame(dim, hold=False, seeding=seeding, url_source=url_source)
    per_worker = share * held
    if memory_per_worker is None:
        fits = None
        numbers = (
            f"holding takes {format_bytes(per_worker)} per worker; Ray reports no memory for "
            "the workers"
        )
    else:
        budget = int(margin * memory_per_worker)
        fits = per_worker <= budget
        numbers = (
            f"holding takes {format_bytes(per_worker)} per worker ({held} B x {share:,} frames of "
            f"{frames:,}, {parts} worker(s)), {'within' if fits else 'more than'} "
            f"{margin:.0%} of the {format_bytes(memory_per_worker)} a worker can get"
        )
    if requested == "auto":
        rows = "stream" if fits is False else "hold"
    else:
        rows = requested
    return RowsDecision(
        rows=rows,
        requested=requested,
        frames=frames,
        dim=dim,
        workers=parts,
        share_frames=share,
        hold_bytes=frames * held,
        hold_bytes_per_worker=per_worker,
        stream_bytes_per_worker=share * streamed,
        memory_per_worker=memory_per_worker,
        cluster_memory=cluster_memory,
        margin=margin,
        fits=fits,
        reason=numbers,
    )


def format_bytes(n: int | float | None) -> str:
    """Bytes as a person reads them: ``512 B``, ``1.5 GiB``."""
    if n is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
