"""Acoustic pieces in fairseq's HuBERT layout: ``{split}.tsv``, ``{split}.piece``,
``dict.piece.txt``, beside the audio the label export links (:mod:`units.labels.fairseq`).

Two kinds of label line:

- ``frames`` (default): one piece id per frame, each frame the id of the piece whose span
  holds it (``np.repeat(pieces, lengths)``), at the label set's frame rate. This is HuBERT-AP's
  target: HuBERT's masked prediction per frame, with pieces in place of units; fairseq's
  ``label_rate`` is the frame rate, as for ``.km`` files.
- ``pieces``: one id per piece, a variable-length sequence. fairseq's ``HubertDataset``
  takes such labels with ``label_rate=-1`` (no frame alignment, no cropping check); HuBERT's
  pre-training loss cannot use them (it aligns targets to frames), sequence losses can.

``dict.piece.txt`` lists the piece ids 1 .. vocab_size - 1: id 0 is sentencepiece's
``<unk>``, which the encoding never emits (:mod:`units.pieces.model`).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shards.core import storage
from shards.core.atomic import read_json, write_atomic
from shards.core.outputs import StageError
from shards.root import RootLayout

# The label export's helpers: the same split draw, audio links and read-back tsv lines.
from units.labels.fairseq import (
    SplitFiles,
    empty_split,
    link_audio,
    manifest_by_shard,
    splitter,
    tsv_lines,
)
from units.pieces.stage import pieces_layout

LEVELS = ("frames", "pieces")


def export_fairseq(
    root: str,
    name: str,
    percents: dict[str, float],
    *,
    by: str = "utterance",
    seed: int = 0,
    level: str = "frames",
) -> dict:
    """Writes ``ROOT/pieces/NAME/fairseq/``; returns what its ``export.json`` records.

    Args:
        root: Dataset root (local: fairseq reads local files).
        name: Finished pieces output.
        percents: Split names and their percents (adding up to 100).
        by: Draw splits by ``utterance`` or ``speaker`` (a hash of the seed and the key or
            speaker, as :func:`units.labels.fairseq.splitter`).
        seed: Seed of the split draw.
        level: ``frames`` or ``pieces`` (see the module docstring).

    Raises:
        StageError: An object-store root, no finished pieces, a bad ``level``, ``by`` or
            percents, or a split that would be empty (nothing is published then).
    """
    if level not in LEVELS:
        raise StageError(f"level {level!r}: use one of {', '.join(LEVELS)}")
    root = RootLayout(root).root
    if storage.is_url(root):
        raise StageError("fairseq reads local files: copy the root to a local disk first")
    layout = pieces_layout(root, name)
    meta = read_json(layout.path("meta.json"))
    if meta is None:
        raise StageError(f"no finished pieces {name!r} under {root}: run pipelines.pieces first")
    split_of = splitter(percents, by, seed)
    out = layout.path("fairseq")
    storage.makedirs(out)
    audio_dir = os.path.join(out, "audio")
    files = {split: SplitFiles(out, split, audio_dir, ["piece"]) for split in percents}
    try:
        # Shard by shard: memory holds one shard's pieces and rows, never the corpus's.
        for shard, rows in manifest_by_shard(RootLayout(root).manifest("utterances.parquet")):
            lines = _label_lines(layout.shard_path("pieces", shard), level)
            members = [r for r in rows if r["key"] in lines]
            if not members:
                continue
            link_audio(root, out, members)
            for row, line in zip(members, tsv_lines(audio_dir, members), strict=True):
                files[split_of(row)].add(line[len(audio_dir) :].lstrip("/"), [lines[row["key"]]])
        for split, written in files.items():
            if written.count == 0:
                raise empty_split(split, percents, sum(f.count for f in files.values()), by)
        for written in files.values():
            written.publish()
    finally:
        for written in files.values():
            written.discard()
    symbols = "".join(f"{i} 1\n" for i in range(1, meta["vocab_size"]))
    write_atomic(os.path.join(out, "dict.piece.txt"), symbols.encode())
    record = {
        "pieces": name,
        "labels": meta["labels"],
        "vocab_size": meta["vocab_size"],
        "level": level,
        "label_rate": meta["frame_rate"] if level == "frames" else -1,
        "sample_rate": 16000,
        "splits": {split: f.count for split, f in files.items()},
        "split_by": by,
        "seed": seed,
        "audio_dir": audio_dir,  # The first line of its tsvs: unitpipe relocate moves it.
    }
    write_atomic(os.path.join(out, "export.json"), json.dumps(record, indent=1).encode())
    return record


def _label_lines(path: str, level: str) -> dict[str, str]:
    """Each key's label line of one pieces shard, joined by Arrow kernels (a Python string
    per id would cost the driver minutes per million utterances)."""
    table = storage.read_parquet(path, columns=["key", "pieces", "lengths"])
    ids = table.column("pieces").combine_chunks()
    if level == "frames":  # Each piece id repeated over its frames.
        offsets = ids.offsets.to_numpy()
        lengths = pc.list_flatten(table.column("lengths")).to_numpy()
        ends = np.cumsum(lengths)
        frame_offsets = np.r_[0, ends][offsets - offsets[0]].astype(np.int32)
        flat = np.repeat(pc.list_flatten(ids).to_numpy(), lengths)
        ids = pa.ListArray.from_arrays(pa.array(frame_offsets), pa.array(flat))
    text = pc.binary_join(ids.cast(pa.list_(pa.string())), " ")
    return dict(zip(table.column("key").to_pylist(), text.to_pylist(), strict=True))
