"""Finding the inputs of a corpus: LibriSpeech, Libri-light, any audio tree, or a list file.

Discovery only lists and reads small text files (transcripts, list files); it never opens
audio. Each input becomes a :class:`Source` with a key; lines of a list that cannot be
parsed become reject rows, never exceptions.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from . import keys
from .core import storage
from .schemas import SOURCES, Reason, Stage, reject_row

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
    """What one corpus location holds.

    Attributes:
        layout: The layout used.
        table: One row per input (:data:`shards.schemas.SOURCES`): columns, not objects, so
            that 10 million inputs cost the driver a few hundred bytes each.
        rejects: Reject rows for list lines and file names that could not be used.
    """

    layout: str
    table: pa.Table
    rejects: list[dict]

    @property
    def sources(self) -> list[Source]:
        """The inputs as :class:`Source` objects, one per row: for small lists and tests."""
        return [Source(**row) for row in self.table.to_pylist()]


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


class _Columns:
    """Sources gathered column by column while a tree is walked (no object per file)."""

    def __init__(self):
        self.cols: dict[str, list] = {name: [] for name in SOURCES.names}

    def add(self, path, key, speaker=None, group=None, text=None, sidecar=None) -> None:
        for name, value in zip(
            SOURCES.names, (path, key, speaker, group, text, sidecar), strict=True
        ):
            self.cols[name].append(value)

    def table(self) -> pa.Table:
        return pa.table(self.cols, schema=SOURCES)


def _tree(root: str, files: list[str], extensions, *, librilight: bool, into=None) -> pa.Table:
    names = set(files)
    out = _Columns() if into is None else into
    for rel in files:
        if not _is_audio(rel, extensions):
            continue
        stem = _stem(rel)
        parts = stem.split("/")
        sidecar = storage.join(root, stem + ".json") if stem + ".json" in names else None
        if librilight and len(parts) >= 3:
            speaker, book, name = parts[-3:]
            key = keys.from_parts(speaker, book, name)
            out.add(storage.join(root, rel), key, speaker, book, None, sidecar)
        else:
            group = "/".join(parts[:-1]) or None
            out.add(storage.join(root, rel), keys.from_parts(*parts), None, group, None, sidecar)
    return out.table()


def _librispeech(root: str, files: list[str], extensions) -> pa.Table:
    transcripts: dict[str, str] = {}
    for rel in files:
        if rel.endswith(".trans.txt"):
            for line in storage.read_text(storage.join(root, rel)).splitlines():
                utt, _, text = line.strip().partition(" ")
                if utt:
                    transcripts[utt] = text
    out, stray = _Columns(), []
    for rel in files:
        if not _is_audio(rel, extensions):
            continue
        m = _LIBRISPEECH.match("/".join(rel.split("/")[-3:]))
        if m:
            speaker, chapter, utt = m.groups()
            out.add(storage.join(root, rel), utt, speaker, chapter, transcripts.get(utt), None)
        else:  # A stray file in a LibriSpeech tree is still an input, keyed by its path.
            stray.append(rel)
    return _tree(root, stray, extensions, librilight=False, into=out)


def _discover_list(path: str) -> Discovery:
    """A ``.tsv``/``.csv``/``.jsonl``/``.parquet`` list, column at a time.

    Everything per row is an Arrow compute kernel; Python runs only for the rare row that
    needs it (a missing path, a key or path that is not plain ASCII), so 10 million rows
    take seconds, not hours (building a fallback list per row once made this quadratic).
    """
    lower = path.lower()
    if lower.endswith(".tsv"):
        return _fairseq_tsv(path)
    readers = {".csv": pacsv.read_csv, ".jsonl": pajson.read_json, ".parquet": pq.read_table}
    read = next((r for ext, r in readers.items() if lower.endswith(ext)), None)
    if read is None:
        raise ValueError(f"list {path!r}: unknown list format; use {', '.join(LIST_EXTENSIONS)}")
    with storage.open_input(path) as f:  # Read as a stream: the file's bytes are not held.
        table = read(f)
    if "path" not in table.column_names:
        raise ValueError(
            f"list {path!r} has no 'path' column (columns: {', '.join(table.column_names)}); "
            "add one holding each audio file's path, absolute or relative to the list"
        )
    paths = _strings(table.column("path"))
    blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(paths), ""), True)
    rejects = []
    first_line = 2 if lower.endswith(".csv") else 1  # A CSV's header is its line 1.
    for i in np.flatnonzero(blank.to_numpy(zero_copy_only=False)):
        line = int(i) + first_line
        rejects.append(
            reject_row(
                f"{path}:{line}", Stage.DISCOVER, Reason.BAD_LIST_ENTRY, f"row {line} has no path"
            )
        )
    if rejects:
        table = table.filter(pc.invert(blank))
        paths = _strings(table.column("path"))
    base = storage.dirname(path)
    full = _resolve(paths, base)
    given = (
        _strings(table.column("key"))
        if "key" in table.column_names
        else pa.nulls(len(full), pa.string())
    )
    given = pc.if_else(pc.equal(given, ""), pa.scalar(None, pa.string()), given)
    key = _sanitized(given)
    if key.null_count:  # Keys from the paths of the rows without one (all, with no column).
        if key.null_count == len(key):
            key = _keys_from_paths(full, base)
        else:
            missing = np.flatnonzero(pc.is_null(key).to_numpy(zero_copy_only=False))
            key = _replace_at(key, missing, _keys_from_paths(full.take(missing), base))
    optional = {
        c: _strings(table.column(c))
        if c in table.column_names
        else pa.nulls(len(full), pa.string())
        for c in ("speaker", "group", "text")
    }
    sources = pa.table(
        [full, key, optional["speaker"], optional["group"], optional["text"], _sidecars(full)],
        schema=SOURCES,
    )
    return Discovery("list", sources, rejects)


def _strings(column: pa.ChunkedArray) -> pa.Array:
    """A list column as strings, as ``str(value)`` would write each value."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_string(column.type):
        return column
    if pa.types.is_large_string(column.type) or pa.types.is_integer(column.type):
        return column.cast(pa.string())  # Same text as str() for these types.
    if pa.types.is_null(column.type):
        return pa.nulls(len(column), pa.string())
    # Floats, booleans ...: Python's own str() (Arrow writes 1.0 as "1").
    return pa.array([None if v is None else str(v) for v in column.to_pylist()], pa.string())


