"""Finding the inputs of a corpus: LibriSpeech, Libri-light, any audio tree, or a list file.

Discovery only lists and reads small text files (transcripts, list files); it never opens
audio. Each input becomes a :class:`Source` with a key; lines of a list that cannot be
parsed become reject rows, never exceptions.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
from collections.abc import Iterable

import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from . import keys
from .core import storage
from .schemas import Reason, Stage, reject_row

LAYOUTS = ("auto", "librispeech", "librilight", "dir", "list")

#: Extensions taken by the ``dir`` layouts (case-insensitive); libsndfile decodes them all.
AUDIO_EXTENSIONS = ("flac", "wav", "ogg", "oga", "opus", "mp3", "aiff", "aif", "au", "caf", "w64")

LIST_EXTENSIONS = (".tsv", ".csv", ".jsonl", ".parquet")

_LIBRISPEECH = re.compile(r"^(\d+)/(\d+)/(\1-\2-\d+)\.flac$")


@dataclasses.dataclass(frozen=True)
class Source:
    """One discovered input file.

    Attributes:
        path: Absolute local path or URL of the audio file.
        key: Sample key (dot-free); segments append ``_NNNN``.
        speaker: Speaker id, when the layout or list names one.
        group: Book, chapter or directory the file belongs to.
        text: Transcript, when one is known.
        sidecar: Path of a Libri-light style ``.json`` sidecar, if any.
    """

    path: str
    key: str
    speaker: str | None = None
    group: str | None = None
    text: str | None = None
    sidecar: str | None = None


@dataclasses.dataclass
class Discovery:
    layout: str
    sources: list[Source]
    rejects: list[dict]


def _is_audio(rel: str, extensions: Iterable[str]) -> bool:
    ext = rel.rsplit(".", 1)[-1].lower() if "." in os.path.basename(rel) else ""
    return ext in extensions


def _stem(rel: str) -> str:
    base = rel.replace("\\", "/")
    return base.rsplit(".", 1)[0] if "." in base.rsplit("/", 1)[-1] else base


def detect_layout(path: str, files: list[str] | None = None) -> str:
    """Guesses the layout of an input (``list`` for list files, else from the tree)."""
    if not storage.isdir(path):
        if path.lower().endswith(LIST_EXTENSIONS):
            return "list"
        raise ValueError(
            f"input {path!r} is neither a directory nor a list file ({', '.join(LIST_EXTENSIONS)})"
        )
    files = list(storage.walk_files(path)) if files is None else files
    flacs = [f for f in files if f.lower().endswith(".flac")]
    if flacs and any(f.endswith(".trans.txt") for f in files):
        matched = sum(1 for f in flacs if _LIBRISPEECH.match("/".join(f.split("/")[-3:])))
        if matched * 2 >= len(flacs):
            return "librispeech"
    if flacs:
        names = set(files)
        with_json = sum(1 for f in flacs if _stem(f) + ".json" in names)
        if with_json * 2 >= len(flacs):
            return "librilight"
    return "dir"


def discover(
    path: str, layout: str = "auto", extensions: Iterable[str] = AUDIO_EXTENSIONS
) -> Discovery:
    """Lists the inputs of one corpus location.

    Args:
        path: A directory or a list file, local or URL.
        layout: One of :data:`LAYOUTS`.
        extensions: Audio extensions taken from directory trees.

    Returns:
        The layout used, the sources, and reject rows for list lines that could not be used.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    extensions = tuple(e.lower().lstrip(".") for e in extensions)
    if layout == "list" or (layout == "auto" and not storage.isdir(path)):
        if layout == "auto":
            layout = detect_layout(path)
        return _discover_list(path)
    files, rejects = _utf8_names(path, storage.walk_files(path), extensions)
    if layout == "auto":
        layout = detect_layout(path, files)
    if layout == "librispeech":
        return Discovery(layout, _librispeech(path, files, extensions), rejects)
    if layout == "librilight":
        return Discovery(layout, _tree(path, files, extensions, librilight=True), rejects)
    return Discovery(layout, _tree(path, files, extensions, librilight=False), rejects)


def _utf8_names(root: str, files: Iterable[str], extensions) -> tuple[list[str], list[dict]]:
    """Splits off file names that are not valid UTF-8: no manifest could store them."""
    good, rejects = [], []
    for rel in files:
        try:
            rel.encode("utf-8")
            good.append(rel)
        except UnicodeEncodeError:
            if _is_audio(rel, extensions):
                shown = rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                rejects.append(
                    reject_row(
                        storage.join(root, shown),
                        Stage.DISCOVER,
                        Reason.BAD_NAME,
                        "file name is not valid UTF-8; rename it",
                    )
                )
    return good, rejects


def _tree(root: str, files: list[str], extensions, *, librilight: bool) -> list[Source]:
    names = set(files)
    out = []
    for rel in files:
        if not _is_audio(rel, extensions):
            continue
        stem = _stem(rel)
        parts = stem.split("/")
        sidecar = storage.join(root, stem + ".json") if stem + ".json" in names else None
        if librilight and len(parts) >= 3:
            speaker, book, name = parts[-3:]
            key = keys.from_parts(speaker, book, name)
            out.append(Source(storage.join(root, rel), key, speaker, book, None, sidecar))
        else:
            group = "/".join(parts[:-1]) or None
            out.append(
                Source(storage.join(root, rel), keys.from_parts(*parts), None, group, None, sidecar)
            )
    return out


