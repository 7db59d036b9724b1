"""Writing one WebDataset tar so that it appears whole or not at all.

webdataset's ``TarWriter`` and lhotse's Shar writers write straight to the final name and
stamp members with the current time. This writer needs (1) each member's data offset for the
manifest, (2) headers with no time, user or host in them, so that reruns are byte-identical,
(3) a temporary name, fsync and rename, so that a killed writer never leaves a half-shard
under a final name, and (4) to drop a member whose source fails mid-copy without spoiling
the tar. Member headers come from the standard ``tarfile`` module (``TarInfo.tobuf``, PAX
format); data, padding and the end-of-archive blocks are written here, as ``tarfile``
writes them, without ``TarFile.addfile``'s per-member copies and small-buffer loop.
"""

from __future__ import annotations

import contextlib
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


def _header(name: str, size: int) -> bytes:
    """The member header ``tarfile`` would write for ``name`` (PAX format, fixed fields)."""
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) > 100 or not encoded.isascii() or size >= 8**11:
        return _tarfile_header(name, size)  # Needs PAX extended records: let tarfile do it.
    header = bytearray(_TEMPLATE)
    header[0 : len(encoded)] = encoded
    header[_SIZE] = b"%011o\0" % size
    header[_CHKSUM] = b"        "
    header[_CHKSUM] = b"%06o\0 " % sum(header)
    return bytes(header)


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
        self._raw = open(self.temp_path, "wb")  # Closed by commit() or abort().
        self._hash = hashlib.sha256()
        self._position = 0
        self._keys: set[str] = set()

    def _write(self, data: bytes) -> None:
        try:
            self._raw.write(data)
        except OSError as e:
            raise self._write_error(e) from e
        self._hash.update(data)
        self._position += len(data)

    def _copy(self, source: BinaryIO, size: int) -> str:
        """Copies exactly ``size`` bytes; returns their sha256."""
        member_hash = hashlib.sha256()
        remaining = size
        while remaining:
            chunk = source.read(
                min(remaining, _WHOLE_READ if size <= _WHOLE_READ else _COPY_BUFFER)
            )
            if not chunk:
                raise SourceReadError(f"source ended {remaining} bytes early")
            member_hash.update(chunk)
            self._write(chunk)
            remaining -= len(chunk)
        return member_hash.hexdigest()

    def add(self, key: str, flac: BinaryIO, size: int, meta: dict) -> Member:
        """Adds one sample: ``size`` bytes of FLAC read from ``flac``, and its json.

        Raises:
            ValueError: The key is not a valid member stem or was added before.
            SourceReadError: ``flac`` failed or ended early; nothing of this sample remains.
            WriteError: The tar could not be written; the shard must be aborted.
        """
        keys.check(key)
        if key in self._keys:
            raise ValueError(f"sample key {key!r} is already in {self.final_path}")
        start, hash_before = self._position, self._hash.copy()
        try:
            self._write(_header(f"{key}.flac", size))
            offset = self._position
            digest = self._copy(flac, size)
        except WriteError:
            raise
        except OSError as e:  # Roll the tar back to before this member.
            try:
                self._raw.seek(start)
                self._raw.truncate()
            except OSError as failed:
                raise self._write_error(failed) from failed
            self._position, self._hash = start, hash_before
            raise SourceReadError(f"copying {key}: {e}") from e
        self._write(_padding(size))
        body = json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()
        self._write(_header(f"{key}.json", len(body)) + body + _padding(len(body)))
        self._keys.add(key)
        return Member(offset, size, digest)

    def _finish_archive(self) -> None:
        # As tarfile.TarFile.close: two zero blocks, then zeros up to a whole record.
        self._write(b"\0" * (2 * tarfile.BLOCKSIZE))
        self._write(b"\0" * (-self._position % tarfile.RECORDSIZE))

    def commit(self, sync_dir: bool = True) -> tuple[int, str]:
        """Ends the archive, fsyncs it and renames it into place; returns size and sha256.

        Args:
            sync_dir: Also fsync the directory (callers that rename several files into one
                directory sync it once themselves).
        """
        self._finish_archive()
        try:
            self._raw.flush()
            os.fsync(self._raw.fileno())
            self._raw.close()
        except OSError as e:
            raise self._write_error(e) from e
        publish(self.temp_path, self.final_path, sync_dir=sync_dir)
        return self._position, self._hash.hexdigest()

    def abort(self) -> None:
        """Drops the temporary file; never raises (it runs while another error is raised,
        and on a full disk closing the file fails to flush it too)."""
        with contextlib.suppress(OSError):
            self._raw.close()
        with contextlib.suppress(OSError):
            storage.remove(self.temp_path)

    def _write_error(self, e: OSError) -> WriteError:
        """``e`` (ENOSPC names no file) as a :class:`WriteError` that names the tar."""
        return WriteError(e.errno, e.strerror, e.filename or self.temp_path)
