"""Reading a FLAC file's facts from its bytes: STREAMINFO, and whether its last frame is whole.

Pass-through sharding must not decode, yet must not copy a truncated file either. libsndfile
answers both (open, seek to the end, read a sample) for about 150 us a file; this module
answers them for a few microseconds from the first 42 bytes and the last frame, which at
Libri-light's and LibriSpeech's hundreds of thousands of files is the difference between
probing in seconds and in minutes. Anything it cannot vouch for falls back to libsndfile.

Format: https://xiph.org/flac/format.html (STREAMINFO, FRAME_HEADER, FRAME_FOOTER).
"""

from __future__ import annotations

import dataclasses
import io
from typing import BinaryIO

import fastcrc
import numpy as np
import soundfile as sf

_MAGIC = b"fLaC"

#: Bytes read from a file's end when STREAMINFO does not give the largest frame size.
_TAIL_DEFAULT = 1 << 17


@dataclasses.dataclass(frozen=True)
class StreamInfo:
    sample_rate: int
    channels: int
    bits_per_sample: int
    total_samples: int
    min_block: int
    max_block: int
    max_frame: int

    @property
    def subtype(self) -> str:
        """libsndfile's name for the sample format."""
        return {8: "PCM_S8", 16: "PCM_16", 24: "PCM_24", 32: "PCM_32"}.get(
            self.bits_per_sample, f"PCM_{self.bits_per_sample}"
        )


def read_streaminfo(f: BinaryIO) -> StreamInfo | None:
    """Parses STREAMINFO (always the first metadata block); ``None`` if this is not a plain
    FLAC stream or its length is unknown (then libsndfile decides)."""
    head = f.read(42)
    if len(head) < 42 or head[:4] != _MAGIC or head[4] & 0x7F != 0:
        return None
    s = head[8:42]
    min_block = int.from_bytes(s[0:2], "big")
    max_block = int.from_bytes(s[2:4], "big")
    max_frame = int.from_bytes(s[7:10], "big")
    packed = int.from_bytes(s[10:18], "big")
    sample_rate = packed >> 44
    channels = ((packed >> 41) & 0x7) + 1
    bits = ((packed >> 36) & 0x1F) + 1
    total = packed & ((1 << 36) - 1)
    if sample_rate == 0 or total == 0:
        return None
    return StreamInfo(sample_rate, channels, bits, total, min_block, max_block, max_frame)


def member_samples(data: bytes) -> tuple[int, int, int]:
    """``(samples, sample_rate, channels)`` of one FLAC member's bytes: its STREAMINFO's (42
    bytes, no decoding), or libsndfile's answer where STREAMINFO does not say (another
    format, an unknown length).

    Raises:
        soundfile.LibsndfileError: Bytes that libsndfile cannot open either.
    """
    info = read_streaminfo(io.BytesIO(data))
    if info is not None:
        return info.total_samples, info.sample_rate, info.channels
    probed = sf.info(io.BytesIO(data))
    return probed.frames, probed.samplerate, probed.channels


_BLOCK_SIZES = {
    1: 192,
    **{n: 576 << (n - 2) for n in range(2, 6)},
    **{n: 256 << (n - 8) for n in range(8, 16)},
}


def _utf8_number(b: bytes, i: int) -> tuple[int, int] | None:
    """Decodes FLAC's UTF-8-like coded frame/sample number at ``b[i]``; returns (value, end)."""
    first = b[i]
    if first < 0x80:
        return first, i + 1
    n = 0
    mask = 0x80
    while first & mask:
        n += 1
        mask >>= 1
    if n < 2 or n > 7 or i + n > len(b):
        return None
    value = first & (mask - 1)
    for k in range(1, n):
        c = b[i + k]
        if c & 0xC0 != 0x80:
            return None
        value = (value << 6) | (c & 0x3F)
    return value, i + n


