"""Reference phones per frame, from fairseq's phone tsv, Montreal Forced Aligner TextGrids or
CTM files.

Everything becomes one phone per 100 Hz frame: the phone whose interval holds the centre of
the frame's 25 ms window (``t = i / 100 + 0.0125`` s, the MFCC frame contract), so a
reference has the frames of the utterance's MFCC labels. Time outside every interval, and
MFA's empty intervals, are ``sil``. fairseq's tsv is taken as it is (``UTTID<TAB>ph1,ph2,...``,
one phone per 100 Hz frame), with stress digits removed as ``measure_teacher_quality.py``
does.

TextGrids are parsed by praatio (long and short text formats, UTF-8 and UTF-16). Malformed
input is an error naming the file (and the line, for tsv and CTM).
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
import re
from collections.abc import Mapping

import numpy as np

from units.features.frames import MFCC, SAMPLE_RATE

SILENCE = "sil"
RATE = 100.0


class ReferenceError(ValueError):
    """A reference file that cannot be read; the message names the file and line."""


def _strip_stress(phone: str) -> str:
    return re.sub("[0-9]", "", phone)


def read_phone_tsv(path: str, *, remove_stress: bool = True) -> dict[str, list[str]]:
    """fairseq's frame-level phone tsv: ``UTTID<TAB>ph1,ph2,...`` per line, 100 Hz."""
    out: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            where = f"{path}, line {number}"
            if not line.strip():
                raise ReferenceError(f"{where}: empty line")
            parts = line.split("\t")
            if len(parts) != 2 or not parts[0] or not parts[1]:
                raise ReferenceError(f"{where}: expected UTTID<TAB>ph1,ph2,..., got {line[:60]!r}")
            uid, phones = parts[0], parts[1].split(",")
            if any(not p for p in phones):
                raise ReferenceError(f"{where}: an empty phone in {parts[1][:60]!r}")
            if uid in out:
                raise ReferenceError(f"{where}: utterance {uid!r} appears twice")
            out[uid] = [_strip_stress(p) for p in phones] if remove_stress else phones
    if not out:
        raise ReferenceError(f"{path}: no utterances")
    return out


def frames_from_segments(segments: list[tuple[str, float, float]], end: float) -> list[str]:
    """One phone per 100 Hz frame of audio lasting ``end`` seconds, from timed segments."""
    n = MFCC.frames(int(round(end * SAMPLE_RATE)))
    centres = np.arange(n) / RATE + MFCC.window / 2 / SAMPLE_RATE
    out = [SILENCE] * n
    for phone, start, stop in segments:
        lo, hi = np.searchsorted(centres, [start, stop], side="left")
        for i in range(lo, hi):
            out[i] = phone or SILENCE
    return out


def read_textgrid(path: str, *, tier: str = "phones", remove_stress: bool = True) -> list[str]:
    """The ``phones`` tier of a Praat TextGrid, one phone per 100 Hz frame.

    praatio parses it: the long and the short text formats, UTF-8 (with or without a byte
    order mark) and UTF-16 with its byte order mark, as Praat and MFA write them. Empty
    intervals are kept and become ``sil``.

    Raises:
        ReferenceError: A file praatio cannot read, no interval tier ``tier``, a tier
            without intervals, or an interval that ends before it starts; the message names
            the file.
    """
    from praatio import textgrid
    from praatio.utilities.errors import PraatioException

    try:
        grid = textgrid.openTextgrid(path, includeEmptyIntervals=True)
    # praatio's parsers end on whatever a malformed line makes them meet (an IndexError on a
    # missing header line, a ValueError on a number that is not one): all name the file here.
    except (PraatioException, ValueError, IndexError, KeyError, AttributeError) as e:
        raise ReferenceError(f"{path}: not a TextGrid praatio can read ({e})") from None
    if tier not in grid.tierNames or not isinstance(grid.getTier(tier), textgrid.IntervalTier):
        raise ReferenceError(f"{path}: no interval tier named {tier!r}")
    segments = []
    for number, (start, stop, label) in enumerate(grid.getTier(tier).entries, 1):
        if not (math.isfinite(start) and math.isfinite(stop)) or stop < start:
            raise ReferenceError(f"{path}: tier {tier!r}, interval {number}: {start}..{stop}")
        label = label.strip()
        segments.append((_strip_stress(label) if remove_stress else label, start, stop))
    if not segments:
        raise ReferenceError(f"{path}: tier {tier!r} has no intervals")
    return frames_from_segments(segments, max(s[2] for s in segments))


