"""Streaming audio: decode in blocks, downmix, resample to 16 kHz, encode 16-bit FLAC.

Nothing here holds a whole file in memory: a multi-hour recording flows through in blocks of
:data:`BLOCK_FRAMES` source frames, and encoded output spills to a temporary file once it
passes :data:`SPOOL_BYTES`.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr

from .core import storage
from .schemas import SAMPLE_RATE, Reason

#: Source frames decoded at a time (about 16 s at 16 kHz).
BLOCK_FRAMES = 1 << 18

#: Encoded bytes kept in memory before a file's outputs spill to disk.
SPOOL_BYTES = 32 << 20

#: FLAC compression level (0 fastest ... 1 smallest, libsndfile's scale).
FLAC_COMPRESSION = 0.5


class AudioError(Exception):
    """An input that fails while it is decoded, with a reject reason code."""

    def __init__(self, reason: Reason, message: str):
        super().__init__(message)
        self.reason = reason


#: Sample formats read as int16 (libsndfile's int-to-float conversion costs more than the
#: decoding itself; numpy's is cheaper, and 16 kHz int16 needs none at all).
_INT16_SUBTYPES = frozenset({"PCM_16", "PCM_S8", "PCM_U8"})


def to_pcm16(x: np.ndarray) -> np.ndarray:
    """Samples to int16: float in [-1, 1) is scaled, rounded to nearest and clipped; int16
    passes as it is."""
    if x.dtype == np.int16:
        return x
    y = x * np.float32(32768.0)
    np.rint(y, out=y)
    np.clip(y, -32768, 32767, out=y)
    return y.astype(np.int16)


def to_float(x: np.ndarray) -> np.ndarray:
    """Samples to float32 in [-1, 1) (int16 is divided by 32768, exactly)."""
    if x.dtype == np.int16:
        return np.multiply(x, np.float32(1 / 32768), dtype=np.float32)
    return x


def iter_16k(path: str, block_frames: int = BLOCK_FRAMES) -> Iterator[np.ndarray]:
    """Yields the file as mono blocks at 16 kHz: int16 where the file is 16-bit PCM at
    16 kHz in one channel (nothing to compute), float32 otherwise.

    Channels are averaged; other rates go through soxr's streaming resampler (HQ), so the
    output is ``ceil(frames * 16000 / rate)`` samples long. Use :func:`to_float` or
    :func:`to_pcm16` for one type.

    Raises:
        AudioError: ``corrupt`` when the decoder fails, ``truncated`` when the file ends
            before the length its header declares, ``non_finite`` for NaN or Inf samples.
    """
    try:
        with storage.open_input(path) as f, sf.SoundFile(f) as snd:
            rate, declared = snd.samplerate, snd.frames
            dtype = "int16" if snd.subtype in _INT16_SUBTYPES else "float32"
            resampler = None
            if rate != SAMPLE_RATE:
                resampler = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
            position = 0
            while True:
                block = snd.read(block_frames, dtype=dtype, always_2d=True)
                if len(block) == 0:
                    break
                if dtype == "float32":
                    finite = np.isfinite(block)
                    if not finite.all():
                        bad = int(np.flatnonzero(~finite.all(axis=1))[0])
                        raise AudioError(
                            Reason.NON_FINITE, f"NaN or Inf sample at frame {position + bad}"
                        )
                position += len(block)
                if block.shape[1] == 1:
                    mono = block[:, 0]
                else:
                    mono = to_float(block).mean(axis=1, dtype=np.float32)
                if resampler is None:
                    yield mono
                else:
                    out = resampler.resample_chunk(to_float(mono), last=False)
                    if len(out):
                        yield out
            if position < declared:
                raise AudioError(
                    Reason.TRUNCATED,
                    f"decoded {position} of the {declared} frames the header declares",
                )
            if resampler is not None:
                out = resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
                if len(out):
                    yield out
    except sf.LibsndfileError as e:
        raise AudioError(Reason.CORRUPT, f"decoder failed: {decoder_words(e)}") from e
    except PermissionError as e:
        raise AudioError(Reason.PERMISSION_DENIED, str(e)) from e
    except OSError as e:
        raise AudioError(Reason.IO_ERROR, f"read failed: {e}") from e


def decoder_words(e: Exception) -> str:
    """What the decoder said, for a reject message: libsndfile's own words, without
    soundfile's "Error opening <file object ...>" prefix. The reject row names the file, and
    the object's repr differs with how the file was opened and, for an in-memory copy, holds
    a memory address, which would make two runs' rejects differ."""
    return e.error_string if isinstance(e, sf.LibsndfileError) else str(e)


