"""A label set as a NeMo tarred-audio dataset, over the shard tars themselves (no audio copy).

Layout under ``OUT`` (default ``ROOT/labels/NAME/nemo``), NeMo's own
(``scripts/speech_recognition/convert_to_tarred_audio_dataset.py`` writes the same names)::

    audio_0.tar ...                       symlinks to ROOT/shards/000000.tar ...
    sharded_manifests/manifest_0.json ... one JSON line per labelled utterance of that shard
    export.json                           the config values below and the totals; written last

A NeMo training config then reads (``export.json`` has both patterns)::

    model.train_ds.manifest_filepath: OUT/sharded_manifests/manifest__OP_0..3_CL_.json
    model.train_ds.tarred_audio_filepaths: OUT/audio__OP_0..3_CL_.tar
    model.train_ds.is_tarred: true
    model.train_ds.use_lhotse: true
    model.train_ds.skip_missing_manifest_entries: true

How NeMo (3.0) reads it, and so what each line holds:

- Lhotse reader (``use_lhotse: true``, ``nemo/collections/common/data/lhotse/nemo_adapters.py``
  ``LazyNeMoTarredIterator``): the shard id of each file comes from its name, by the regexes
  ``manifest[^/]*_(\\d+)[^/]*\\.json`` and ``audio[^/]*_(\\d+)[^/]*\\.tar``; both sets of ids
  must be equal (``_validate``). ``000000.tar`` matches neither, hence the ``audio_N.tar``
  links. Each tar member is matched to the manifest entries whose ``audio_filepath`` equals
  the member's name (``shard_manifest[tar_info.name]`` in ``_iter_sequential``), so
  ``audio_filepath`` is ``KEY.flac``. Our tars also hold ``KEY.json`` members and the audio
  of label-pass rejects, which have no entry: ``skip_missing_manifest_entries: true`` skips
  them (without it the reader raises "Mismatched entry between JSON manifest ...").
- Webdataset reader (``use_lhotse: false``, ``nemo/collections/asr/data/audio_to_text.py``
  ``_TarredAudioToTextDataset``, deprecated there): ``wds.rename(audio=VALID_FILE_FORMATS,
  key='__key__')``, ``wds.to_tuple('audio', 'key')``, then the entry is
  ``mapping[os.path.splitext(os.path.basename(key))[0]]``, where ``mapping`` is built from
  ``os.path.splitext(os.path.basename(audio_filepath))[0]``
  (``nemo/collections/common/parts/preprocessing/collections.py``, ``AudioText``): ``KEY`` on
  both sides, since keys are dot-free. Members without an entry are dropped (``_filter``).
  This reader does not care about file names: ``ROOT/shards/_OP_000000..000003_CL_.tar``
  works for it too (``braceexpand`` keeps zero padding).
- ``duration`` is seconds, written so that ``int(duration * 16000)`` is the utterance's
  sample count: NeMo reads ``f.read(int(duration * sample_rate))``
  (``nemo/collections/asr/parts/preprocessing/segment.py``, ``AudioSegment.from_file``), and
  ``num_samples / 16000`` rounds below the integer for 0.75% of lengths (1001 samples, say),
  which would lose the last sample.
- ``text`` is the units joined by spaces (a ``.km`` line): the Lhotse reader hands it to the
  model's tokenizer. ``token_labels`` is the same units as a list: NeMo's classic datasets
  take it as the target tokens as they are, without any tokenizer (``AudioText``: ``if
  token_labels is not None: text_tokens = token_labels``). A target with several codebooks
  adds ``token_labels_1`` ... (custom fields; ``cut.custom`` under Lhotse).
- ``shard_id`` is the file's shard id, as NeMo's converter writes it; ``speaker`` and
  ``key`` ride along (``cut.custom``).

Shard ids must run 0..N-1 with no gap, because the config names them with one brace range;
our audio shards are numbered that way and a finished label set has a label shard (maybe
empty: an empty manifest) for each, so :func:`finish` refuses anything else.

Object-store roots have no symlinks: the NeMo export wants a local root and output.
"""

from __future__ import annotations

import json
import math
import os

from shards.core import storage
from shards.core.atomic import remove_temps, temp_path, write_atomic
from shards.core.outputs import StageError
from shards.root import RootLayout
from units.exports.common import (
    finished_meta,
    labelled_rows,
    lineage,
    skipped,
    totals,
    write_record,
)
from units.features.frames import SAMPLE_RATE

FORMAT = "nemo"


def shard_id(shard: str) -> int:
    """NeMo's shard id of one of our shards: ``000003`` -> 3."""
    return int(shard)


def manifest_path(out: str, shard: str) -> str:
    return os.path.join(out, "sharded_manifests", f"manifest_{shard_id(shard)}.json")


