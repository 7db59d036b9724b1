"""Input storage: local paths, ``file://`` and any pyarrow filesystem URL (``s3://`` ...).

Local paths take the fast path (``os.scandir``, plain ``open``), which also keeps the
operating system's own errors (a broken symlink, a permission denied) distinguishable.
"""

from __future__ import annotations

import fnmatch
import functools
import io
import os
import posixpath
import urllib.parse
from collections.abc import Iterator
from typing import BinaryIO

import pyarrow.fs as pafs


def is_url(path: str) -> bool:
    """True for ``scheme://...`` locations other than ``file://``."""
    return "://" in path and not path.startswith("file://")


def local_path(path: str) -> str:
    """Strips ``file://`` and returns an absolute local path."""
    if path.startswith("file://"):
        path = path[len("file://") :]
    return os.path.abspath(os.path.expanduser(path))


def _remote(url: str) -> tuple[pafs.FileSystem, str]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in _BUCKET_SCHEMES:
        return pafs.FileSystem.from_uri(url)
    base = urllib.parse.urlunsplit(parts._replace(path=""))
    # One filesystem per bucket (and endpoint): creating an S3 client costs a round trip.
    fs = _filesystem(base, os.environ.get("AWS_ENDPOINT_URL", ""))
    return fs, (parts.netloc + parts.path).rstrip("/")


# Schemes whose paths are "bucket/key" (pyarrow's own convention for them).
_BUCKET_SCHEMES = ("s3", "gs", "gcs")


@functools.lru_cache(maxsize=64)
def _filesystem(base: str, endpoint: str) -> pafs.FileSystem:
    del endpoint  # Part of the cache key only: a new endpoint needs a new client.
    fs, _ = pafs.FileSystem.from_uri(base)
    return fs


def _scheme(url: str) -> str:
    return url.split("://", 1)[0] + "://"


def join(base: str, relative: str) -> str:
    """Joins a relative path onto a local path or URL (keeping a URL's query, which may carry
    options such as ``?endpoint_override=...``)."""
    if is_url(base):
        parts = urllib.parse.urlsplit(base)
        path = parts.path.rstrip("/") + "/" + relative.lstrip("/")
        return urllib.parse.urlunsplit(parts._replace(path=path))
    return os.path.join(base, relative)


def dirname(path: str) -> str:
    if is_url(path):
        parts = urllib.parse.urlsplit(path)
        return urllib.parse.urlunsplit(parts._replace(path=posixpath.dirname(parts.path)))
    return os.path.dirname(path)


def isdir(path: str) -> bool:
    if is_url(path):
        fs, p = _remote(path)
        return fs.get_file_info(p).type == pafs.FileType.Directory
    return os.path.isdir(local_path(path))


def exists(path: str) -> bool:
    if is_url(path):
        fs, p = _remote(path)
        return fs.get_file_info(p).type != pafs.FileType.NotFound
    return os.path.lexists(local_path(path))


def walk_files(root: str) -> Iterator[str]:
    """Yields every file under ``root`` (recursively) as a path relative to it, sorted.

    Broken symlinks are yielded too, so that they can be rejected with a reason rather than
    vanish. Directories are not followed through symlinks (no cycles).
    """
    if is_url(root):
        fs, base = _remote(root)
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
        rels = [posixpath.relpath(i.path, base) for i in infos if i.type == pafs.FileType.File]
        yield from sorted(rels)
        return
    base = local_path(root)
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, base)
        for name in sorted(filenames):
            yield name if rel_dir == "." else os.path.join(rel_dir, name)


def makedirs(path: str) -> None:
    """Creates a local directory and its parents; object stores have no directories."""
    if not is_url(path):
        os.makedirs(local_path(path), exist_ok=True)


def listdir(path: str) -> list[str]:
    """Names of the entries of a directory (or key prefix), sorted; [] when it is missing."""
    if is_url(path):
        fs, p = _remote(path)
        infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
        return sorted(posixpath.basename(i.path) for i in infos)
    try:
        return sorted(os.listdir(local_path(path)))
    except FileNotFoundError:
        return []


def glob(directory: str, pattern: str) -> list[str]:
    """Entries of ``directory`` whose name matches ``pattern`` (fnmatch, dot files included
    only by a pattern that starts with a dot), as full paths, sorted."""
    return [
        join(directory, name)
        for name in listdir(directory)
        if fnmatch.fnmatchcase(name, pattern) and (pattern.startswith(".") or name[0] != ".")
    ]


def remove(path: str) -> None:
    """Deletes a file; a missing one is not an error (another attempt removed it)."""
    if is_url(path):
        fs, p = _remote(path)
        try:
            fs.delete_file(p)
        except FileNotFoundError:
            pass
        return
    try:
        os.unlink(local_path(path))
    except FileNotFoundError:
        pass


