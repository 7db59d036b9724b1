"""Writing one planned shard: encode its inputs, write the tar and its manifest rows, commit.

This is the unit of work the distributed driver hands to one Ray task; it knows nothing of
Ray. A shard is committed when its commit record exists (written last, after the tar and
its manifest parts are in place), so a killed writer leaves nothing that a rerun trusts.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import io
import json
import logging
import os
import stat
from collections.abc import Iterator

import pyarrow as pa

from . import audio, keys, vad
from .audio import AudioError, EncodedFile
from .core import atomic, storage
from .core.atomic import (
    committed,
    fsync_dir,
    remove_temps,
    temp_path,
    unpublish,
    write_atomic,
    write_parquet_atomic,
)
from .plan import ShardingOptions
from .probe import OpenAhead, ProbeError, check_whole, open_fd, read_voice_activity
from .root import RootLayout
from .schemas import MIN_SAMPLES, REJECTS, SAMPLE_RATE, UTTERANCES, Reason, Stage, reject_row
from .tar_writer import ShardWriter, SourceReadError, WriteError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Output:
    """One sample ready to be added to the tar: its key, json and manifest row."""

    key: str
    meta: dict
    start: float
    end: float
    stream: int


def write_shard(root: str, index: int, rows: pa.Table | list[dict], opts: ShardingOptions) -> dict:
    """Writes shard ``index`` of the plan, unless it is already committed.

    Args:
        root: Dataset root.
        index: Shard number.
        rows: The plan rows of this shard, in order (``Plan.shards[index]``).
        opts: The options the plan was made with.

    Returns:
        The shard's commit record (``name``, ``samples``, ``seconds``, ``bytes``, ``sha256``,
        ``rejects``), with ``written`` telling whether this call wrote it.
    """
    layout = RootLayout(root)
    done = layout.read_commit(index)
    if done is not None:
        return dict(done, written=False)
    if isinstance(rows, pa.Table):  # One shard's rows: a dict each is fine here.
        rows = rows.to_pylist()
    # An earlier attempt at this shard died mid-write (Ray runs one attempt at a time).
    remove_temps(layout.shard_path(index))
    writer = ShardWriter(layout.shard_path(index))
    utterances, rejects = [], []
    data = None  # The commit record, once made.
    # Copying is waiting on storage: the kernel reads the next files while this one is
    # hashed and written.
    ahead = OpenAhead([r["source"] if r["passthrough"] else None for r in rows], _READ_AHEAD)
    try:
        for i, plan_row in enumerate(rows):
            ahead.advance(i)
            try:
                _write_input(
                    writer,
                    layout.shard_name(index),
                    plan_row,
                    opts,
                    utterances,
                    rejects,
                    ahead.take(i),
                )
            except WriteError:  # The tar itself cannot be written: the shard fails.
                raise
            except AudioError as e:
                rejects.append(
                    reject_row(plan_row["source"], Stage.SHARD, e.reason, str(e), plan_row["key"])
                )
            except Exception as e:  # One odd file must not fail its shard.
                log.warning("unexpected error on %s", plan_row["source"], exc_info=True)
                rejects.append(
                    reject_row(
                        plan_row["source"],
                        Stage.SHARD,
                        Reason.UNEXPECTED,
                        f"{type(e).__name__}: {e}",
                        plan_row["key"],
                    )
                )
        ahead.close()
        nbytes, sha256 = writer.finish()
        record = {
            "name": layout.shard_name(index),
            "samples": len(utterances),
            "seconds": sum(u["duration"] for u in utterances),
            "bytes": nbytes,
            "sha256": sha256,
            "rejects": len(rejects),
        }
        data = json.dumps(record, sort_keys=True).encode()
        _commit(layout, index, writer, utterances, rejects, data)
    except BaseException:
        ahead.close()
        if data is not None and committed(layout.commit_path(index), data):
            raise  # Stopped after its commit: the shard is whole, and stays.
        writer.abort()
        unpublish(
            layout.shard_path(index), layout.utterances_part(index), layout.rejects_part(index)
        )
        raise
    return dict(record, written=True)


def _commit(
    layout: RootLayout,
    index: int,
    writer: ShardWriter,
    utterances: list[dict],
    rejects: list[dict],
    record: bytes,
) -> None:
    """Makes the finished tar, its manifest parts and last its commit record durable and
    visible (DESIGN.md, invariant 2).

    Each fsync waits on the disk, not on this process, so those that may happen together
    do, and the file system commits them together: the tar, the two parts and the record
    under its temporary name; then the directories that the tar and the parts were renamed
    into; then, with everything it trusts in place, the record's rename and its directory.
    """
    if storage.is_url(layout.root):  # No fsync: uploads, in order, the record last.
        write_parquet_atomic(layout.utterances_part(index), utterances, UTTERANCES)
        write_parquet_atomic(layout.rejects_part(index), rejects, REJECTS)
        writer.sync()
        writer.publish()
        write_atomic(layout.commit_path(index), record)
        return
    final = layout.commit_path(index)
    temp = temp_path(final)
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            synced = [
                pool.submit(writer.sync),
                pool.submit(_write_synced, temp, record),
                pool.submit(
                    write_parquet_atomic,
                    layout.utterances_part(index),
                    utterances,
                    UTTERANCES,
                    sync_dir=False,
                ),
                pool.submit(
                    write_parquet_atomic,
                    layout.rejects_part(index),
                    rejects,
                    REJECTS,
                    sync_dir=False,
                ),
            ]
            for done in synced:
                done.result()
            writer.publish(sync_dir=False)
            shards_dir = pool.submit(fsync_dir, layout.shards_dir)
            fsync_dir(layout.parts_dir)
            shards_dir.result()
        os.replace(temp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temp)
        raise
    atomic.fsync_dir(layout.parts_dir)  # Looked up here, so that tests can stop it.


def _write_synced(path: str, data: bytes) -> None:
    """Writes ``data`` to a new file and fsyncs it; a failure leaves no file behind."""
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(path)
        raise


#: Pass-through files announced to the kernel ahead of copying them.
_READ_AHEAD = 16

#: Pass-through files up to this size are read into memory whole.
_WHOLE_FILE = 8 << 20


def _base_meta(row: dict) -> dict:
    meta = {
        "source": row["source"],
        "speaker": row["speaker"],
        "group": row["group"],
        "original_sample_rate": row["sample_rate"],
        "original_channels": row["channels"],
        "original_format": f"{row['format']}/{row['subtype']}",
        "sample_rate": SAMPLE_RATE,
    }
    if row["text"] is not None:
        meta["text"] = row["text"]
    return meta


def _manifest_row(
    shard: str,
    key: str,
    member,
    num_samples: int,
    row: dict,
    start: float,
    end: float,
    passthrough: bool,
) -> dict:
    return {
        "key": key,
        "shard": shard,
        "offset": member.offset,
        "size": member.size,
        "num_samples": num_samples,
        "sample_rate": SAMPLE_RATE,
        "duration": num_samples / SAMPLE_RATE,
        "source": row["source"],
        "start": start,
        "end": end,
        "speaker": row["speaker"],
        "group": row["group"],
        "sha256": member.sha256,
        "original_sample_rate": row["sample_rate"],
        "original_channels": row["channels"],
        "passthrough": passthrough,
    }


def _write_input(
    writer: ShardWriter,
    shard: str,
    row: dict,
    opts: ShardingOptions,
    utterances: list,
    rejects: list,
    fd: int | None = None,
) -> None:
    """Adds one planned input; ``fd``, when given, is the pass-through source opened ahead
    (closed here)."""
    duration = row["frames"] / row["sample_rate"]
    if row["passthrough"]:
        _pass_through(writer, shard, row, opts, utterances, duration, fd)
        return
    if fd is not None:
        os.close(fd)
    with EncodedFile() as enc:
        outputs = list(_encode(enc, row, opts, duration, rejects))
        # Only now, with the whole input decoded, does any of it enter the tar.
        for out in outputs:
            stream, size = enc.open_stream(out.stream)
            member = writer.add(out.key, stream, size, out.meta)
            utterances.append(
                _manifest_row(
                    shard, out.key, member, out.meta["num_samples"], row, out.start, out.end, False
                )
            )


def _pass_through(
    writer: ShardWriter,
    shard: str,
    row: dict,
    opts: ShardingOptions,
    utterances: list,
    duration: float,
    fd: int | None = None,
) -> None:
    """Copies a 16 kHz mono 16-bit FLAC into the shard as it is, once it is known whole.

    ``fd``, when given, is the file opened ahead (:class:`shards.probe.OpenAhead`); it is
    closed here.
    """
    try:
        with _open_source(row["source"], fd) as opened:
            size = _size(opened)
            if size != row["file_bytes"]:
                raise AudioError(
                    Reason.IO_ERROR,
                    f"file changed since it was planned ({row['file_bytes']} -> {size} bytes)",
                )
            meta = dict(
                _base_meta(row),
                key=row["key"],
                num_samples=row["frames"],
                start=0.0,
                end=duration,
                passthrough=True,
            )
            if size <= _WHOLE_FILE:
                # Small files are read once, into memory: that read serves the check, the
                # hashes and the copy, which queues the same bytes object (no copy).
                data = _read_whole(opened, size)
                f = io.BytesIO(data)  # Shares data's buffer while it is only read.
                check_whole(f, size)
                if opts.verify:
                    audio.verify_decodes(f)
                del f
                if len(data) < size:  # It shrank since it was measured.
                    raise SourceReadError(
                        f"copying {row['key']}: source ended {size - len(data)} bytes early"
                    )
                member = writer.add_bytes(row["key"], data, meta)
            else:  # Larger ones are checked by seeking and then streamed.
                check_whole(opened, size)
                if opts.verify:
                    audio.verify_decodes(opened)
                    opened.seek(0)
                member = writer.add(row["key"], opened, size, meta)
    except ProbeError as e:
        raise AudioError(e.reason, str(e)) from e
    except WriteError:
        raise
    except SourceReadError as e:
        raise AudioError(Reason.IO_ERROR, str(e)) from e
    except PermissionError as e:
        raise AudioError(Reason.PERMISSION_DENIED, str(e)) from e
    except OSError as e:
        raise AudioError(Reason.IO_ERROR, f"read failed: {e}") from e
    utterances.append(
        _manifest_row(shard, row["key"], member, row["frames"], row, 0.0, duration, True)
    )


def _open_source(source: str, fd: int | None):
    """The source as a binary file: ``fd`` when it is a regular file opened ahead, else
    opened here (where an error says what is wrong)."""
    if fd is not None:
        try:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
        except OSError:
            regular = False
        if regular:  # O_NONBLOCK, set to open it, means nothing to a regular file.
            return open_fd(fd, source)
        os.close(fd)
    return storage.open_input(source)


def _size(opened) -> int:
    """The size of an open source; leaves it at its start."""
    if isinstance(opened, (io.FileIO, io.BufferedReader)):
        return os.fstat(opened.fileno()).st_size
    size = opened.seek(0, io.SEEK_END)
    opened.seek(0)
    return size


def _read_whole(opened, size: int) -> bytes:
    """The first ``size`` bytes of a source at its start; fewer only where it ends early (the
    check and the copy then say so). A short read that is not the end is read on."""
    data = opened.read(size)
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = opened.read(size - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _encode(
    enc: EncodedFile, row: dict, opts: ShardingOptions, duration: float, rejects: list
) -> Iterator[_Output]:
    """Encodes the samples of one input into ``enc`` and yields what describes them."""
    base = _base_meta(row)
    if opts.segment == "none":
        enc.begin()
        for block in audio.iter_16k(row["source"]):
            enc.write(block)
        n = enc.end()
        if n < MIN_SAMPLES:
            raise AudioError(Reason.TOO_SHORT, f"{n} samples at 16 kHz, fewer than {MIN_SAMPLES}")
        meta = dict(base, key=row["key"], num_samples=n, start=0.0, end=duration, passthrough=False)
        yield _Output(row["key"], meta, 0.0, duration, 0)
        return

    segments, how = _segments(row, opts, duration)
    if not segments:
        raise AudioError(Reason.NO_SPEECH, f"no voice activity found ({how['vad']})")
    ranges = [(i, a, b) for i, seg in enumerate(segments) for a, b in seg.sample_ranges()]
    counts = [0] * len(segments)
    streams = [-1] * len(segments)
    current = -1
    position = 0
    j = 0
    for block in audio.iter_16k(row["source"]):
        end = position + len(block)
        k = j
        while k < len(ranges) and ranges[k][1] < end:
            seg, a, b = ranges[k]
            lo, hi = max(a, position), min(b, end)
            if hi > lo:
                if seg != current:  # Segments are in time order: at most one is open.
                    if current >= 0:
                        counts[current] = enc.end()
                    streams[seg] = len(enc.streams)
                    enc.begin()
                    current = seg
                enc.write(block[lo - position : hi - position])
            k += 1
        while j < len(ranges) and ranges[j][2] <= end:
            j += 1
        position = end
    if current >= 0:
        counts[current] = enc.end()
    for i, seg in enumerate(segments):
        key = keys.segment_key(row["key"], i)
        if counts[i] < MIN_SAMPLES:  # Encoded (or not even reached) but never stored.
            rejects.append(
                reject_row(
                    row["source"],
                    Stage.SHARD,
                    Reason.TOO_SHORT,
                    f"segment {i} ({seg.start:.3f}-{seg.end:.3f} s) has {counts[i]} samples, "
                    f"fewer than {MIN_SAMPLES}",
                    key,
                )
            )
            continue
        meta = dict(
            base,
            key=key,
            num_samples=counts[i],
            start=seg.start,
            end=seg.end,
            passthrough=False,
            segment=dict(how, index=i, intervals=[list(x) for x in seg.intervals]),
        )
        yield _Output(key, meta, seg.start, seg.end, streams[i])


def _segments(row: dict, opts: ShardingOptions, duration: float):
    if row["sidecar"] is not None:
        try:  # The plan keeps the sidecar's path, not its intervals.
            intervals = read_voice_activity(row["sidecar"])
        except ProbeError as e:
            raise AudioError(e.reason, str(e)) from e
        if intervals is not None:
            clipped, clipping = vad.clip(intervals, duration)
            how = {
                "vad": "sidecar",
                "clipped_intervals": clipping.clipped,
                "dropped_intervals": clipping.dropped,
            }
            return vad.group(clipped, opts.target_seconds), how
    detector = vad.Detector(opts.vad)
    for block in audio.iter_16k(row["source"]):
        detector.feed(block)
    intervals, _ = vad.clip(detector.intervals(), duration)
    return vad.group(intervals, opts.target_seconds), {"vad": opts.vad}
