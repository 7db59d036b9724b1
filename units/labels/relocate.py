"""A fairseq export that works again after its root moved: ``unitpipe relocate``.

fairseq joins a tsv's first line with each line's path (``FileAudioDataset``,
``HubertDataset``), and a relative first line would be read against the trainer's working
directory, not the tsv's; so the first line is absolute and a moved root needs it
rewritten. That is all that changes: the ``audio/NNNNNN.zip`` links are relative
(``../../../../shards/NNNNNN.tar``) and move with the root, and the label files hold no
paths.

An export that mixes source files and shard members (``--fairseq-audio source``) has ``/``
as its first line and absolute paths on every line: there the shard lines (``…/audio/
NNNNNN.zip:OFFSET:SIZE``) are rewritten to the export's own audio directory and source
lines are left as they are (the sources live outside the root; each is checked to exist).
"""

from __future__ import annotations

import json
import os
import re

from shards.core.atomic import PendingFile, read_json, write_atomic
from shards.core.outputs import StageError

#: A tsv path into a linked shard: ``[DIR/]audio/NNNNNN.zip:OFFSET:SIZE``.
_SHARD_LINE = re.compile(r"^(?:.*/)?audio/(\d+\.zip:\d+:\d+)\t")


def relocate(directory: str, shards_dir: str | None = None) -> dict:
    """Points the fairseq export in ``directory`` at where it is now.

    Rewrites the first line of every ``*.tsv`` (streamed to a temporary file and renamed:
    a tsv is never half rewritten) and checks that every ``audio/*.zip`` link reaches its
    shard. An export that is already in place is left untouched.

    Args:
        directory: A fairseq export (``ROOT/labels/NAME/fairseq``,
            ``ROOT/pieces/NAME/fairseq``), local.
        shards_dir: Link ``audio/*.zip`` to the tars in this directory instead (for an export
            moved without its root's shards).

    Returns:
        What changed: ``{"directory", "audio", "rewritten": [tsv names], "relinked": n}``.

    Raises:
        StageError: Not a fairseq export, a link whose shard is missing, a source file that
            is gone.
    """
    directory = os.path.abspath(directory)
    record = read_json(os.path.join(directory, "export.json"))
    if record is None:
        raise StageError(f"{directory}: no export.json, not a finished fairseq export")
    audio = os.path.join(directory, "audio")
    relinked = _relink(audio, shards_dir) if shards_dir is not None else 0
    _check_links(audio)
    rewritten = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".tsv") and _rewrite(os.path.join(directory, name), audio):
            rewritten.append(name)
    if rewritten:
        record["audio_dir"] = audio
        write_atomic(os.path.join(directory, "export.json"), json.dumps(record, indent=1).encode())
    return {"directory": directory, "audio": audio, "rewritten": rewritten, "relinked": relinked}


def _rewrite(tsv: str, audio: str) -> bool:
    """Rewrites one tsv for ``audio``; False when it already points there."""
    with open(tsv, encoding="utf-8") as f:
        top = f.readline().rstrip("\n")
        if top != "/":
            if top == audio:
                return False
            with PendingFile(tsv, "w", encoding="utf-8") as out:
                out.file.write(audio + "\n")
                for line in f:  # Relative to the first line: unchanged.
                    out.file.write(line)
                out.publish()
            return True
        # Absolute lines: shard members move to this export's audio, sources stay.
        prefix = audio.lstrip("/") + "/"
        changed = False
        with PendingFile(tsv, "w", encoding="utf-8") as out:
            out.file.write("/\n")
            for number, line in enumerate(f, 2):
                match = _SHARD_LINE.match(line)
                if match is None:
                    source = "/" + line.split("\t", 1)[0]
                    if not os.path.exists(source):
                        raise StageError(
                            f"{tsv}, line {number}: source file {source} is gone; re-export "
                            "with --fairseq-audio shards"
                        )
                    out.file.write(line)
                    continue
                new = prefix + match.group(1) + line[match.end(1) :]
                changed |= new != line
                out.file.write(new)
            if changed:
                out.publish()
        return changed


def _relink(audio: str, shards_dir: str) -> int:
    """Points every ``audio/NNNNNN.zip`` at ``shards_dir/NNNNNN.tar`` (relative links)."""
    shards_dir = os.path.abspath(shards_dir)
    count = 0
    for name in sorted(os.listdir(audio)):
        if not name.endswith(".zip"):
            continue
        target = os.path.join(shards_dir, name[: -len(".zip")] + ".tar")
        if not os.path.exists(target):
            raise StageError(f"--shards {shards_dir}: no {os.path.basename(target)} for {name}")
        link = os.path.join(audio, name)
        temp = link + ".relink"
        os.symlink(os.path.relpath(target, audio), temp)
        os.replace(temp, link)  # Atomic: the link is always one of the two.
        count += 1
    return count


def _check_links(audio: str) -> None:
    for name in sorted(os.listdir(audio)):
        link = os.path.join(audio, name)
        if name.endswith(".zip") and not os.path.exists(link):
            raise StageError(
                f"{link} -> {os.readlink(link)}: the shard is not there. Move the root as a "
                "whole (the links are relative), or give the shards' directory with --shards"
            )
