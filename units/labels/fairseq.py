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

import hashlib
import io
import json
import os

import soundfile as sf

from shards.core import storage
from shards.core.atomic import read_json, write_atomic
from shards.core.outputs import StageError
from shards.root import RootLayout
from units.labels.model import label_layout


def _unit_interval(seed: int, value: str) -> float:
    digest = hashlib.sha256(f"{seed}:{value}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(rows: list[dict], percents: dict[str, float], by: str, seed: int) -> dict:
    """Rows per split name, in manifest order; ``percents`` must add up to 100.

    Raises:
        StageError: Percents that do not add up, an unknown ``by``, or an empty split.
    """
    if by not in ("utterance", "speaker"):
        raise StageError(f"split by {by!r}: use utterance or speaker")
    if abs(sum(percents.values()) - 100) > 1e-6 or any(p <= 0 for p in percents.values()):
        raise StageError(f"split percents {percents} must be positive and add up to 100")
    edges, total = [], 0.0
    for name, percent in percents.items():
        total += percent / 100
        edges.append((total, name))
    out: dict[str, list[dict]] = {name: [] for name in percents}
    for row in rows:
        u = _unit_interval(seed, row["speaker"] if by == "speaker" else row["key"])
        out[next((n for edge, n in edges if u < edge), edges[-1][1])].append(row)
    for name, members in out.items():
        if not members:
            raise StageError(
                f"split {name!r} ({percents[name]}%) would be empty with {len(rows)} "
                f"utterances split by {by}; give it more percent or use more data"
            )
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
    units = {
        r["key"]: r["units"]
        for r in storage.dataset(layout.path("units"))
        .to_table(columns=["key", "units"])
        .to_pylist()
    }
    manifest = storage.read_parquet(
        RootLayout(root).manifest("utterances.parquet"),
        columns=_EXPORT_COLUMNS,
    ).to_pylist()
    rows = [r for r in manifest if r["key"] in units]
    splits = assign_splits(rows, percents, by, seed)
    out = layout.path("fairseq")
    audio_dir = link_audio(root, out, rows)
    sources = _whole_sources(manifest) if audio == "source" else set()
    counts = {}
    for name, members in splits.items():
        km = [" ".join(str(u) for u in units[r["key"]]) for r in members]
        text = tsv_text(audio_dir, members, sources)
        write_atomic(os.path.join(out, f"{name}.tsv"), text.encode())
        write_atomic(os.path.join(out, f"{name}.km"), ("\n".join(km) + "\n").encode())
        counts[name] = len(members)
    write_atomic(
        os.path.join(out, "dict.km.txt"), "".join(f"{i} 1\n" for i in range(meta["k"])).encode()
    )
    record = {
        "labels": labels,
        "kmeans": meta["kmeans"],
        "k": meta["k"],
        "label_rate": meta["frame_rate"],
        "sample_rate": 16000,
        "splits": counts,
        "split_by": by,
        "seed": seed,
        "audio": audio,
        "unlabelled": len(manifest) - len(rows),
    }
    write_atomic(os.path.join(out, "export.json"), json.dumps(record, indent=1).encode())
    return record


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


def _whole_sources(manifest: list[dict]) -> set[str]:
    """Keys whose utterance is a whole local 16 kHz mono source file of its own."""
    per_source: dict[str, int] = {}
    for row in manifest:
        per_source[row["source"]] = per_source.get(row["source"], 0) + 1
    return {
        r["key"]
        for r in manifest
        if per_source[r["source"]] == 1
        and r["start"] == 0
        and r["original_sample_rate"] == 16000
        and r["original_channels"] == 1
        and os.path.isabs(r["source"])
    }


def tsv_text(audio: str, rows: list[dict], sources: set[str] = frozenset()) -> str:
    """A fairseq audio tsv, each line read back and decoded first.

    The first line is ``/`` when some lines are source files, else the audio directory;
    lines are ``NNNNNN.zip:OFFSET:SIZE<TAB>SAMPLES`` into the shard tars, or the source
    file's path for keys in ``sources`` that read back as the manifest's samples.
    """
    lines = []
    for row in rows:
        if row["key"] in sources and _source_reads_back(row):
            lines.append(f"{row['source']}\t{row['num_samples']}")
            continue
        suffix = ".tar" if storage.is_url(audio) else ".zip"  # See link_audio.
        line = f"{row['shard']}{suffix}:{row['offset']}:{row['size']}\t{row['num_samples']}"
        _check_reads_back(audio, line, row)
        lines.append(os.path.join(audio, line))
    # fairseq joins the first line with each path: one root that holds both kinds.
    top = "/" if sources else audio
    return "\n".join([top] + [line[len(top) :].lstrip("/") for line in lines]) + "\n"


def _source_reads_back(row: dict) -> bool:
    try:
        info = sf.info(row["source"])
    except (OSError, RuntimeError):
        return False
    return (info.frames, info.samplerate, info.channels) == (row["num_samples"], 16000, 1)


def _check_reads_back(audio_root: str, line: str, row: dict) -> None:
    """Reads a tsv line the way fairseq does (seek, read, decode) and checks the length."""
    path, offset, length = line.split("\t")[0].rsplit(":", 2)
    with storage.open_input(os.path.join(audio_root, path)) as f:
        f.seek(int(offset))
        data = f.read(int(length))
    frames = sf.info(io.BytesIO(data)).frames
    if frames != row["num_samples"]:
        raise RuntimeError(
            f"{row['key']}: {line!r} reads back {frames} samples, the manifest says "
            f"{row['num_samples']}"
        )
