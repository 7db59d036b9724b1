"""A label set as a Hugging Face ``datasets`` Parquet dataset: audio and units in one table.

Layout under ``OUT`` (default ``ROOT/labels/NAME/hf``), the Hub's own naming (what
``push_to_hub`` writes, so the directory can be uploaded as it is)::

    data/train-00000-of-00004.parquet ...   one file per audio shard, labelled utterances only
    export.json                             totals and lineage; written last

Columns: ``key``, ``audio`` (``{"bytes": the FLAC member as stored in the shard tar, not
re-encoded, "path": "KEY.flac"}``), ``units`` (uint16; ``units_1`` ... for a target with
several codebooks), ``frames``, ``speaker``. The Parquet schema carries the ``huggingface``
metadata that ``datasets`` writes, so that::

    from datasets import load_dataset
    ds = load_dataset("parquet", data_dir="ROOT/labels/NAME/hf", split="train")

types ``audio`` as ``Audio(sampling_rate=16000)`` by itself. The metadata names the ``audio``
feature only: ``datasets`` infers the other columns from their Arrow types, and a file whose
metadata says ``List`` (what datasets >= 4 writes for lists) cannot be loaded by datasets < 4
at all (huggingface/datasets#7739), while ``Audio`` and Arrow types load in both. Decoding
``Audio`` needs torchcodec (datasets >= 4); ``ds.cast_column("audio", Audio(decode=False))``
gives the FLAC bytes to decode with soundfile instead.

No copy of the audio: the shards are a WebDataset already, and the units one Parquet
dataset; join them by key (``streaming=True`` reads the tars without an Arrow cache)::

    audio = load_dataset("webdataset", data_files={"train": "ROOT/shards/*.tar"},
                         split="train", streaming=True)       # __key__, flac, json
    units = load_dataset("parquet", data_dir="ROOT/labels/NAME/units", split="train")

(Label-pass rejects are in the tars and not in the units: an inner join leaves them out.
``datasets`` encodes every ``Audio`` value through torchcodec, so without it give
``features`` with ``flac`` as ``Value("binary")``.)
"""

from __future__ import annotations

import os

import pyarrow as pa

from shards import flac
from shards.core import storage
from shards.core.atomic import ParquetStream, remove_temps
from shards.reader import read_member
from shards.root import RootLayout
from units.exports.common import (
    finished_meta,
    labelled_rows,
    lineage,
    skipped,
    totals,
    unit_columns,
    write_record,
)
from units.features.frames import SAMPLE_RATE
from units.schemas import list_column

FORMAT = "hf"

#: Rows per Parquet row group: datasets' own batch for audio (``config.
#: ARROW_RECORD_BATCH_SIZE_FOR_AUDIO_DATASETS`` in datasets 5, a name that has changed
#: across the versions the hf extra allows). FLAC of utterances up to ~30 s keeps a group
#: well under the 100 MB (``MAX_ROW_GROUP_SIZE``) that its readers expect; memory holds one.
ROW_GROUP = 100


def schema(codebooks: int = 1) -> pa.Schema:
    """The Arrow schema of the export's files, with the ``huggingface`` metadata that
    ``datasets`` writes for an ``Audio(sampling_rate=16000)`` column (see the module
    docstring for why it names that column only).

    Every field is nullable, as ``datasets`` makes them: ``Features.from_arrow_schema``
    takes a feature from the metadata only where its field equals the file's.
    """
    from datasets import Audio, Features

    audio = Features({"audio": Audio(sampling_rate=SAMPLE_RATE)}).arrow_schema
    units = [pa.field(c, pa.list_(pa.uint16())) for c in unit_columns({"codebooks": codebooks})]
    return pa.schema(
        [
            pa.field("key", pa.string()),
            audio.field("audio"),
            *units,
            pa.field("frames", pa.int32()),
            pa.field("speaker", pa.string()),
        ],
        metadata=audio.metadata,
    )


def data_path(out: str, shard: str, shards: int) -> str:
    """``OUT/data/train-00003-of-00004.parquet``: the Hub's name for shard ``000003``."""
    return storage.join(_where(out), f"data/train-{int(shard):05d}-of-{shards:05d}.parquet")


def export_shard(root: str, labels: str, shard: str, out: str) -> dict:
    """Writes one audio shard's labelled utterances as one Parquet file.

    The FLAC members are read from the tar at the manifest's offsets, checked to hold the
    manifest's sample count, and written in row groups of ``datasets``' size for audio
    (memory holds one row group); the file is renamed into place whole, so a rerun that
    finds it does nothing.

    Returns:
        ``shard``, ``skipped``, ``utterances`` (rows), ``unlabelled`` (audio members left
        out: label-pass rejects) and ``frames``.
    """
    root = RootLayout(root).root
    meta = finished_meta(root, labels)
    final = data_path(out, shard, len(meta["shards"]))
    if storage.exists(final):
        return skipped(root, labels, shard)
    rows, unlabelled = labelled_rows(root, labels, shard, meta)
    storage.makedirs(storage.dirname(final))
    remove_temps(final)  # What a killed attempt left.
    columns = unit_columns(meta)
    table_schema = schema(len(columns))
    tar = os.path.join(RootLayout(root).shards_dir, f"{shard}.tar")
    with storage.open_input(tar) as f, ParquetStream(final, table_schema, ROW_GROUP) as stream:
        for start in range(0, len(rows), ROW_GROUP):
            group = rows[start : start + ROW_GROUP]
            audio = [{"bytes": _member(f, tar, row), "path": f"{row['key']}.flac"} for row in group]
            table = {
                "key": [row["key"] for row in group],
                "audio": audio,
                **{c: list_column([row[c] for row in group], pa.uint16()) for c in columns},
                "frames": [len(row["units"]) for row in group],
                "speaker": [row["speaker"] for row in group],
            }
            stream.write(pa.Table.from_pydict(table, schema=table_schema))
        stream.publish()
    return {
        "shard": shard,
        "skipped": False,
        "utterances": len(rows),
        "unlabelled": unlabelled,
        "frames": sum(len(row["units"]) for row in rows),
    }


def _member(f, tar: str, row: dict) -> bytes:
    """The FLAC member's bytes, as stored; checked to hold the manifest's samples."""
    data = read_member(f, tar, row["offset"], row["size"])
    samples = flac.member_samples(data)[0]
    if samples != row["num_samples"]:
        raise RuntimeError(
            f"{tar}: {row['key']} holds {samples} samples, the manifest says {row['num_samples']}"
        )
    return data


def _where(out: str) -> str:
    """The output as a URL, or an absolute local path."""
    return out if storage.is_url(out) else storage.local_path(out)


def finish(root: str, labels: str, out: str, results: list[dict]) -> dict:
    """Writes ``OUT/export.json`` (the files, the totals and the line that loads them) last.

    Args:
        results: Every shard's :func:`export_shard` result, in shard order.
    """
    root, out = RootLayout(root).root, _where(out)
    meta = finished_meta(root, labels)
    record = dict(
        lineage(labels, meta),
        format=FORMAT,
        shards=len(results),
        **totals(results),
        data_files=storage.join(out, "data/train-*.parquet"),
        load=f'load_dataset("parquet", data_dir="{out}", split="train")',
    )
    return write_record(out, record)
