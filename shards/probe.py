"""Reading what an input file is, from its header, without decoding it.

A probe answers every question the plan needs (sample rate, channels, length, format,
whether its bytes can be stored as they are) or returns a reject row with a reason code.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import re
import stat
from typing import NamedTuple

import soundfile as sf

from . import flac
from .audio import decoder_words
from .core import storage
from .discover import Source
from .schemas import (
    MAX_SOURCE_RATE,
    MIN_SAMPLES,
    MIN_SOURCE_RATE,
    SAMPLE_RATE,
    Reason,
    Stage,
    reject_row,
)


@dataclasses.dataclass(frozen=True)
class Probe:
    """Header facts about one input that passed probing."""

    source: Source
    frames: int
    sample_rate: int
    channels: int
    format: str
    subtype: str
    file_bytes: int
    passthrough: bool
    voice_activity: tuple[tuple[float, float], ...] | None

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate

    @property
    def output_samples(self) -> int:
        """Samples after resampling to 16 kHz (soxr returns ceil(frames * ratio))."""
        return math.ceil(self.frames * SAMPLE_RATE / self.sample_rate)


class ProbeError(Exception):
    """An input that cannot be used, with a reject reason code."""

    def __init__(self, reason: Reason, message: str):
        super().__init__(message)
        self.reason = reason


class Header(NamedTuple):
    frames: int
    sample_rate: int
    channels: int
    format: str
    subtype: str

    def passes_through(self, segment: str) -> bool:
        """True when the encoded bytes already are what a shard stores, 16 kHz mono 16-bit
        FLAC, and are stored whole (no segmentation)."""
        return segment == "none" and (
            self.format,
            self.subtype,
            self.sample_rate,
            self.channels,
        ) == ("FLAC", "PCM_16", SAMPLE_RATE, 1)


def probe(source: Source, *, segment: str = "none", fd: int | None = None) -> Probe:
    """Reads the header of ``source`` (and its sidecar) and checks it can be used.

    Args:
        source: The input.
        segment: ``none`` or ``vad``; pass-through is only possible for whole files.
        fd: ``source`` already opened for reading (:class:`OpenAhead`); closed here. A
            descriptor of anything but a regular file is closed and the path used instead.

    Returns:
        The header facts.

    Raises:
        ProbeError: With the reason the input cannot be used.
    """
    opened = _regular(fd, source.path)
    if opened is None:
        file_bytes = _stat(source.path)
    else:  # One open serves the size and the header; the same answers as by path.
        opened, file_bytes = opened
    if file_bytes == 0:
        if opened is not None:
            opened.close()
        raise ProbeError(Reason.EMPTY_FILE, "file is empty (0 bytes)")
    try:
        with opened if opened is not None else storage.open_input(source.path) as f:
            info, passthrough = _read_header(f, segment)
    except PermissionError as e:
        raise ProbeError(Reason.PERMISSION_DENIED, f"permission denied: {e}") from e
    except OSError as e:
        raise ProbeError(Reason.IO_ERROR, f"cannot open: {e}") from e
    frames, sample_rate, channels, fmt, subtype = info
    if frames <= 0:
        raise ProbeError(Reason.NO_SAMPLES, "header declares no samples")
    if not MIN_SOURCE_RATE <= sample_rate <= MAX_SOURCE_RATE or channels <= 0:
        raise ProbeError(
            Reason.NOT_AUDIO,
            f"unusable header: {sample_rate} Hz, {channels} channels (rates from "
            f"{MIN_SOURCE_RATE} to {MAX_SOURCE_RATE} Hz are taken)",
        )
    voice_activity = read_voice_activity(source.sidecar) if source.sidecar else None
    result = Probe(
        source, frames, sample_rate, channels, fmt, subtype, file_bytes, passthrough, voice_activity
    )
    if result.output_samples < MIN_SAMPLES:
        raise ProbeError(
            Reason.TOO_SHORT,
            f"{result.output_samples} samples at 16 kHz, shorter than one 25 ms frame "
            f"({MIN_SAMPLES} samples)",
        )
    return result


def _read_header(f, segment: str) -> tuple[Header, bool]:
    """Header facts and whether the bytes can be stored as they are.

    FLAC's STREAMINFO is read directly (:mod:`shards.flac`, 42 bytes); everything else goes
    through libsndfile. Whether a pass-through file is whole is checked when it is copied
    (:func:`check_whole`), from the bytes read for the copy.
    """
    stream = flac.read_streaminfo(f)
    if stream is not None:
        header = Header(
            stream.total_samples, stream.sample_rate, stream.channels, "FLAC", stream.subtype
        )
        return header, header.passes_through(segment)
    f.seek(0)
    try:
        with sf.SoundFile(f) as snd:
            header = Header(snd.frames, snd.samplerate, snd.channels, snd.format, snd.subtype)
            _check_declared_length(snd)
            return header, header.passes_through(segment)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise ProbeError(Reason.NOT_AUDIO, f"libsndfile cannot read it: {decoder_words(e)}") from e


def open_fd(fd: int, path: str):
    """An open descriptor of local ``path`` as a binary file named as
    ``storage.open_input(path)`` would name it (error messages quote the name).

    Unbuffered: a probe reads 42 bytes of it, a copy the whole file in one read, so a
    buffer would only add a copy (and, for a probe, a read of 8 KiB); 10% of a probe."""
    f = open(fd, "rb", buffering=0, closefd=True)
    f.name = storage.local_path(path)
    return f


def _regular(fd: int | None, path: str):
    """``fd`` as an open binary file and its size if it is a regular file; else ``None``
    (and ``fd`` closed)."""
    if fd is None:
        return None
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):  # O_NONBLOCK, set to open it, means nothing here.
            return open_fd(fd, path), st.st_size
    except OSError:
        pass
    try:
        os.close(fd)
    except OSError:
        pass
    return None


def _stat(path: str) -> int:
    if storage.is_url(path):
        try:
            return storage.file_size(path)
        except (OSError, FileNotFoundError) as e:
            raise ProbeError(Reason.MISSING, f"cannot stat: {e}") from e
    local = storage.local_path(path)
    try:
        return os.stat(local).st_size
    except FileNotFoundError as e:
        if os.path.islink(local):
            raise ProbeError(
                Reason.BROKEN_SYMLINK,
                f"symlink points to {os.readlink(local)!r}, which does not exist",
            ) from e
        raise ProbeError(Reason.MISSING, "file does not exist") from e
    except PermissionError as e:
        raise ProbeError(Reason.PERMISSION_DENIED, f"permission denied: {e}") from e
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ProbeError(Reason.BROKEN_SYMLINK, "symlink loop") from e
        raise ProbeError(Reason.IO_ERROR, f"cannot stat: {e}") from e


def check_whole(f, size: int) -> None:
    """Checks that a FLAC about to be copied as it is ends with its last frame whole.

    The fast path checks the last frame's CRC and sample range (:mod:`shards.flac`); a file
    it cannot vouch for (a trailing tag, say) is asked of libsndfile, whose answer is final.
    Pass-through copies bytes without decoding them; a full check is ``--verify``.

    Raises:
        ProbeError: ``truncated``.
    """
    f.seek(0)
    stream = flac.read_streaminfo(f)
    if stream is not None and flac.last_frame_is_whole(f, size, stream):
        f.seek(0)
        return
    f.seek(0)
    try:
        with sf.SoundFile(f) as snd:
            _check_tail(snd)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise ProbeError(
            Reason.TRUNCATED, f"cannot decode the last frame: {decoder_words(e)}"
        ) from e
    f.seek(0)


def _check_tail(snd: sf.SoundFile) -> None:
    """Decodes the last frame: a truncated FLAC fails here, for the cost of one seek."""
    try:
        snd.seek(snd.frames - 1)
        tail = snd.read(1)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise ProbeError(
            Reason.TRUNCATED, f"cannot decode the last frame: {decoder_words(e)}"
        ) from e
    if len(tail) != 1:
        raise ProbeError(Reason.TRUNCATED, "file ends before the length its header declares")


# libsndfile trusts the bytes that are there over a WAV/AIFF header that promises more, and
# notes it in its log as "data : 32000 (should be 24000)".
_SHORT_CHUNK = re.compile(r"^\s*(?:data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)


def _check_declared_length(snd: sf.SoundFile) -> None:
    """Rejects a file whose audio chunk is shorter than its header declares."""
    m = _SHORT_CHUNK.search(snd.extra_info or "")
    if m and int(m.group(2)) < int(m.group(1)):
        raise ProbeError(
            Reason.TRUNCATED, f"audio data is {m.group(2)} bytes, the header declares {m.group(1)}"
        )


def read_voice_activity(path: str) -> tuple[tuple[float, float], ...] | None:
    """Reads ``voice_activity`` from a Libri-light sidecar (clipped to the file later)."""
    try:
        meta = json.loads(storage.read_text(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProbeError(Reason.BAD_SIDECAR, f"sidecar {path} is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise ProbeError(Reason.BAD_SIDECAR, f"sidecar {path} is not a JSON object")
    intervals = meta.get("voice_activity")
    if intervals is None:
        return None
    try:
        pairs = [(float(a), float(b)) for a, b in intervals]
    except (TypeError, ValueError) as e:
        raise ProbeError(
            Reason.BAD_SIDECAR, f"sidecar {path}: voice_activity is not a list of [start, end]"
        ) from e
    if any(not (math.isfinite(a) and math.isfinite(b)) or b < a for a, b in pairs):
        raise ProbeError(
            Reason.BAD_SIDECAR,
            f"sidecar {path}: voice_activity holds an interval with end < start or NaN",
        )
    return tuple(pairs)


#: Files whose reads are announced to the kernel ahead of probing them.
PROBE_AHEAD = 32


class OpenAhead:
    """Opens local files a window ahead of their use and asks the kernel to read them
    (``posix_fadvise(WILLNEED)``, which returns at once), so that a cold disk is kept busy
    without threads. The user reads from the same descriptor (:meth:`take`): each file is
    opened once, where a separate announcement cost an open and a close more per file. A
    file that cannot be opened here is opened again by its user, whose error says why.

    Args:
        paths: The files in the order they will be used (``None`` for files to skip;
            remote ones are skipped too).
        window: How many files ahead to open.
        head_only: Announce only the first 64 KiB (for probing headers).
    """

    _SPAN = 1 << 16

    def __init__(self, paths: list[str | None], window: int, head_only: bool = False):
        self._paths = [
            None if p is None or storage.is_url(p) else storage.local_path(p) for p in paths
        ]
        self._window = window
        self._span = self._SPAN if head_only else 0
        self._next = 0
        self._fds: dict[int, int] = {}
        self._advise = hasattr(os, "posix_fadvise")

    def advance(self, current: int) -> None:
        """Call before using file ``current``: opens up to ``current + window``."""
        end = min(len(self._paths), current + self._window + 1)
        while self._next < end:
            i, path = self._next, self._paths[self._next]
            self._next += 1
            if path is None:
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue
            self._fds[i] = fd
            if self._advise:
                try:
                    os.posix_fadvise(fd, 0, self._span, os.POSIX_FADV_WILLNEED)
                except OSError:
                    pass

    def take(self, i: int) -> int | None:
        """File ``i``'s descriptor (the caller closes it), or ``None``."""
        return self._fds.pop(i, None)

    def close(self) -> None:
        """Closes the descriptors nobody took (a loop that stopped early)."""
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            try:
                os.close(fd)
            except OSError:
                pass


def probe_many(sources: list[Source], *, segment: str = "none") -> tuple[list[Probe], list[dict]]:
    """Probes a batch; every source ends in exactly one of the two lists, in input order.

    Probing waits on storage (a small read a file); asking the kernel to read the next
    files ahead (``posix_fadvise``) keeps a cold disk busy without threads, which on a warm
    cache would cost more in GIL hand-offs than the reads themselves.
    """
    probes, rejects = [], []
    ahead = OpenAhead([s.path for s in sources], PROBE_AHEAD, head_only=True)
    try:
        for i, source in enumerate(sources):
            ahead.advance(i)
            try:
                probes.append(probe(source, segment=segment, fd=ahead.take(i)))
            except ProbeError as e:
                rejects.append(reject_row(source.path, Stage.PROBE, e.reason, str(e), source.key))
    finally:
        ahead.close()
    return probes, rejects