def move(src: str, dst: str) -> None:
    """Renames ``src`` to ``dst`` on one filesystem (on an object store: copy, then delete)."""
    if is_url(dst):
        fs, s = _remote(src)
        _, d = _remote(dst)
        fs.move(s, d)
    else:
        os.replace(local_path(src), local_path(dst))


def upload(local: str, url: str) -> None:
    """Copies a local file to a remote location (multipart for large files)."""
    fs, p = _remote(url)
    with open(local, "rb") as src, fs.open_output_stream(p, metadata={}) as dst:
        while chunk := src.read(1 << 24):
            dst.write(chunk)


def write_bytes(url: str, data: bytes) -> None:
    """Writes a remote object in one request (objects appear whole or not at all)."""
    fs, p = _remote(url)
    with fs.open_output_stream(p, metadata={}) as f:
        f.write(data)


def read_parquet(path, **kwargs):
    """``pyarrow.parquet.read_table`` for a local path or a URL."""
    import pyarrow.parquet as pq

    if isinstance(path, str) and is_url(path):
        fs, p = _remote(path)
        return pq.read_table(p, filesystem=fs, **kwargs)
    return pq.read_table(path, **kwargs)


def dataset(path: str | list[str], **kwargs):
    """``pyarrow.dataset.dataset`` over a directory of Parquet files (hidden, temporary, files
    are ignored as pyarrow always does) or a list of them, local or remote."""
    import pyarrow.dataset as ds

    first = path[0] if isinstance(path, list) and path else path
    if isinstance(first, str) and is_url(first):
        fs = _remote(first)[0]
        paths = [_remote(p)[1] for p in path] if isinstance(path, list) else _remote(path)[1]
        return ds.dataset(paths, filesystem=fs, format="parquet", **kwargs)
    return ds.dataset(path, format="parquet", **kwargs)


def read_bytes(path: str) -> bytes:
    with open_input(path) as f:
        return f.read()


def load_npy(path: str, mmap: bool = False):
    """A ``.npy`` array; memory-mapped from local disk when asked, read whole from a URL."""
    import numpy as np

    if is_url(path):
        return np.load(io.BytesIO(read_bytes(path)))
    return np.load(local_path(path), mmap_mode="r" if mmap else None)


def open_input(path: str) -> BinaryIO:
    """Opens a file for binary reading (seekable), local or remote."""
    if is_url(path):
        fs, p = _remote(path)
        return fs.open_input_file(p)
    return open(local_path(path), "rb")


#: Read buffer of a remote file read front to back (:func:`open_stream`). Against a real S3
#: API a 2.4 MB tar of 40 members took 243 ranged GETs unbuffered (tarfile reads 10 KiB at a
#: time), 3 with this buffer.
STREAM_BUFFER = 1 << 20


def open_stream(path: str) -> BinaryIO:
    """Opens a file to read front to back (a tar streamed member by member), local or remote:
    a remote file gets a read buffer of :data:`STREAM_BUFFER` bytes, so small reads do not
    each become a request; a local file is buffered already."""
    if is_url(path):
        import pyarrow as pa

        return pa.input_stream(open_input(path), buffer_size=STREAM_BUFFER)
    return open(local_path(path), "rb")


def read_text(path: str) -> str:
    with open_input(path) as f:
        return f.read().decode("utf-8")


def file_size(path: str) -> int:
    """Size in bytes; ``FileNotFoundError`` when missing, local or remote."""
    if is_url(path):
        fs, p = _remote(path)
        info = fs.get_file_info(p)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(path)
        return info.size
    return os.stat(local_path(path)).st_size


class ReadAhead:
    """Asks the kernel to start reading files a window ahead of their use.

    ``posix_fadvise(WILLNEED)`` returns at once and the reads happen in the background, so
    a loop over many small files keeps a cold disk busy without threads. Remote and missing
    files are skipped: their reads (and errors) happen when they are used.

    Args:
        paths: The files in the order they will be used (``None`` for files to skip).
        window: How many files ahead to announce.
        head_only: Announce only the first 64 KiB (for probing headers).
    """

    _SPAN = 1 << 16

    def __init__(self, paths: list[str | None], window: int, head_only: bool = False):
        self._paths = paths
        self._window = window
        self._head_only = head_only
        self._next = 0
        self._enabled = hasattr(os, "posix_fadvise")

    def advance(self, current: int) -> None:
        """Call before using file ``current``: announces up to ``current + window``."""
        if not self._enabled:
            return
        end = min(len(self._paths), current + self._window + 1)
        while self._next < end:
            path = self._paths[self._next]
            self._next += 1
            if path is not None and not is_url(path):
                self._announce(local_path(path))

    def _announce(self, path: str) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            return
        try:
            os.posix_fadvise(fd, 0, self._SPAN if self._head_only else 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)