def _frame_range(b: bytes, pos: int, info: StreamInfo) -> tuple[int, int] | None:
    """Parses the frame header at ``b[pos]``; returns (first sample, block size) if the header
    is valid (its CRC-8 matches)."""
    if pos + 6 > len(b):
        return None
    variable = b[pos + 1] & 1
    bs_code, sr_code = b[pos + 2] >> 4, b[pos + 2] & 0xF
    if bs_code == 0 or sr_code == 15 or b[pos + 3] & 1:
        return None
    number = _utf8_number(b, pos + 4)
    if number is None:
        return None
    value, i = number
    if bs_code == 6:
        block, i = b[i] + 1, i + 1
    elif bs_code == 7:
        block, i = int.from_bytes(b[i : i + 2], "big") + 1, i + 2
    else:
        block = _BLOCK_SIZES[bs_code]
    i += {12: 1, 13: 2, 14: 2}.get(sr_code, 0)
    if i >= len(b) or fastcrc.crc8.smbus(b[pos:i]) != b[i]:
        return None
    first = value if variable else value * info.max_block
    return first, block


def last_frame_is_whole(f: BinaryIO, size: int, info: StreamInfo) -> bool:
    """True if the file ends with a whole, CRC-valid frame that holds the stream's last sample.

    A truncated file ends inside a frame (its CRC-16 fails) or after an earlier one (its
    samples end before ``total_samples``).
    """
    tail_len = min(size, info.max_frame + 32 if info.max_frame else _TAIL_DEFAULT)
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    footer = int.from_bytes(tail[-2:], "big")
    pos = len(tail)
    while True:
        pos = tail.rfind(b"\xff", 0, pos)
        if pos < 0:
            return False
        if tail[pos + 1 : pos + 2] in (b"\xf8", b"\xf9"):
            found = _frame_range(tail, pos, info)
            if found is not None and fastcrc.crc16.umts(tail[pos:-2]) == footer:
                first, block = found
                return first + block == info.total_samples


def probe_bytes(data: bytes) -> tuple[StreamInfo | None, bool]:
    """STREAMINFO and the last-frame check of an in-memory FLAC (for tests and tools)."""
    f = io.BytesIO(data)
    info = read_streaminfo(f)
    return info, info is not None and last_frame_is_whole(f, len(data), info)


_STREAMINFO, _PADDING, _SEEKTABLE, _VORBIS_COMMENT = 0, 1, 3, 4


def _vorbis_comment_is_whole(block: bytes) -> bool:
    """True if the vendor string and every comment's length tile the block exactly."""
    if len(block) < 8:
        return False
    end = 4 + int.from_bytes(block[0:4], "little")
    if end + 4 > len(block):
        return False
    count = int.from_bytes(block[end : end + 4], "little")
    pos = end + 4
    for _ in range(min(count, len(block))):  # Each comment takes at least 4 bytes.
        if pos + 4 > len(block):
            return False
        pos += 4 + int.from_bytes(block[pos : pos + 4], "little")
    return count <= len(block) and pos == len(block)


def plain_frames_start(data: bytes) -> int | None:
    """Where the first frame starts, if the metadata is plain; ``None`` otherwise.

    Plain: STREAMINFO of 34 bytes, then only SEEKTABLE (whole seek points), VORBIS_COMMENT
    (lengths that tile the block) and PADDING (zeros) blocks, what libsndfile and the FLAC
    tools write, and a frame sync code right after the last block. For the reader's fast
    decoder (:func:`shards.reader.decode_member`): libsndfile rejects some malformed metadata that
    a decoder which skips blocks by their length would pass over, so anything but this
    well-formed set is left to libsndfile. Hand-written for speed: libsndfile's own parse
    (opening the file) costs about 80 us a member, this a microsecond or two.
    """
    if data[:4] != _MAGIC or len(data) < 42 or data[4] & 0x7F != _STREAMINFO:
        return None
    if int.from_bytes(data[5:8], "big") != 34:
        return None
    pos, last = 42, data[4] & 0x80
    while not last:
        if pos + 4 > len(data):
            return None
        kind, last = data[pos] & 0x7F, data[pos] & 0x80
        start, pos = pos + 4, pos + 4 + int.from_bytes(data[pos + 1 : pos + 4], "big")
        if pos > len(data):
            return None
        if kind == _PADDING:
            if data.count(0, start, pos) != pos - start:
                return None
        elif kind == _SEEKTABLE:
            if (pos - start) % 18:
                return None
        elif kind != _VORBIS_COMMENT or not _vorbis_comment_is_whole(data[start:pos]):
            return None
    if data[pos : pos + 2] not in (b"\xff\xf8", b"\xff\xf9"):
        return None
    return pos