def _textgrid_paths(directory: str) -> list[str]:
    return sorted(glob.glob(os.path.join(directory, "**", "*.TextGrid"), recursive=True))


def read_textgrids(directory: str, **kwargs) -> dict[str, list[str]]:
    """Every ``*.TextGrid`` under ``directory`` (MFA's output tree), by file stem."""
    paths = _textgrid_paths(directory)
    if not paths:
        raise ReferenceError(f"{directory}: no .TextGrid files")
    return {os.path.splitext(os.path.basename(p))[0]: read_textgrid(p, **kwargs) for p in paths}


def read_ctm(path: str, *, remove_stress: bool = True) -> dict[str, list[str]]:
    """A CTM of phones: ``UTTID CHANNEL START DURATION PHONE [CONFIDENCE]`` per line."""
    segments: dict[str, list[tuple[str, float, float]]] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip() or line.startswith(";;"):
                continue
            parts = line.split()
            try:
                uid, start, duration, phone = parts[0], float(parts[2]), float(parts[3]), parts[4]
            except (IndexError, ValueError):
                raise ReferenceError(
                    f"{path}, line {number}: expected UTTID CHANNEL START DURATION PHONE, "
                    f"got {line.strip()[:60]!r}"
                ) from None
            if duration < 0 or start < 0:
                raise ReferenceError(f"{path}, line {number}: negative time")
            phone = _strip_stress(phone) if remove_stress else phone
            segments.setdefault(uid, []).append((phone, start, start + duration))
    if not segments:
        raise ReferenceError(f"{path}: no segments")
    return {
        uid: frames_from_segments(segs, max(s[2] for s in segs)) for uid, segs in segments.items()
    }


def read_references(path: str) -> dict[str, list[str]]:
    """A phone tsv (``.tsv``), a CTM (``.ctm``), a TextGrid or a directory of TextGrids."""
    if os.path.isdir(path):
        return read_textgrids(path)
    if path.endswith(".TextGrid"):
        return {os.path.splitext(os.path.basename(path))[0]: read_textgrid(path)}
    if path.endswith(".ctm"):
        return read_ctm(path)
    if path.endswith(".tsv"):
        return read_phone_tsv(path)
    raise ReferenceError(f"{path}: expected a .tsv, .ctm, .TextGrid or a directory of them")


def fingerprint(path: str) -> str:
    """sha256 of a reference's content, to tell later whether the same phones are still there.

    A file: the sha256 of its bytes (what ``sha256sum`` prints). A directory: the files
    :func:`read_references` reads from it (every ``*.TextGrid`` under it), each as its path
    relative to the directory, its size and its bytes, in sorted order; moving the
    directory keeps the sha256, editing or renaming a file changes it.

    Raises:
        OSError: The path cannot be read.
    """
    digest = hashlib.sha256()
    if os.path.isdir(path):
        for file in _textgrid_paths(path):
            size = os.path.getsize(file)
            digest.update(f"{os.path.relpath(file, path)}\0{size}\0".encode())
            _hash_file(digest, file)
    else:
        _hash_file(digest, path)
    return digest.hexdigest()


def _hash_file(digest, path: str) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)


def check_rate(
    refs: Mapping[str, list[str]], durations: Mapping[str, float], path: str, rate: float = RATE
) -> float:
    """The references' frames per second, from their lengths and the audio durations.

    Raises:
        ReferenceError: Frames that do not come at ``rate`` (within 10%), e.g. a 50 Hz file
            given as 100 Hz; the message gives the rate the lengths show.
    """
    ratios = [len(refs[u]) / durations[u] for u in refs if durations.get(u, 0) > 0.1]
    if not ratios:
        return rate
    measured = float(np.median(ratios))
    if abs(measured - rate) > 0.1 * rate:
        raise ReferenceError(
            f"{path}: the references have {measured:.1f} frames per second of audio (median of "
            f"{len(ratios)} utterances), not {rate:g}: phones are expected at {rate:g} Hz"
        )
    return measured
