"""Reading shards back: iterate a root in shard order, or fetch one sample by key.

Members are read into memory and decoded there; nothing is ever extracted to disk, and a
member whose name is not a plain ``KEY.ext`` (a path, a link, a device) is refused, so no
tar can reach outside its archive.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tarfile
from collections.abc import Iterator

import numpy as np
import pyarrow.compute as pc
import soundfile as sf

from . import flac, keys
from .core import storage
from .root import RootLayout

try:  # dr_flac, as built into miniaudio's wheels: the fast FLAC decoder (see _decode_flac).
    import miniaudio as _miniaudio

    if not hasattr(_miniaudio.lib, "ma_dr_flac_open_memory"):  # Older builds: drflac_*.
        _miniaudio = None
except ImportError:  # Not installed: libsndfile decodes every member.
    _miniaudio = None


@dataclasses.dataclass(frozen=True)
class Sample:
    """One stored sample: its key, waveform (float32, mono), sample rate and json."""

    key: str
    waveform: np.ndarray
    sample_rate: int
    meta: dict


class UnsafeMemberError(ValueError):
    """A tar member that is not a plain file named ``KEY.ext``."""


class _Member(io.BytesIO):
    """A member's bytes for libsndfile, whose errors quote the file object's repr: a fixed
    one, so a reject's message is the same bytes on every run (not a memory address)."""

    def __repr__(self) -> str:
        return "<shard member>"


def decode_member(data: bytes) -> tuple[np.ndarray, int]:
    """Decodes one member to float32 samples and its rate, as ``soundfile.read(...,
    dtype="float32")`` does: the same samples bit for bit, the same errors.

    Mono 16- and 24-bit FLAC, what shards hold, goes through dr_flac (:func:`_decode_flac`),
    1.4-1.7x libsndfile's speed here (``bench/decode.py``); everything else, and every stream
    that is not plainly whole, goes through libsndfile, whose result or error decides.
    """
    fast = _decode_flac(data)
    if fast is not None:
        return fast
    wav, rate = sf.read(_Member(data), dtype="float32")
    return wav, rate


#: Sample sizes dr_flac decodes here, to float32 itself (``read_pcm_frames_f32``). libsndfile
#: and dr_flac both shift a FLAC sample to 32 bits and scale it by 2**-31: a sample of 24 bits
#: or fewer is exact in float32 and a power of two scales it exactly, so the two give the same
#: floats bit for bit. Decoding to float32 at once saves an int16 buffer and a pass over it
#: (about 8% of a decode, ``bench/decode.py``'s corpus).
_FLAC_BITS = (16, 24)


def _decode_flac(data: bytes) -> tuple[np.ndarray, int] | None:
    """dr_flac's decode of a mono 16- or 24-bit FLAC member, or ``None``: not FLAC, another
    format, miniaudio absent, or a stream that is not plainly whole (libsndfile decides).

    Hand-written against miniaudio's cffi binding (``miniaudio.lib``) for speed: its public
    ``flac_read_s16`` copies the samples into an ``array.array`` first, and decoding straight
    into the numpy array instead saves about what the checks below cost (``bench/decode.py``:
    ``drflac_raw`` against ``miniaudio_flac_read_s16``).

    dr_flac does not fail on a damaged stream: it skips a frame whose CRC does not match,
    stops at the end of the data (a truncated member gives fewer samples, where libsndfile
    raises) and resynchronises past stray bytes. So the stream must first be plain and whole
    (:func:`shards.flac.plain_frames_start`, :func:`shards.flac.frames_are_whole`: metadata
    libsndfile accepts, frames back to back, numbered in order, CRC-valid, ending at
    STREAMINFO's total), and dr_flac must then return exactly STREAMINFO's total: it is asked
    for one sample more, so a stream that decodes to more than it declares goes to
    libsndfile too.
    """
    if _miniaudio is None:
        return None
    info = flac.read_streaminfo(io.BytesIO(data))
    if info is None or info.channels != 1 or info.bits_per_sample not in _FLAC_BITS:
        return None
    start = flac.plain_frames_start(data)
    if start is None or not flac.frames_are_whole(data, start, info):
        return None  # Metadata or frames that libsndfile must judge.
    bits, total = info.bits_per_sample, info.total_samples
    lib, ffi = _miniaudio.lib, _miniaudio.ffi
    try:
        handle = lib.ma_dr_flac_open_memory(data, len(data), ffi.NULL)
        if handle == ffi.NULL:
            return None
        try:
            facts = (handle.totalPCMFrameCount, handle.sampleRate, handle.channels)
            if facts + (handle.bitsPerSample,) != (total, info.sample_rate, 1, bits):
                return None
            samples = np.empty(total + 1, np.float32)
            count = lib.ma_dr_flac_read_pcm_frames_f32(
                handle, total + 1, ffi.from_buffer("float *", samples)
            )
        finally:
            lib.ma_dr_flac_close(handle)
    except Exception:  # Anything unexpected from the binding: libsndfile decides.
        return None
    if count != total:
        return None
    return samples[:total], info.sample_rate


