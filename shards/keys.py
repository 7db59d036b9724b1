"""Sample keys: unique, stable and dot-free.

WebDataset splits a member name at its first dot (``KEY.flac``), so a key must hold no dot;
a key also names a tar member, so it must hold no path separator either.
"""

from __future__ import annotations

import re

# Word characters (unicode letters and digits, underscore) and hyphens survive; every other
# run of characters (dots, spaces, slashes, punctuation) becomes one underscore.
_UNSAFE = re.compile(r"[^\w\-]+")


def sanitize(text: str) -> str:
    """Turns any string into a key fragment.

    Example:
        >>> sanitize("my file.v2 (take 1)")
        'my_file_v2_take_1'
    """
    return _UNSAFE.sub("_", text).strip("_")


def from_parts(*parts: str) -> str:
    """Joins sanitized fragments with ``_`` (Libri-light's ``SPEAKER_BOOK_STEM`` shape)."""
    return "_".join(p for p in (sanitize(part) for part in parts) if p)


def segment_key(file_key: str, index: int) -> str:
    """The key of segment ``index`` of a file, as Libri-light's ``cut_by_vad.py`` names it."""
    return f"{file_key}_{index:04d}"


def check(key: str) -> None:
    """Raises ``ValueError`` unless ``key`` is a valid member stem."""
    if not key:
        raise ValueError("sample key is empty")
    if "." in key or "/" in key or "\\" in key or "\x00" in key:
        raise ValueError(f"sample key {key!r} holds a dot, a path separator or NUL")
    if key.startswith("-"):
        raise ValueError(f"sample key {key!r} starts with '-'")