def audio_link(out: str, shard: str) -> str:
    return os.path.join(out, f"audio_{shard_id(shard)}.tar")


def nemo_duration(num_samples: int) -> float:
    """Seconds, the smallest float with ``int(seconds * 16000) == num_samples`` (see the
    module docstring: NeMo truncates ``duration * sample_rate``)."""
    seconds = num_samples / SAMPLE_RATE
    if int(seconds * SAMPLE_RATE) < num_samples:
        seconds = math.nextafter(seconds, math.inf)
    return seconds


def check(root: str, labels: str, out: str) -> None:
    """What this export needs before any work: local paths (it links the shard tars).

    Raises:
        StageError: A root or output on an object store.
    """
    del labels
    for what, path in (("root", root), ("output", out)):
        if storage.is_url(path):
            raise StageError(
                f"the NeMo export links the shard tars under its output, and an object store "
                f"has no links: give a local {what} (copy the root: `aws s3 sync {root} "
                "/data/root`; the export reads the tars and labels only)"
            )


def export_shard(root: str, labels: str, shard: str, out: str) -> dict:
    """Writes one shard's ``audio_N.tar`` link and ``sharded_manifests/manifest_N.json``.

    The link first, then the manifest under a temporary name, renamed into place whole: a
    manifest in place means the shard is complete, and a rerun finds it and does nothing.

    Returns:
        ``shard``, ``skipped``, ``utterances`` (manifest lines), ``unlabelled`` (audio
        members left out: label-pass rejects) and ``frames``.
    """
    root = RootLayout(root).root
    check(root, labels, out)
    out = storage.local_path(out)
    target = RootLayout(root).shard_path(shard_id(shard))
    link, manifest = audio_link(out, shard), manifest_path(out, shard)
    if os.path.exists(manifest) and _links_to(link, target):
        return skipped(root, labels, shard)
    meta = finished_meta(root, labels)
    rows, unlabelled = labelled_rows(root, labels, shard, meta)
    storage.makedirs(os.path.dirname(manifest))
    _link(link, target)
    remove_temps(manifest)  # What a killed attempt left.
    text = "".join(json.dumps(_entry(row, shard), separators=(",", ":")) + "\n" for row in rows)
    write_atomic(manifest, text.encode())
    frames = sum(len(row["units"]) for row in rows)
    return {
        "shard": shard,
        "skipped": False,
        "utterances": len(rows),
        "unlabelled": unlabelled,
        "frames": frames,
    }


def _entry(row: dict, shard: str) -> dict:
    units = row["units"]
    entry = {
        "audio_filepath": f"{row['key']}.flac",
        "duration": nemo_duration(row["num_samples"]),
        "shard_id": shard_id(shard),
        "text": " ".join(map(str, units.tolist())),
        "token_labels": units.tolist(),
    }
    for column in row:
        if column.startswith("units_"):
            entry[f"token_labels_{column[len('units_') :]}"] = row[column].tolist()
    entry.update(key=row["key"], speaker=row["speaker"])
    return entry


def _links_to(link: str, target: str) -> bool:
    return os.path.islink(link) and os.path.realpath(link) == os.path.realpath(target)


def _link(link: str, target: str) -> None:
    """A relative symlink ``link`` -> ``target``, made under a temporary name and renamed
    over whatever was there (atomic: a reader never sees a half-made link)."""
    if _links_to(link, target):
        return
    storage.makedirs(os.path.dirname(link))
    remove_temps(link)
    temp = temp_path(link)
    os.symlink(os.path.relpath(target, os.path.dirname(link)), temp)
    os.replace(temp, link)


def finish(root: str, labels: str, out: str, results: list[dict]) -> dict:
    """Writes ``OUT/export.json`` (NeMo's two config patterns and the totals) last.

    Args:
        results: Every shard's :func:`export_shard` result, in shard order.

    Raises:
        StageError: Shard ids that do not run 0..N-1 (one brace range could not name them).
    """
    root = RootLayout(root).root
    out = storage.local_path(out)
    meta = finished_meta(root, labels)
    ids = [shard_id(r["shard"]) for r in results]
    if ids != list(range(len(ids))):
        raise StageError(
            f"NeMo names the shards of a dataset with one brace range, 0..N-1, and these are "
            f"{ids[:10]}...: export a label set of every shard of the root"
        )
    last = len(ids) - 1
    manifests = os.path.join(out, "sharded_manifests", f"manifest__OP_0..{last}_CL_.json")
    record = dict(
        lineage(labels, meta),
        format=FORMAT,
        shards=len(ids),
        **totals(results),
        manifest_filepath=manifests,
        tarred_audio_filepaths=os.path.join(out, f"audio__OP_0..{last}_CL_.tar"),
        skip_missing_manifest_entries=True,
        text_field="text",
        token_labels_field="token_labels",
    )
    return write_record(out, record)
