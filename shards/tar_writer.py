"""Writing one WebDataset tar so that it appears whole or not at all.

webdataset's ``TarWriter`` and lhotse's Shar writers write straight to the final name and
stamp members with the current time. This writer needs (1) each member's data offset for the
manifest, (2) headers with no time, user or host in them, so that reruns are byte-identical,
(3) a temporary name, fsync and rename, so that a killed writer never leaves a half-shard
under a final name, and (4) to drop a member whose source fails mid-copy without spoiling
the tar. Member headers come from the standard ``tarfile`` module (``TarInfo.tobuf``, PAX
format); data, padding and the end-of-archive blocks are written here, as ``tarfile``
writes them, without ``TarFile.addfile``'s per-member copies and small-buffer loop.

Writing is one pass over each member's bytes: they are hashed (member and shard digests)
as they are queued, and queued pieces (headers, data, padding, json) go to the file a few
members (256 KiB) at a time in one ``os.writev`` call, without being copied into a buffer
first. Data the writer has written is handed to the kernel's writeback as it goes
(``sync_file_range`` on Linux), so that the fsync of :meth:`ShardWriter.commit` finds
little left to write.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import hashlib
import json
import os
import tarfile
from typing import BinaryIO

from . import keys
from .core import storage
from .core.atomic import publish, temp_path

#: Sources up to this size are read whole (one read, one hash update, one write).
_WHOLE_READ = 8 << 20
_COPY_BUFFER = 1 << 20

#: Queued bytes (or pieces) that make the writer hand its queue to the kernel (one writev):
#: a few small members a call, written while their bytes are still in the CPU's caches.
_FLUSH_BYTES = 256 << 10
_FLUSH_PIECES = 512  # Below IOV_MAX (1024 on Linux).

#: Written bytes that make the writer start the kernel's writeback of them; a multiple of
#: the page size, as is every range handed over (the page being appended to is never
#: under writeback, which would make the next write wait for the disk).
_WRITEBACK_BYTES = 8 << 20

#: The json members' encoder, made once (``json.dumps`` with options makes one per call):
#: sorted keys, no spaces, UTF-8 as it is.
_JSON = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":"))

#: Fixed header fields: member headers hold nothing about when or by whom they were written.
_MTIME = 0
_MODE = 0o444


@dataclasses.dataclass(frozen=True)
class Member:
    """Where one member's data lies in its tar."""

    offset: int
    size: int
    sha256: str


class SourceReadError(OSError):
    """The source ended early or failed while it was copied; the member was rolled back."""


class WriteError(OSError):
    """Writing the tar itself failed (a full disk, a read-only file system): the shard
    cannot be finished, whatever its inputs. Never an input's fault, so never a reject."""


def _padding(size: int) -> bytes:
    return b"\0" * (-size % tarfile.BLOCKSIZE)


def _tarfile_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, _MTIME, _MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


# A header that tarfile made once, to patch name, size and checksum into: building a PAX
# header field by field costs ~50 us in tarfile, a third of a small file's whole cost.
_TEMPLATE = bytearray(_tarfile_header("x", 0))
_TEMPLATE[0:100] = bytes(100)
_NAME, _SIZE, _CHKSUM = slice(0, 100), slice(124, 136), slice(148, 156)
# The checksum is the sum of the header's bytes with its own field as spaces: the template's
# part is summed once here, the name's and the size's per header.
_TEMPLATE[_SIZE] = bytes(12)
_TEMPLATE[_CHKSUM] = b"        "
_TEMPLATE_SUM = sum(_TEMPLATE)
_MODE_TO_SIZE = bytes(_TEMPLATE[100:124])
_SIZE_TO_CHKSUM = bytes(_TEMPLATE[136:148])
_AFTER_CHKSUM = bytes(_TEMPLATE[156:])


def _header(name: str, size: int) -> bytes:
    """The member header ``tarfile`` would write for ``name`` (PAX format, fixed fields)."""
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) > 100 or not encoded.isascii() or size >= 8**11:
        return _tarfile_header(name, size)  # Needs PAX extended records: let tarfile do it.
    size_field = b"%011o\0" % size
    chksum = b"%06o\0 " % (_TEMPLATE_SUM + sum(encoded) + sum(size_field))
    return b"".join(
        (
            encoded,
            bytes(100 - len(encoded)),
            _MODE_TO_SIZE,
            size_field,
            _SIZE_TO_CHKSUM,
            chksum,
            _AFTER_CHKSUM,
        )
    )


