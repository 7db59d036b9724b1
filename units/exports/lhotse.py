"""A label set as a Lhotse Shar CutSet, for lhotse / icefall / k2 trainers.

One audio shard becomes one Shar shard of the same number (shard ``000003`` is Shar shard 3),
written by one call of :func:`export_shard`; :func:`finish` writes ``export.json`` last.
Layout under the export directory ``OUT``::

    shar/cuts.000003.jsonl.gz     a MonoCut per labelled utterance: id = our key, the whole
                                  recording, a supervision with the speaker when known
    shar/recording.000003.tar     KEY.flac + KEY.json (the Recording)
    shar/units.000003.tar         KEY.npy (uint16, one unit per frame) + KEY.json
    shar/units_1.000003.tar ...   the further codebooks of a multi-codebook target
    commits/000003.json           written last: the Shar shard is complete
    export.json                   written by finish, last of all

``shar/`` holds nothing but Shar files: ``CutSet.from_shar(in_dir=...)`` takes every entry
of its directory for a field (``export.json`` would be read as a field named ``export``, a
temporary file as a field named ``""``), so the records and temporary files live beside it.
Only utterances with labels are exported; the label pass's rejects are counted as
``unlabelled``.

Audio: the FLAC bytes of our shards are carried as they are, never decoded or re-encoded.
lhotse's ``SharWriter`` cannot do that: its recording field always runs ``cut.load_audio()``
and encodes again (``format="original"`` re-encodes to the source's format too), so the
recording tar is written with lhotse's own ``TarWriter``, member for member what its
``AudioTarWriter`` writes (the audio, then the Shar placeholder of the Recording as JSON).
``cut.load_audio()`` decodes those bytes with lhotse's default audio backend (libsndfile
first), exactly our samples (:func:`shards.reader.decode_member`), float32 in [-1, 1): both
scale a 16-bit sample by 2**-15.

Units: a ``TemporalArray`` with ``frame_shift = 1 / frame_rate`` (0.01 s for 100 Hz MFCC
labels, 0.02 s for 50 Hz SSL layers, 0.04 s for 25 Hz BEST-RQ), written by lhotse's
``ArrayTarWriter`` as ``.npy``; ``cut.load_units()`` returns the stored uint16 units,
``cut.load_units_1()`` the second codebook's, and so on. A cut's span covers all its frames:
the frame contracts give at most ``num_samples / hop`` frames (checked per utterance).

Example:
    >>> from lhotse import CutSet  # doctest: +SKIP
    >>> cuts = CutSet.from_shar(in_dir="/data/ls/labels/km500/lhotse/shar")  # doctest: +SKIP
    >>> for cut in cuts:  # doctest: +SKIP
    ...     cut.id, cut.load_audio().shape, cut.load_units().shape, cut.units.frame_shift
    ('103-1240-0000', (1, 225360), (1408,), 0.01)
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os

import numpy as np

from shards import flac
from shards.core import storage
from shards.core.atomic import (
    committed,
    fsync_dir,
    publish,
    read_json,
    remove_all_temps,
    remove_temps,
    temp_path,
    unpublish,
    write_atomic,
)
from shards.core.outputs import StageError
from shards.reader import iter_members
from shards.root import RootLayout
from units.exports.common import finished_meta, labelled_rows, unit_columns
from units.labels.model import label_layout

FORMAT = "lhotse"

#: How to get the optional dependency.
INSTALL = "pip install 'unitpipe[lhotse]'"

SAMPLE_RATE = 16_000


def missing_lhotse(error: ImportError) -> ImportError:
    """The error raised when lhotse cannot be imported: it says how to install it."""
    return ImportError(
        f"the lhotse export needs lhotse, which could not be imported ({error}): {INSTALL}"
    )


def _lhotse():
    try:
        import lhotse
    except ImportError as e:
        raise missing_lhotse(e) from e
    return lhotse


def shar_dir(out: str) -> str:
    """The directory of the Shar files, what ``CutSet.from_shar(in_dir=...)`` reads."""
    return os.path.join(out, "shar")


def commit_path(out: str, shard: str) -> str:
    return os.path.join(out, "commits", f"{shard}.json")


def unit_fields(meta: dict) -> list[str]:
    """The unit fields of a label set: its unit columns (``units``, ``units_1`` ...), each a
    Shar field of the same name."""
    return unit_columns(meta)


def shar_files(shard: str, fields: list[str]) -> dict[str, str]:
    """Each Shar field's file name for our shard ``shard``, the cuts last (they are published
    last). The names are lhotse's ``SharWriter``'s, numbered ``int(shard)``."""
    suffix = f".{int(shard):06d}"
    names = {"recording": f"recording{suffix}.tar"}
    names.update({field: f"{field}{suffix}.tar" for field in fields})
    names["cuts"] = f"cuts{suffix}.jsonl.gz"
    return names


def export_shard(root: str, labels: str, shard: str, out: str) -> dict:
    """Writes the Shar files of audio shard ``shard`` under ``OUT/shar`` and commits them.

    A shard whose commit record is in place, for the same label shard, with every file at
    its recorded size is not written again. A shard without labelled utterances commits no
    Shar files.

    Args:
        root: The dataset root (local or ``s3://``).
        labels: The label set's name (``ROOT/labels/NAME``, finished).
        shard: Our shard's name (``"000003"``).
        out: The export directory, a local path.

    Returns:
        ``shard``, ``shar_shard`` (its number), ``cuts``, ``seconds`` (of audio exported),
        ``unlabelled`` (the shard's utterances without labels) and ``skipped``.

    Raises:
        ImportError: lhotse is not installed (:data:`INSTALL`).
        StageError: Unfinished labels, an uncommitted label shard, a remote ``out``.
        ValueError: Labels that disagree with their audio shard or manifest.
    """
    _lhotse()
    root = RootLayout(root).root
    layout = label_layout(root, labels)
    meta = finished_meta(root, labels)
    source = layout.read_commit(shard)
    if source is None:
        raise StageError(
            f"label shard {shard} of {labels!r} is not committed: finish the label pass "
            f"(`python -m pipelines.label --root {root} --name {labels} ...`) first"
        )
    out = _local_out(out)
    fields = unit_fields(meta)
    names = shar_files(shard, fields)
    finals = {field: os.path.join(shar_dir(out), name) for field, name in names.items()}
    record = read_json(commit_path(out, shard))
    if record is not None and record["labels"] == source and _whole(out, record):
        return dict(_summary(record), skipped=True)

    rows, unlabelled = labelled_rows(root, labels, shard, meta)
    record = {"shard": shard, "shar_shard": int(shard), "labels": source, "unlabelled": unlabelled}
    storage.makedirs(shar_dir(out))
    storage.makedirs(os.path.dirname(commit_path(out, shard)))
    # Redone from nothing: no record vouches for files being rewritten, and no file of an
    # earlier attempt (or of other labels) stays beside the new ones.
    storage.remove(commit_path(out, shard))
    unpublish(*finals.values())
    for final in finals.values():
        remove_temps(final)  # Left by a killed attempt.
    writer = _SharShardWriter(finals, fields, 1.0 / float(meta["frame_rate"]))
    published: list[str] = []
    data = None
    try:
        audio = os.path.join(RootLayout(root).shards_dir, f"{shard}.tar")
        wanted = {row["key"]: row for row in rows}
        for key, member in iter_members(audio):
            row = wanted.pop(key, None)
            if row is not None:
                writer.add(key, member, row, [row[field] for field in fields])
        if wanted:
            raise ValueError(
                f"label shard {shard} of {labels!r} has keys that are not in {audio}: "
                f"{sorted(wanted)[:5]}; the labels belong to another root"
            )
        published = writer.publish()
        record.update(cuts=writer.cuts, seconds=writer.seconds, files=writer.sizes)
        data = json.dumps(record, sort_keys=True).encode()
        write_atomic(commit_path(out, shard), data)
    except BaseException:
        writer.discard()
        if data is None or not committed(commit_path(out, shard), data):
            unpublish(*published)  # No Shar file stays visible without its commit record.
        raise
    return dict(_summary(record), skipped=False)


def finish(root: str, labels: str, out: str, results: list[dict]) -> dict:
    """Writes ``OUT/export.json`` once every shard is exported, and returns it.

    Args:
        root: The dataset root.
        labels: The label set's name.
        out: The export directory.
        results: What :func:`export_shard` returned for each shard of the label set.

    Raises:
        StageError: ``results`` that miss a shard of the label set or name another, or files
            in ``OUT/shar`` that no shard wrote (lhotse would take them for fields).
    """
    lhotse = _lhotse()
    root = RootLayout(root).root
    meta = finished_meta(root, labels)
    out = _local_out(out)
    by_shard = {r["shard"]: r for r in results}
    missing = [s for s in meta["shards"] if s not in by_shard]
    extra = sorted(set(by_shard) - set(meta["shards"]))
    if missing or extra:
        raise StageError(
            f"the lhotse export of {labels!r} has results for {len(by_shard)} shards, the "
            f"label set {len(meta['shards'])}: missing {missing[:5]}, not in it {extra[:5]}; "
            "run export_shard for every shard of the label set"
        )
    directory = shar_dir(out)
    remove_all_temps(directory)  # No writer is alive once every shard has its result.
    fields = unit_fields(meta)
    ordered = [by_shard[s] for s in sorted(meta["shards"])]
    expected = {n for r in ordered if r["cuts"] for n in shar_files(r["shard"], fields).values()}
    stray = sorted(set(storage.listdir(directory)) - expected)
    if stray:
        raise StageError(
            f"{directory} holds files no shard of this export wrote: {stray[:5]}; "
            "CutSet.from_shar would read them as fields: remove them"
        )
    seconds = 0.0
    for result in ordered:  # In shard order: the same sum on every run.
        seconds += result["seconds"]
    record = {
        "format": FORMAT,
        "labels": labels,
        "target": meta.get("target", "kmeans"),
        "kmeans": meta.get("kmeans"),
        "bestrq": meta.get("bestrq"),
        "k": meta["k"],
        "codebooks": meta.get("codebooks", 1),
        "fields": ["recording", *fields],
        "frame_rate": meta["frame_rate"],
        "frame_shift": 1.0 / float(meta["frame_rate"]),
        "sample_rate": SAMPLE_RATE,
        "audio": "flac bytes of the shards, as stored",
        "shar_dir": "shar",
        "shards": len(ordered),
        "shar_shards": sum(1 for r in ordered if r["cuts"]),
        "cuts": sum(r["cuts"] for r in ordered),
        "unlabelled": sum(r["unlabelled"] for r in ordered),
        "hours": seconds / 3600,
        "lhotse": lhotse.__version__,
    }
    write_atomic(os.path.join(out, "export.json"), json.dumps(record, indent=1).encode())
    return record


def _local_out(out: str) -> str:
    if storage.is_url(out):
        raise StageError(
            f"the lhotse export writes to a local directory, not {out}: write it locally and "
            "copy it (lhotse reads Shar files from URLs too)"
        )
    out = storage.local_path(out)
    if "%" in out:
        # lhotse's tar writers read a "%" in their path as a shard-number pattern.
        raise StageError(f"the lhotse export directory {out!r} holds a '%': choose another")
    return out


def _whole(out: str, record: dict) -> bool:
    for name, size in record["files"].items():
        try:
            if os.stat(os.path.join(shar_dir(out), name)).st_size != size:
                return False
        except FileNotFoundError:
            return False
    return True


def _summary(record: dict) -> dict:
    names = ("shard", "shar_shard", "cuts", "seconds", "unlabelled")
    return {name: record[name] for name in names}


class _SharShardWriter:
    """One Shar shard's files, built under temporary names and published together.

    Args:
        finals: Each field's final path (``recording``, the unit fields, ``cuts`` last).
        fields: The unit fields.
        frame_shift: Seconds between unit frames.
    """

    def __init__(self, finals: dict[str, str], fields: list[str], frame_shift: float):
        from lhotse.shar.writers import ArrayTarWriter, TarWriter

        self.finals, self.fields, self.frame_shift = finals, fields, frame_shift
        self.temps = {field: temp_path(final) for field, final in finals.items()}
        self.cuts, self.seconds = 0, 0.0
        self.sizes: dict[str, int] = {}
        # shard_size=None: one file per writer, at exactly the path given.
        self._audio = TarWriter(self.temps["recording"], shard_size=None)
        self._units = {
            f: ArrayTarWriter(self.temps[f], shard_size=None, compression="numpy") for f in fields
        }
        self._raw = open(self.temps["cuts"], "wb")  # Closed by publish() or discard().
        # lhotse's JSONL writer stamps the time into the gzip header; mtime=0 and no file
        # name keep a redone shard byte-identical.
        self._cuts = gzip.GzipFile(filename="", mode="wb", fileobj=self._raw, mtime=0)

    def add(self, key: str, data: bytes, row: dict, units: list[np.ndarray]) -> None:
        """Writes one utterance: its FLAC bytes, its units and its cut."""
        from lhotse import AudioSource, Recording, SupervisionSegment, fastcopy
        from lhotse.array import Array, TemporalArray, seconds_to_frames
        from lhotse.shar.utils import to_shar_placeholder

        samples, rate, channels = flac.member_samples(data)
        if (samples, rate, channels) != (row["num_samples"], SAMPLE_RATE, 1):
            raise ValueError(
                f"{key}: the FLAC member holds {samples} samples at {rate} Hz in {channels} "
                f"channels, the manifest says {row['num_samples']} at {SAMPLE_RATE} Hz mono"
            )
        recording = Recording(
            id=key,
            sources=[AudioSource(type="memory", channels=[0], source=data)],
            sampling_rate=SAMPLE_RATE,
            num_samples=samples,
            duration=samples / SAMPLE_RATE,
        )
        cut = recording.to_cut()
        frames = len(units[0])
        if seconds_to_frames(cut.duration, self.frame_shift) < frames:
            # lhotse loads a temporal array over the cut's span: it would drop the rest.
            raise ValueError(
                f"{key}: {frames} unit frames at {self.frame_shift} s outlast its "
                f"{cut.duration} s of audio; the labels' frame rate is wrong"
            )
        placeholder = to_shar_placeholder(recording, cut)
        self._audio.write(f"{key}.flac", io.BytesIO(data))  # The bytes as stored.
        self._audio.write(f"{key}.json", _json_line(placeholder.to_dict()), count=False)
        custom = {}
        for field, values in zip(self.fields, units, strict=True):
            array = TemporalArray(
                array=Array(storage_type="shar", storage_path="", storage_key="", shape=[frames]),
                temporal_dim=0,
                frame_shift=self.frame_shift,
                start=0,
            )
            self._units[field].write(key, np.ascontiguousarray(values), manifest=array)
            custom[field] = to_shar_placeholder(array)
        supervisions = []
        if row["speaker"] is not None:
            supervisions.append(
                SupervisionSegment(
                    id=key,
                    recording_id=key,
                    start=0.0,
                    duration=cut.duration,
                    channel=0,
                    speaker=row["speaker"],
                )
            )
        cut = fastcopy(cut, recording=placeholder, supervisions=supervisions, custom=custom)
        # As lhotse's SequentialJsonlWriter writes a cut.
        line = json.dumps(cut.to_dict(), ensure_ascii=False) + "\n"
        self._cuts.write(line.encode("utf-8"))
        self.cuts += 1
        self.seconds += cut.duration

    def _close(self) -> None:
        self._audio.close()
        for writer in self._units.values():
            writer.close()
        self._cuts.close()
        self._raw.close()

    def publish(self) -> list[str]:
        """Closes and fsyncs the files, renames them into place (the cuts last) and returns
        the published paths; a shard without cuts publishes nothing."""
        self._close()
        if self.cuts == 0:
            self.discard()
            return []
        published = []
        for field, final in self.finals.items():
            temp = self.temps[field]
            with open(temp, "rb") as f:
                os.fsync(f.fileno())
            publish(temp, final, sync_dir=False)
            published.append(final)
            self.sizes[os.path.basename(final)] = os.stat(final).st_size
        fsync_dir(os.path.dirname(published[0]))
        return published

    def discard(self) -> None:
        """Closes and removes the temporary files; never raises."""
        with contextlib.suppress(Exception):  # The error being raised is the one to see.
            self._close()
        for temp in self.temps.values():
            storage.remove(temp)


def _json_line(manifest: dict) -> io.BytesIO:
    """A manifest as lhotse's tar writers store it: one JSON line."""
    return io.BytesIO((json.dumps(manifest) + "\n").encode("utf-8"))