def _librispeech(root: str, files: list[str], extensions) -> list[Source]:
    transcripts: dict[str, str] = {}
    for rel in files:
        if rel.endswith(".trans.txt"):
            for line in storage.read_text(storage.join(root, rel)).splitlines():
                utt, _, text = line.strip().partition(" ")
                if utt:
                    transcripts[utt] = text
    out = []
    for rel in files:
        if not _is_audio(rel, extensions):
            continue
        m = _LIBRISPEECH.match("/".join(rel.split("/")[-3:]))
        if m:
            speaker, chapter, utt = m.groups()
            out.append(
                Source(storage.join(root, rel), utt, speaker, chapter, transcripts.get(utt), None)
            )
        else:  # A stray file in a LibriSpeech tree is still an input, keyed by its path.
            out.extend(_tree(root, [rel], extensions, librilight=False))
    return out


def _discover_list(path: str) -> Discovery:
    base = storage.dirname(path)
    lower = path.lower()
    if lower.endswith(".tsv"):
        return _fairseq_tsv(path)
    data = storage.open_input(path).read()
    if lower.endswith(".csv"):
        table = pacsv.read_csv(io.BytesIO(data))
    elif lower.endswith(".jsonl"):
        table = pajson.read_json(io.BytesIO(data))
    elif lower.endswith(".parquet"):
        table = pq.read_table(io.BytesIO(data))
    else:
        raise ValueError(f"list {path!r}: unknown list format; use {', '.join(LIST_EXTENSIONS)}")
    if "path" not in table.column_names:
        raise ValueError(
            f"list {path!r} has no 'path' column (columns: {', '.join(table.column_names)}); "
            "add one holding each audio file's path, absolute or relative to the list"
        )
    # Absent optional columns become one list of None each, made once: a fallback built per
    # row made reading a list quadratic (45 s for 128k rows, 31+ hours for Libri-light's 7M).
    rows = table.num_rows
    cols = {
        c: table.column(c).to_pylist() if c in table.column_names else [None] * rows
        for c in ("path", "key", "speaker", "group", "text")
    }
    sources, rejects = [], []
    for i, rel in enumerate(cols["path"]):
        line = i + 2 if lower.endswith(".csv") else i + 1
        if not isinstance(rel, str) or not rel.strip():
            rejects.append(
                reject_row(
                    f"{path}:{line}",
                    Stage.DISCOVER,
                    Reason.BAD_LIST_ENTRY,
                    f"row {line} has no path",
                )
            )
            continue
        full = rel if os.path.isabs(rel) or storage.is_url(rel) else storage.join(base, rel)
        given = cols["key"][i]
        key = keys.sanitize(str(given)) if given not in (None, "") else _key_from_path(full, base)
        sources.append(
            Source(
                full,
                key,
                _text(cols["speaker"][i]),
                _text(cols["group"][i]),
                _text(cols["text"][i]),
                _sidecar_for(full),
            )
        )
    return Discovery("list", sources, rejects)


def _key_from_path(full: str, base: str) -> str:
    """Key of a listed file without one: its path below the list's folder, else its stem."""
    prefix = base.rstrip("/") + "/"
    rel = full[len(prefix) :] if full.startswith(prefix) else full.rsplit("/", 1)[-1]
    return keys.from_parts(*_stem(rel).split("/"))


def _text(value) -> str | None:
    return None if value is None else str(value)


def _sidecar_for(audio: str) -> str | None:
    candidate = _stem(audio) + ".json"
    try:
        return candidate if storage.exists(candidate) else None
    except OSError:
        return None


def _fairseq_tsv(path: str) -> Discovery:
    """fairseq ``wav2vec_manifest.py`` output: the root, then ``relpath<TAB>num_samples``."""
    lines = storage.read_text(path).splitlines()
    if not lines or not lines[0].strip():
        raise ValueError(f"list {path!r} is empty; a fairseq tsv starts with the audio root")
    root = lines[0].strip()
    if not (os.path.isabs(root) or storage.is_url(root)):
        root = storage.join(storage.dirname(path), root)
    sources, rejects = [], []
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not fields[1].strip().isdigit() or not fields[0].strip():
            rejects.append(
                reject_row(
                    f"{path}:{n}",
                    Stage.DISCOVER,
                    Reason.BAD_LIST_ENTRY,
                    f"line {n} is not 'relpath<TAB>num_samples': {line[:200]!r}",
                )
            )
            continue
        rel = fields[0].strip()
        full = storage.join(root, rel)
        parts = _stem(rel).split("/")
        sources.append(
            Source(
                full,
                keys.from_parts(*parts),
                None,
                "/".join(parts[:-1]) or None,
                None,
                _sidecar_for(full),
            )
        )
    return Discovery("list", sources, rejects)