def _split(member: tarfile.TarInfo) -> tuple[str, str]:
    name = member.name
    if not member.isreg() or "/" in name or "\\" in name or name.startswith((".", "-")):
        raise UnsafeMemberError(f"tar member {name!r} is not a plain KEY.ext file")
    key, _, ext = name.partition(".")
    keys.check(key)
    return key, ext


def iter_members(path: str, ext: str = "flac") -> Iterator[tuple[str, bytes]]:
    """``(key, bytes)`` of each ``KEY.ext`` member of a shard tar, in stored order, read in
    one sequential pass (a buffered stream from an object store) without decoding.

    Nothing is extracted to disk. Every member is checked as :func:`iter_shard` checks it:
    a plain ``KEY.ext`` file with a valid key, or :class:`UnsafeMemberError`.
    """
    with storage.open_stream(path) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            key, found = _split(member)
            if found == ext:
                yield key, tar.extractfile(member).read()


def iter_shard(path: str) -> Iterator[Sample]:
    """Yields the samples of one shard tar, in stored order."""
    with storage.open_stream(path) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        pending: dict[str, dict[str, bytes]] = {}
        for member in tar:
            key, ext = _split(member)
            data = tar.extractfile(member).read()
            parts = pending.setdefault(key, {})
            parts[ext] = data
            if "flac" in parts and "json" in parts:
                del pending[key]
                wav, rate = decode_member(parts["flac"])
                yield Sample(key, wav, rate, json.loads(parts["json"]))
        if pending:
            raise ValueError(f"{path}: samples without both .flac and .json: {sorted(pending)[:5]}")


def open_shards(root: str) -> Iterator[Sample]:
    """Iterates every sample of a root in shard order (``shards.open``).

    Example:
        >>> for sample in open_shards("/data/ls"):  # doctest: +SKIP
        ...     print(sample.key, sample.waveform.shape, sample.sample_rate)
    """
    layout = RootLayout(root)
    names = storage.read_parquet(layout.manifest("shards.parquet"), columns=["name"]).column("name")
    for name in names.to_pylist():
        yield from iter_shard(os.path.join(layout.shards_dir, f"{name}.tar"))


class Index:
    """Random access by key through the utterances manifest's byte offsets.

    Example:
        >>> index = Index("/data/ls")  # doctest: +SKIP
        >>> index.get("103-1240-0000").waveform.shape  # doctest: +SKIP
    """

    def __init__(self, root: str):
        self._layout = RootLayout(root)
        table = storage.read_parquet(
            self._layout.manifest("utterances.parquet"), columns=["key", "shard", "offset", "size"]
        )
        self._rows = {
            k: (s, o, n)
            for k, s, o, n in zip(
                *(table.column(c).to_pylist() for c in table.column_names), strict=True
            )
        }

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, key: str) -> Sample:
        if key not in self._rows:
            raise KeyError(f"no sample {key!r} in {self._layout.root}")
        return _read_at(self._layout, key, *self._rows[key])


def read_audio(root: str, shard: str, offset: int, size: int) -> tuple[np.ndarray, int]:
    """Decodes one member found through the manifest (``shard``, ``offset``, ``size``)."""
    path = os.path.join(RootLayout(root).shards_dir, f"{shard}.tar")
    with storage.open_input(path) as f:
        return decode_member(read_member(f, path, offset, size))


def read_member(f, path: str, offset: int, size: int) -> bytes:
    """The ``size`` bytes at ``offset`` of the open shard tar ``f`` (``path`` names it in
    errors), a member found through the manifest.

    Raises:
        ValueError: A span that starts inside the first tar header or ends past the file.
    """
    total = f.seek(0, io.SEEK_END)
    if offset < 512 or offset + size > total:
        raise ValueError(f"offset {offset}+{size} lies outside {path} ({total} bytes)")
    f.seek(offset)
    return f.read(size)


def _read_at(layout: RootLayout, key: str, shard: str, offset: int, size: int) -> Sample:
    path = os.path.join(layout.shards_dir, f"{shard}.tar")
    with storage.open_input(path) as f:
        flac = read_member(f, path, offset, size)
        # The json member follows the flac data (padded to 512 bytes); tarfile reads its
        # header from there, PAX extensions included.
        f.seek(offset + ((size + 511) // 512) * 512)
        tar = tarfile.TarFile(fileobj=f, mode="r", encoding="utf-8")
        member = tar.firstmember
        if member is None or member.name != f"{key}.json" or not member.isreg():
            raise ValueError(f"{path}: {key}.json does not follow {key}.flac")
        meta = json.loads(tar.extractfile(member).read())
    wav, rate = decode_member(flac)
    return Sample(key, wav, rate, meta)


def get(root: str, key: str) -> Sample:
    """Reads one sample by key, seeking straight to its bytes (``shards.get``).

    For many lookups build an :class:`Index` once instead.
    """
    layout = RootLayout(root)
    table = storage.read_parquet(
        layout.manifest("utterances.parquet"),
        columns=["key", "shard", "offset", "size"],
        filters=pc.field("key") == key,
    )
    if table.num_rows == 0:
        raise KeyError(f"no sample {key!r} in {layout.root}")
    row = table.slice(0, 1).to_pylist()[0]
    return _read_at(layout, key, row["shard"], row["offset"], row["size"])
