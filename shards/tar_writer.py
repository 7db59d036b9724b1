"""Writing one WebDataset tar so that it appears whole or not at all.

webdataset's ``TarWriter`` and lhotse's Shar writers write straight to the final name and
stamp members with the current time; this writer is built on the standard ``tarfile``
module instead, because we need (1) each member's data offset for the manifest, (2) headers
with no time, user or host in them, so that reruns are byte-identical, and (3) a temporary
name, fsync and rename, so that a killed writer never leaves a half-shard under a final name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tarfile
import uuid
from typing import BinaryIO

from . import keys

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


class _HashingWriter(io.RawIOBase):
    def __init__(self, f: BinaryIO):
        self._f = f
        self.hash = hashlib.sha256()
        self.position = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.hash.update(b)
        n = self._f.write(b)
        self.position += n
        return n

    def tell(self) -> int:
        return self.position


class _HashingReader(io.RawIOBase):
    def __init__(self, f: BinaryIO):
        self._f = f
        self.hash = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self.hash.update(data)
        return data


def temp_prefix(final_path: str) -> str:
    """Temporary files of ``final_path`` start with this (hidden, so no glob of ``*.tar``
    picks them up)."""
    directory, name = os.path.split(final_path)
    return os.path.join(directory, f".{name}.tmp-")


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
        # The pid in the name tells which worker process is writing it (used by fault tests).
        self.temp_path = f"{temp_prefix(final_path)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._raw = open(self.temp_path, "wb")
        self._out = _HashingWriter(self._raw)
        self._tar = tarfile.open(
            fileobj=self._out,
            mode="w",
            format=tarfile.PAX_FORMAT,
            encoding="utf-8",
            copybufsize=_COPY_BUFFER,
        )
        self._keys: set[str] = set()

    def _info(self, name: str, size: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, _MTIME, _MODE
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    def add(self, key: str, flac: BinaryIO, size: int, meta: dict) -> Member:
        """Adds one sample: ``size`` bytes of FLAC read from ``flac``, and its json.

        Raises:
            ValueError: The key is not a valid member stem or was added before.
        """
        keys.check(key)
        if key in self._keys:
            raise ValueError(f"sample key {key!r} is already in {self.final_path}")
        self._keys.add(key)
        reader = _HashingReader(flac)
        info = self._info(f"{key}.flac", size)
        self._tar.addfile(info, reader)
        # addfile works on a copy of ``info``; the data ends at the tar's offset, padded to 512.
        offset = (
            self._tar.offset
            - ((size + tarfile.BLOCKSIZE - 1) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        )
        member = Member(offset, size, reader.hash.hexdigest())
        body = json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()
        self._tar.addfile(self._info(f"{key}.json", len(body)), io.BytesIO(body))
        return member

    def commit(self) -> tuple[int, str]:
        """Closes, fsyncs and renames the tar into place; returns its size and sha256."""
        self._tar.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        os.replace(self.temp_path, self.final_path)
        fsync_dir(os.path.dirname(self.final_path))
        return self._out.position, self._out.hash.hexdigest()

    def abort(self) -> None:
        """Drops the temporary file."""
        try:
            self._tar.close()
        except Exception:
            pass
        self._raw.close()
        if os.path.exists(self.temp_path):
            os.unlink(self.temp_path)


def fsync_dir(path: str) -> None:
    """Makes a rename in ``path`` durable."""
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes) -> None:
    """Writes a small file under a temporary name, fsyncs it and renames it into place."""
    tmp = f"{temp_prefix(path)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))
