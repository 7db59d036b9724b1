"""Labels in fairseq's HuBERT layout: ``{split}.tsv``, ``{split}.km``, ``dict.km.txt``.

Audio is never copied. fairseq's ``parse_path`` reads ``FILE:OFFSET:LENGTH`` as the bytes at
that offset, and ``HubertDataset.get_audio`` only insists that such a FILE ends in ``.zip``
before it seeks and reads (``read_from_stored_zip``). Our FLAC members are stored whole and
contiguous inside the shard tars, so ``fairseq/audio/NNNNNN.zip`` is a symlink to
``shards/NNNNNN.tar`` and every tsv line points at its member's bytes. Each written line is
read back that way and decoded before the export is committed.

Splits (any number, by utterance or by speaker) are drawn from a hash of the seed and the
key or speaker, so they do not depend on order; all of them use the same k-means.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import soundfile as sf

from shards import flac
from shards.core import storage
from shards.core.atomic import PendingFile, read_json, write_atomic
from shards.core.outputs import StageError
from shards.root import RootLayout
from units.labels.model import label_layout


def _unit_interval(seed: int, value: str) -> float:
    digest = hashlib.sha256(f"{seed}:{value}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def splitter(percents: dict[str, float], by: str, seed: int) -> Callable[[dict], str]:
    """The split of a row (``key``, and ``speaker`` when ``by="speaker"``): a hash of the seed
    and the key or speaker, so it depends on no other row and no order.

    Raises:
        StageError: Percents that do not add up to 100, or an unknown ``by``.
    """
    if by not in ("utterance", "speaker"):
        raise StageError(f"split by {by!r}: use utterance or speaker")
    if abs(sum(percents.values()) - 100) > 1e-6 or any(p <= 0 for p in percents.values()):
        raise StageError(f"split percents {percents} must be positive and add up to 100")
    edges, total = [], 0.0
    for name, percent in percents.items():
        total += percent / 100
        edges.append((total, name))
    field = "speaker" if by == "speaker" else "key"

    def split_of(row: dict) -> str:
        u = _unit_interval(seed, row[field])
        return next((n for edge, n in edges if u < edge), edges[-1][1])

    return split_of


def empty_split(name: str, percents: dict[str, float], rows: int, by: str) -> StageError:
    return StageError(
        f"split {name!r} ({percents[name]}%) would be empty with {rows} "
        f"utterances split by {by}; give it more percent or use more data"
    )


def assign_splits(rows: list[dict], percents: dict[str, float], by: str, seed: int) -> dict:
    """Rows per split name, in manifest order; ``percents`` must add up to 100.

    Raises:
        StageError: Percents that do not add up, an unknown ``by``, or an empty split.
    """
    split_of = splitter(percents, by, seed)
    out: dict[str, list[dict]] = {name: [] for name in percents}
    for row in rows:
        out[split_of(row)].append(row)
    for name, members in out.items():
        if not members:
            raise empty_split(name, percents, len(rows), by)
    return out


#: What to do with labels on object storage that fairseq should train on.
REMOTE_ROOT_HINT = (
    "copy the root to a local disk (`aws s3 sync {root} /data/root`) and run the export "
    "there: `unitpipe label --root /data/root --kmeans KMEANS --name NAME --fairseq-splits "
    "...` labels nothing again (every shard is committed) and writes the fairseq files"
)


def export(
    root: str,
    labels: str,
    percents: dict[str, float],
    *,
    by: str = "utterance",
    seed: int = 0,
    audio: str = "shards",
) -> dict:
    """Writes ``ROOT/labels/LABELS/fairseq/``; returns what ``export.json`` records.

    Args:
        audio: ``shards``: every tsv line points into a shard tar. ``source``: an utterance
            that is a whole 16 kHz mono source file that still reads back as the same
            number of samples is written as that file's path (fairseq reads it directly),
            the others as ``shards``.
    """
    if audio not in ("shards", "source"):
        raise StageError(f"audio {audio!r}: use shards or source")
    root = RootLayout(root).root
    if storage.is_url(root):
        raise StageError(f"fairseq reads local files: {REMOTE_ROOT_HINT.format(root=root)}")
    layout = label_layout(root, labels)
    meta = read_json(layout.path("meta.json"))
    if meta is None:
        raise StageError(f"no finished labels {labels!r} under {root}: run pipelines.label first")
    split_of = splitter(percents, by, seed)
    manifest = RootLayout(root).manifest("utterances.parquet")
    whole = _whole_sources(manifest) if audio == "source" else None
    out = layout.path("fairseq")
    storage.makedirs(out)
    audio_dir = os.path.join(out, "audio")
    top = "/" if whole is not None and whole.any() else audio_dir  # See tsv_text.
    # A target with several codebooks (BEST-RQ's variants) gives one label file per codebook:
    # fairseq's HuBERT task reads them together with task.labels='["km","km1",...]'.
    columns = ["units"] + [f"units_{c}" for c in range(1, meta.get("codebooks", 1))]
    extensions = ["km"] + [f"km{c}" for c in range(1, len(columns))]
    files = {name: SplitFiles(out, name, top, extensions) for name in percents}
    total = labelled = 0
    try:
        # Shard by shard, in manifest order: memory holds one shard's units and rows, never
        # the corpus's (at Libri-light scale that would be hundreds of GB on the driver).
        for shard, rows in manifest_by_shard(manifest):
            sources = set()
            if whole is not None:
                flags = whole[total : total + len(rows)]
                sources = {r["key"] for r, own in zip(rows, flags, strict=True) if own}
            total += len(rows)
            units_path = layout.shard_path("units", shard)
            table = storage.read_parquet(units_path, columns=["key", *columns])
            units = [_km_lines(table, column) for column in columns]
            members = [r for r in rows if r["key"] in units[0]]
            if not members:
                continue
            link_audio(root, out, members)
            for row, line in zip(members, tsv_lines(audio_dir, members, sources), strict=True):
                km = [lines[row["key"]] for lines in units]
                files[split_of(row)].add(line[len(top) :].lstrip("/"), km)
            labelled += len(members)
        for name, split in files.items():
            if split.count == 0:
                raise empty_split(name, percents, labelled, by)
        for split in files.values():
            split.publish()
    finally:
        for split in files.values():
            split.discard()
    counts = {name: split.count for name, split in files.items()}
    for extension in extensions:
        dictionary = "".join(f"{i} 1\n" for i in range(meta["k"])).encode()
        write_atomic(os.path.join(out, f"dict.{extension}.txt"), dictionary)
    record = {
        "labels": labels,
        "target": meta.get("target", "kmeans"),
        "kmeans": meta.get("kmeans"),
        "bestrq": meta.get("bestrq"),
        "label_files": extensions,
        "k": meta["k"],
        "label_rate": meta["frame_rate"],
        "sample_rate": 16000,
        "splits": counts,
        "split_by": by,
        "seed": seed,
        "audio": audio,
        "audio_dir": audio_dir,
        "unlabelled": total - labelled,
    }
    write_atomic(os.path.join(out, "export.json"), json.dumps(record, indent=1).encode())
    return record


def _km_lines(table: pa.Table, column: str = "units") -> dict[str, str]:
    """Each key's ``.km`` line (its ``column``'s units joined by spaces), formatted by Arrow
    kernels: a
    30 s utterance has 1,500 units, and formatting them one Python string at a time would
    cost the driver about 15 minutes per million utterances."""
    text = pc.binary_join(table.column(column).cast(pa.list_(pa.string())), " ")
    return dict(zip(table.column("key").to_pylist(), text.to_pylist(), strict=True))


def link_audio(root: str, directory: str, rows: list[dict]) -> str:
    """``DIRECTORY/audio/NNNNNN.zip`` symlinks to the shard tars the rows live in; returns
    the audio directory (the first line of a fairseq tsv).

    An object store has no symlinks: there the tsv points at ``ROOT/shards`` itself.
    """
    if storage.is_url(directory):
        return RootLayout(root).shards_dir
    audio = os.path.join(directory, "audio")
    storage.makedirs(audio)
    for shard in sorted({r["shard"] for r in rows}):
        link = os.path.join(audio, f"{shard}.zip")
        if not os.path.lexists(link):
            target = os.path.join(RootLayout(root).shards_dir, f"{shard}.tar")
            os.symlink(os.path.relpath(target, audio), link)
    return audio


_EXPORT_COLUMNS = [
    "key", "shard", "offset", "size", "num_samples", "speaker", "source", "start",
    "original_sample_rate", "original_channels",
]  # fmt: skip


def _whole_sources(manifest: str) -> np.ndarray:
    """For each manifest row, in order: is its utterance a whole local 16 kHz mono source
    file of its own? One byte per utterance on the driver, worked out by Arrow kernels."""
    columns = ["source", "start", "original_sample_rate", "original_channels"]
    table = storage.read_parquet(manifest, columns=columns)
    source = table.column("source")
    per_source = table.select(["source"]).group_by("source").aggregate([("source", "count")])
    uses = per_source.column("source_count").take(
        pc.index_in(source, value_set=per_source.column("source"))
    )
    whole = pc.and_(
        pc.and_(pc.equal(uses, 1), pc.equal(table.column("start"), 0)),
        pc.and_(
            pc.equal(table.column("original_sample_rate"), 16000),
            pc.equal(table.column("original_channels"), 1),
        ),
    )
    # An absolute path on POSIX, as os.path.isabs says: it starts with "/".
    whole = pc.and_(whole, pc.starts_with(source, "/"))
    return pc.fill_null(whole, False).to_numpy(zero_copy_only=False)


class SplitFiles:
    """One split's ``.tsv`` and label files (``.km``, and ``.km1`` ... for more codebooks),
    streamed line by line into pending files and published together when the export is
    whole."""

    def __init__(self, directory: str, name: str, top: str, extensions: list[str]):
        self.count = 0
        self._tsv, *self._labels = (
            PendingFile(os.path.join(directory, f"{name}.{ext}"), "w", encoding="utf-8")
            for ext in ("tsv", *extensions)
        )
        self._tsv.file.write(top + "\n")

    def add(self, tsv_line: str, label_lines: list[str]) -> None:
        self._tsv.file.write(tsv_line + "\n")
        for pending, line in zip(self._labels, label_lines, strict=True):
            pending.file.write(line + "\n")
        self.count += 1

    def publish(self) -> None:
        for pending in (self._tsv, *self._labels):
            pending.publish()

    def discard(self) -> None:
        """Removes what was not published; never raises."""
        for pending in (self._tsv, *self._labels):
            pending.discard()


def manifest_by_shard(path: str) -> Iterator[tuple[str, list[dict]]]:
    """The manifest's rows, one audio shard at a time, in manifest order (the manifest holds
    each shard's rows together, in shard order: :func:`shards.manifest.finalize`)."""
    shard, rows, seen = None, [], set()
    parquet = pq.ParquetFile(storage.open_input(path))
    for batch in parquet.iter_batches(batch_size=65_536, columns=_EXPORT_COLUMNS):
        for row in batch.to_pylist():
            if row["shard"] != shard:
                if shard is not None:
                    yield shard, rows
                if row["shard"] in seen:
                    raise RuntimeError(f"{path}: the rows of shard {row['shard']} are not together")
                shard, rows = row["shard"], []
                seen.add(shard)
            rows.append(row)
    if shard is not None:
        yield shard, rows