def verify_decodes(source: str | BinaryIO, block_frames: int = BLOCK_FRAMES) -> int:
    """Decodes a whole file (a path or an open file) and returns its frame count
    (for ``--verify``)."""
    try:
        n = 0
        opened = (
            storage.open_input(source)
            if isinstance(source, str)
            else contextlib.nullcontext(source)
        )
        with opened as f, sf.SoundFile(f) as snd:
            declared = snd.frames
            for block in snd.blocks(block_frames, dtype="float32"):
                n += len(block)
        if n < declared:
            raise AudioError(Reason.TRUNCATED, f"decoded {n} of the {declared} frames declared")
        return n
    except sf.LibsndfileError as e:
        raise AudioError(Reason.CORRUPT, f"decoder failed: {decoder_words(e)}") from e


class _Window(io.RawIOBase):
    """A file-like view of ``f`` from byte ``base`` on, so several FLAC streams can be
    encoded one after another into one spool file (libsndfile seeks back to 0 to finish
    each stream's header)."""

    def __init__(self, f: BinaryIO, base: int):
        self._f, self._base = f, base

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            return self._f.seek(self._base + offset) - self._base
        return self._f.seek(offset, whence) - self._base

    def tell(self) -> int:
        return self._f.tell() - self._base

    def read(self, size: int = -1) -> bytes:
        return self._f.read(size)

    def readinto(self, b) -> int:
        data = self._f.read(len(b))
        b[: len(data)] = data
        return len(data)

    def write(self, b) -> int:
        return self._f.write(b)


class EncodedFile:
    """The FLAC streams made from one input, spooled until the input is known to be good.

    Streams are encoded one at a time, in order. A caller adds them to a shard only after
    the whole input decoded without error, so a bad input never leaves part of itself
    behind.

    Example:
        >>> enc = EncodedFile()
        >>> enc.begin(); enc.write(np.zeros(800, np.float32)); enc.end()
        800
        >>> len(enc.streams)
        1
    """

    def __init__(self, compression: float = FLAC_COMPRESSION):
        self.spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
        self.streams: list[tuple[int, int, int]] = []  # (offset, size, samples)
        self._compression = compression
        self._snd: sf.SoundFile | None = None
        self._base = 0
        self._samples = 0

    def begin(self) -> None:
        self._base = self.spool.seek(0, io.SEEK_END)
        self._samples = 0
        self._snd = sf.SoundFile(
            _Window(self.spool, self._base),
            "w",
            SAMPLE_RATE,
            1,
            "PCM_16",
            format="FLAC",
            compression_level=self._compression,
        )

    def write(self, x: np.ndarray) -> None:
        self._snd.write(to_pcm16(x))
        self._samples += len(x)

    def end(self) -> int:
        """Finishes the current stream and returns its sample count."""
        self._snd.close()
        self._snd = None
        size = self.spool.seek(0, io.SEEK_END) - self._base
        self.streams.append((self._base, size, self._samples))
        return self._samples

    def open_stream(self, index: int) -> tuple[BinaryIO, int]:
        """Positions the spool at stream ``index`` and returns it with its size."""
        offset, size, _ = self.streams[index]
        self.spool.seek(offset)
        return self.spool, size

    def close(self) -> None:
        if self._snd is not None:
            self._snd.close()
        self.spool.close()

    def __enter__(self) -> EncodedFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