#: FLAC's frame header codes for the sample rates and sample sizes it has one for.
_RATE_CODES = {
    88200: 1, 176400: 2, 192000: 3, 8000: 4, 16000: 5, 22050: 6,
    24000: 7, 32000: 8, 44100: 9, 48000: 10, 96000: 11,
}  # fmt: skip
_BITS_CODES = {8: 1, 12: 2, 16: 4, 20: 5, 24: 6, 32: 7}


def frames_are_whole(data: bytes, start: int, info: StreamInfo) -> bool:
    """True if ``data[start:]`` is exactly the stream's frames, back to back: each one's
    header valid (CRC-8) and numbered where the one before ended, from sample 0 to
    ``info.total_samples``; each one's CRC-16 right; nothing after the last.

    For the reader's fast decoder (:func:`shards.reader.decode_member`), on a mono stream. dr_flac
    checks every frame's CRC but not that the frames follow each other: it resynchronises
    past bytes between frames and decodes frames in the order it finds them, where
    libsndfile (libFLAC) reports a lost sync or a missing frame. A frame repeated or
    misplaced by a storage fault would then go unseen by counting samples alone. Each header
    must also carry the stream's sample rate (or defer to STREAMINFO), one channel and the
    stream's sample size; anything else is libsndfile's to judge. Costs a few microseconds a
    frame (the CRC-16 runs at gigabytes a second).
    """
    sync = data[start : start + 2]
    if sync not in (b"\xff\xf8", b"\xff\xf9") or len(data) < start + 6:
        return False
    rate = data[start + 2] & 0xF
    if rate not in (0, _RATE_CODES.get(info.sample_rate)):
        return False
    # Channel assignment 0 (one channel), the sample size or 0 (from STREAMINFO), reserved 0;
    # every frame must have this byte and this rate code.
    layout = data[start + 3]
    if layout not in (0, _BITS_CODES.get(info.bits_per_sample, 0) << 1):
        return False
    # Every sync code after the first frame's, found at once (bytes.find in a loop is ~8x
    # slower): the frames' starts and, rarely, the same two bytes inside a frame's data.
    raw = np.frombuffer(data, np.uint8, offset=start)
    hits = np.flatnonzero(raw[1:-1] == 0xFF) + 1
    syncs = (hits[raw[hits + 1] == sync[1]] + start).tolist()
    pos, expected, end, i = start, 0, len(data), 0
    view = memoryview(data)  # CRC spans without copies.
    while True:
        found = _frame_range(data, pos, info)
        if found is None or found[0] != expected:
            return False
        if data[pos + 3] != layout or data[pos + 2] & 0xF != rate:
            return False
        expected += found[1]
        if expected >= info.total_samples:  # The last frame: it must end the data.
            return expected == info.total_samples and _crc_ends(view, pos, end)
        # The next frame starts at a sync code that ends a CRC-16-valid span; a sync code
        # inside this frame's data fails the CRC and the search goes on (the 1 in 65,536
        # that passes is then not a header numbered as the next frame: libsndfile decides).
        while i < len(syncs) and not _crc_ends(view, pos, syncs[i]):
            i += 1
        if i == len(syncs):
            return False
        pos, i = syncs[i], i + 1


def _crc_ends(data: memoryview, start: int, end: int) -> bool:
    """True if ``data[start:end]`` ends with the CRC-16 of the bytes before it (a frame)."""
    return end - start > 2 and fastcrc.crc16.umts(data[start : end - 2]) == int.from_bytes(
        data[end - 2 : end], "big"
    )