def tsv_text(audio: str, rows: list[dict], sources: set[str] = frozenset()) -> str:
    """A fairseq audio tsv, each line read back and decoded first.

    The first line is ``/`` when some lines are source files, else the audio directory;
    lines are ``NNNNNN.zip:OFFSET:SIZE<TAB>SAMPLES`` into the shard tars, or the source
    file's path for keys in ``sources`` that read back as the manifest's samples.
    """
    # fairseq joins the first line with each path: one root that holds both kinds.
    top = "/" if sources else audio
    lines = [line[len(top) :].lstrip("/") for line in tsv_lines(audio, rows, sources)]
    return "\n".join([top] + lines) + "\n"


def tsv_lines(audio: str, rows: list[dict], sources: set[str] = frozenset()) -> list[str]:
    """Each row's tsv line with its full path, read back the way fairseq reads it. Rows of
    one shard share one open file (rows come shard by shard)."""
    lines = []
    suffix = ".tar" if storage.is_url(audio) else ".zip"  # See link_audio.
    with contextlib.ExitStack() as stack:
        open_path, handle = None, None
        for row in rows:
            if row["key"] in sources and _source_reads_back(row):
                lines.append(f"{row['source']}\t{row['num_samples']}")
                continue
            member = f"{row['shard']}{suffix}"
            if member != open_path:
                stack.close()
                open_path = member
                handle = stack.enter_context(storage.open_input(os.path.join(audio, member)))
            line = f"{member}:{row['offset']}:{row['size']}\t{row['num_samples']}"
            _check_reads_back(handle, line, row)
            lines.append(os.path.join(audio, line))
    return lines


def _source_reads_back(row: dict) -> bool:
    try:
        info = sf.info(row["source"])
    except (OSError, RuntimeError):
        return False
    return (info.frames, info.samplerate, info.channels) == (row["num_samples"], 16000, 1)


def _check_reads_back(handle, line: str, row: dict) -> None:
    """Reads a tsv line the way fairseq does (seek, read, decode) and checks the length."""
    _, offset, length = line.split("\t")[0].rsplit(":", 2)
    handle.seek(int(offset))
    data = handle.read(int(length))
    if len(data) != int(length):
        raise RuntimeError(
            f"{row['key']}: {line!r} reads {len(data)} bytes, the shard ends before the member"
        )
    # A FLAC's STREAMINFO says its length in 42 bytes; libsndfile, which fairseq reads with,
    # answers the same for what the shards hold, at ~270 us a line (45 min for 10 million).
    # It stays the judge of anything else (an unknown length, another format).
    frames = flac.member_samples(data)[0]
    if frames != row["num_samples"]:
        raise RuntimeError(
            f"{row['key']}: {line!r} reads back {frames} samples, the manifest says "
            f"{row['num_samples']}"
        )