def _resolve(paths: pa.Array, base: str) -> pa.Array:
    """Absolute paths and URLs as they are; the rest joined onto the list's folder."""
    # storage.join's result around a marker: what goes before and after a relative path
    # (a URL keeps its query after the path).
    prefix, suffix = storage.join(base, "\x00").split("\x00")
    absolute = pc.or_(
        pc.starts_with(paths, "/"),
        pc.and_(pc.match_substring(paths, "://"), pc.invert(pc.starts_with(paths, "file://"))),
    )
    return pc.if_else(absolute, paths, pc.binary_join_element_wise(prefix, paths, suffix, ""))


#: Keys that :func:`keys.sanitize` returns unchanged: ASCII word characters and hyphens,
#: with no underscore at either end. Anything else goes through Python's own regex.
_PLAIN_KEY = r"^[A-Za-z0-9\-](?:[A-Za-z0-9_\-]*[A-Za-z0-9\-])?$"


def _sanitized(given: pa.Array) -> pa.Array:
    """:func:`keys.sanitize` of each value; plain keys (almost all) in one kernel."""
    plain = pc.fill_null(pc.match_substring_regex(given, _PLAIN_KEY), True)
    if pc.all(plain).as_py():
        return given
    odd = np.flatnonzero(~plain.to_numpy(zero_copy_only=False))
    fixed = pa.array([keys.sanitize(v) for v in given.take(odd).to_pylist()], pa.string())
    return _replace_at(given, odd, fixed)


#: A path's stem below its folder whose parts :func:`keys.from_parts` only joins with ``_``.
_PLAIN_STEM = (
    r"^[A-Za-z0-9\-](?:[A-Za-z0-9_\-]*[A-Za-z0-9\-])?"
    r"(?:/[A-Za-z0-9\-](?:[A-Za-z0-9_\-]*[A-Za-z0-9\-])?)*$"
)