def _load_sync_file_range():
    """libc's ``sync_file_range`` (Linux), or ``None`` where there is none.

    Python's ``os`` does not expose it; it starts writeback of a range without waiting, so
    the disk writes a shard while the writer hashes the next members.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    call.restype = ctypes.c_int
    return call


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


class ShardWriter:
    """Writes ``KEY.flac`` + ``KEY.json`` samples into a tar, committed atomically.

    Args:
        final_path: Where the finished tar goes; nothing is written there before
            :meth:`commit`.

    Example:
        >>> w = ShardWriter("/tmp/doc-000000.tar")
        >>> m = w.add("utt1", io.BytesIO(b"fLaC..."), 7, {"key": "utt1"})
        >>> w.commit()[0] > 0
        True
    """

    def __init__(self, final_path: str):
        self.final_path = final_path
        self.temp_path = temp_path(final_path)
        # Closed by commit() or abort().
        self._fd = os.open(self.temp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC)
        self._hash = hashlib.sha256()
        self._position = 0  # Bytes of the tar so far, queued ones included.
        self._queue: list[bytes | memoryview] = []  # Pieces not yet written, in order.
        self._queued = 0
        self._written = 0  # Bytes in the file.
        self._synced = 0  # Bytes whose writeback was started.
        self._keys: set[str] = set()
        self._buffer: bytearray | None = None  # For sources copied a chunk at a time.

    def _put(self, data: bytes | memoryview) -> None:
        """Queues ``data`` (not copied: it must not change until written) and hashes it."""
        self._hash.update(data)
        self._queue.append(data)
        self._queued += len(data)
        self._position += len(data)
        if self._queued >= _FLUSH_BYTES or len(self._queue) >= _FLUSH_PIECES:
            self._flush()

    def _flush(self) -> None:
        """Writes the queue; a short write is continued."""
        queue, self._queue = self._queue, []
        total, self._queued = self._queued, 0
        try:
            while queue:
                n = os.writev(self._fd, queue)
                self._written += n
                total -= n
                if not total:
                    break
                while n >= len(queue[0]):
                    n -= len(queue.pop(0))
                if n:
                    queue[0] = memoryview(queue[0])[n:]
        except OSError as e:
            raise self._write_error(e) from e
        if _SYNC_FILE_RANGE is not None and self._written - self._synced >= _WRITEBACK_BYTES:
            end = self._written - self._written % _WRITEBACK_BYTES  # Whole pages only.
            # A hint only: its failure changes nothing that fsync does not check.
            _SYNC_FILE_RANGE(self._fd, self._synced, end - self._synced, _SYNC_FILE_RANGE_WRITE)
            self._synced = end

    def _copy(self, source: BinaryIO, size: int) -> str:
        """Copies exactly ``size`` bytes; returns their sha256. A small source is read
        whole and queued as it is; a large one (or the rest of a short read) goes through
        one reused buffer, written out after each chunk."""
        member_hash = hashlib.sha256()
        if size <= _WHOLE_READ:
            data = source.read(size)
            if len(data) == size:  # One read, one hash update, queued as it is.
                member_hash.update(data)
                self._put(data)
                return member_hash.hexdigest()
            if len(data) > size:
                raise SourceReadError(f"source returned {len(data)} bytes where {size} were asked")
            # A short read: the rest, in chunks; reading on tells an error from an early end.
            member_hash.update(data)
            self._put(data)
            self._flush()
            remaining = size - len(data)
        else:
            remaining = size
        if self._buffer is None:
            self._buffer = bytearray(_COPY_BUFFER)
        view = memoryview(self._buffer)
        while remaining:
            chunk = view[: min(remaining, _COPY_BUFFER)]
            got = _read_into(source, chunk)
            if not got:
                raise SourceReadError(f"source ended {remaining} bytes early")
            member_hash.update(chunk[:got])
            self._put(chunk[:got])
            self._flush()  # The buffer is read into again next.
            remaining -= got
        return member_hash.hexdigest()

    def add(self, key: str, flac: BinaryIO, size: int, meta: dict) -> Member:
        """Adds one sample: ``size`` bytes of FLAC read from ``flac``, and its json.

        Raises:
            ValueError: The key is not a valid member stem or was added before.
            SourceReadError: ``flac`` failed or ended early; nothing of this sample remains.
            WriteError: The tar could not be written; the shard must be aborted.
        """
        self._check_key(key)
        if size > _WHOLE_READ:
            self._flush()  # Chunks are written as they are read: the queue goes first.
        start, hash_before = self._position, self._hash.copy()
        queue_before, queued_before = len(self._queue), self._queued
        try:
            self._put(_header(f"{key}.flac", size))
            offset = self._position
            digest = self._copy(flac, size)
        except WriteError:
            raise
        except OSError as e:  # Roll the tar back to before this member.
            if self._written > start - queued_before:  # Some of it is in the file.
                try:
                    os.ftruncate(self._fd, start)
                    os.lseek(self._fd, start, os.SEEK_SET)
                except OSError as failed:
                    raise self._write_error(failed) from failed
                self._written = start
                self._synced = min(self._synced, start)
                self._queue, self._queued = [], 0
            else:
                del self._queue[queue_before:]
                self._queued = queued_before
            self._position, self._hash = start, hash_before
            raise SourceReadError(f"copying {key}: {e}") from e
        self._finish_member(key, size, meta)
        return Member(offset, size, digest)

    def add_bytes(self, key: str, data: bytes, meta: dict) -> Member:
        """Adds one sample whose FLAC bytes are in memory (``data`` is not copied, and must
        not change afterwards); the same tar as :meth:`add` with ``io.BytesIO(data)``.

        Raises:
            ValueError: The key is not a valid member stem or was added before.
            WriteError: The tar could not be written; the shard must be aborted.
        """
        self._check_key(key)
        size = len(data)
        self._put(_header(f"{key}.flac", size))
        offset = self._position
        self._put(data)
        digest = hashlib.sha256(data).hexdigest()
        self._finish_member(key, size, meta)
        return Member(offset, size, digest)

    def _check_key(self, key: str) -> None:
        keys.check(key)
        if key in self._keys:
            raise ValueError(f"sample key {key!r} is already in {self.final_path}")

    def _finish_member(self, key: str, size: int, meta: dict) -> None:
        """The data's padding and the json member, as one queued piece."""
        body = _JSON.encode(meta).encode()
        self._put(_padding(size) + _header(f"{key}.json", len(body)) + body + _padding(len(body)))
        self._keys.add(key)

    def _finish_archive(self) -> None:
        # As tarfile.TarFile.close: two zero blocks, then zeros up to a whole record.
        end = self._position + 2 * tarfile.BLOCKSIZE
        self._put(bytes(2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE)))
        self._flush()

    def commit(self, sync_dir: bool = True) -> tuple[int, str]:
        """Ends the archive, fsyncs it and renames it into place; returns size and sha256.

        The same as :meth:`finish`, :meth:`sync` and :meth:`publish` in turn.

        Args:
            sync_dir: Also fsync the directory (callers that rename several files into one
                directory sync it once themselves).
        """
        done = self.finish()
        self.sync()
        self.publish(sync_dir=sync_dir)
        return done

    def finish(self) -> tuple[int, str]:
        """Ends the archive and writes out what is queued; returns the tar's size and
        sha256, which no longer change. Nothing is durable or visible yet."""
        self._finish_archive()
        return self._position, self._hash.hexdigest()

    def sync(self) -> None:
        """Fsyncs and closes the finished tar (see :meth:`finish`)."""
        try:
            os.fsync(self._fd)
            fd, self._fd = self._fd, -1
            os.close(fd)
        except OSError as e:
            raise self._write_error(e) from e

    def publish(self, sync_dir: bool = True) -> None:
        """Renames the synced tar into place (see :meth:`sync`)."""
        publish(self.temp_path, self.final_path, sync_dir=sync_dir)

    def abort(self) -> None:
        """Drops the temporary file; never raises (it runs while another error is raised,
        and on a full disk closing the file fails to flush it too)."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(OSError):
            storage.remove(self.temp_path)

    def _write_error(self, e: OSError) -> WriteError:
        """``e`` (ENOSPC names no file) as a :class:`WriteError` that names the tar."""
        return WriteError(e.errno, e.strerror, e.filename or self.temp_path)


def _read_into(source: BinaryIO, chunk: memoryview) -> int:
    """Reads into ``chunk`` (``readinto`` where the source has it); returns the bytes read."""
    try:
        return source.readinto(chunk) or 0
    except (AttributeError, NotImplementedError):  # io.RawIOBase's is abstract.
        pass
    data = source.read(len(chunk))
    if len(data) > len(chunk):
        raise SourceReadError(f"source returned {len(data)} bytes where {len(chunk)} were asked")
    chunk[: len(data)] = data
    return len(data)