def _keys_from_paths(full: pa.Array, base: str) -> pa.Array:
    """The key of each listed file without one: its path below the list's folder (else its
    file name), extension dropped."""
    prefix = base.rstrip("/") + "/"
    below = pc.starts_with(full, prefix)
    name = pc.replace_substring_regex(full, r"^.*/", "")
    return _keys_from_rel(pc.if_else(below, pc.utf8_slice_codeunits(full, len(prefix)), name))


def _keys_from_rel(rel: pa.Array) -> pa.Array:
    """``keys.from_parts(*_stem(rel).split("/"))`` of each relative path."""
    # _stem: drop what follows the last dot of the last part, if that part has one.
    stem = pc.replace_substring_regex(rel, r"\.[^./]*$", "")
    key = pc.replace_substring(stem, "/", "_")
    plain = pc.match_substring_regex(stem, _PLAIN_STEM).to_numpy(zero_copy_only=False)
    if plain.all():
        return key
    odd = np.flatnonzero(~plain)
    fixed = [keys.from_parts(*_stem(r).split("/")) for r in rel.take(odd).to_pylist()]
    return _replace_at(key, odd, pa.array(fixed, pa.string()))


def _replace_at(values: pa.Array, where: np.ndarray, new: pa.Array) -> pa.Array:
    """``values`` with ``values[where[i]] = new[i]``."""
    index = np.full(len(values), -1, dtype=np.int64)
    index[where] = np.arange(len(where))
    mask = pa.array(index >= 0)
    return pc.if_else(mask, new.take(pa.array(np.maximum(index, 0))), values)


def _sidecars(full: pa.Array) -> pa.Array:
    """Each file's Libri-light ``.json`` sidecar (same folder, same stem), or null.

    Found by listing each folder once, not by asking per file whether one exists: on
    object storage a listing returns a thousand names per request, where a per-file check
    is a round trip each (hours for Libri-light's 220k files).
    """
    folder = pc.replace_substring_regex(full, r"/[^/]*$", "")
    wanted = pc.binary_join_element_wise(
        pc.replace_substring_regex(full, r"\.[^./]*$", ""), ".json", ""
    )
    folders = pc.unique(folder).to_pylist()
    del folder  # As long as every path: not kept while the folders are listed.
    present = []
    for directory in folders:
        try:
            names = storage.listdir(directory)
        except OSError:  # An unreadable folder: its files' probes say why.
            continue
        present.extend(f"{directory}/{n}" for n in names if n.endswith(".json"))
    if not present:
        return pa.nulls(len(full), pa.string())
    found = pc.is_in(wanted, value_set=pa.array(present, pa.string()))
    return pc.if_else(found, wanted, pa.scalar(None, pa.string()))


def _fairseq_tsv(path: str) -> Discovery:
    """fairseq ``wav2vec_manifest.py`` output: the root, then ``relpath<TAB>num_samples``."""
    lines = storage.read_text(path).splitlines()
    if not lines or not lines[0].strip():
        raise ValueError(f"list {path!r} is empty; a fairseq tsv starts with the audio root")
    root = lines[0].strip()
    if not (os.path.isabs(root) or storage.is_url(root)):
        root = storage.join(storage.dirname(path), root)
    rels, rejects = [], []
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
        rels.append(fields[0].strip())
    del lines
    relative = pa.array(rels, pa.string())
    stems = pc.replace_substring_regex(relative, r"\.[^./]*$", "")
    full = _resolve(relative, root)
    group = pc.replace_substring_regex(stems, r"/?[^/]*$", "")
    group = pc.if_else(pc.equal(group, ""), pa.scalar(None, pa.string()), group)
    sources = pa.table(
        [
            full,
            _keys_from_rel(relative),
            pa.nulls(len(full), pa.string()),
            group,
            pa.nulls(len(full), pa.string()),
            _sidecars(full),
        ],
        schema=SOURCES,
    )
    return Discovery("list", sources, rejects)
