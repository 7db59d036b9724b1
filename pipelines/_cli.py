"""What every entry point shares: a parser whose help is the module docstring (with its
examples), logging to stderr, and one clear line (not a traceback) when the output cannot be
written: a full disk, a read-only or unwritable ROOT."""

from __future__ import annotations

import argparse
import errno
import functools
import logging
import os
import re
import sys
import uuid
from collections.abc import Callable


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """An argument parser for ``python -m PROG`` that shows ``doc`` verbatim in ``--help``."""
    return argparse.ArgumentParser(
        prog=f"python -m {prog}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


#: Errors of the output's file system that stop a stage, wherever they are raised, and what
#: to do about each.
_ADVICE = {
    errno.ENOSPC: "free space or choose another ROOT",
    errno.EDQUOT: "free space (or raise the quota) or choose another ROOT",
    errno.EROFS: "remount it read-write or choose another ROOT",
}


class UnwritableOutput(OSError):
    """The output root failed the probe of :func:`check_writable` (any errno)."""


def output_error(error: BaseException) -> OSError | None:
    """The file-system error (full disk, read-only or unwritable output) behind ``error``, if
    any: through Ray's wrappers (a worker's error arrives as ``RayTaskError`` with the
    ``OSError`` as its ``cause``) and chained exceptions."""
    seen: set[int] = set()
    todo = [error]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # ray.exceptions.RayTaskError
        if isinstance(cause, BaseException):
            todo.insert(0, cause)
        elif isinstance(e, UnwritableOutput) or (isinstance(e, OSError) and e.errno in _ADVICE):
            return e
        todo += [e.__cause__, e.__context__]
    return None


def _final_name(path: str) -> str:
    """A writer's hidden temporary file ``DIR/.NAME.tmp-...`` as the ``DIR/NAME`` it makes."""
    return re.sub(r"(^|/)\.([^/]+)\.tmp-[^/]*$", r"\1\2", path)


def describe_output_error(error: OSError, root: str | None = None) -> str:
    """One line that says which file could not be written, why, and what to do."""
    where = _final_name(os.fsdecode(error.filename)) if error.filename else None
    where = where or (f"under {root}" if root else "the output")
    name = errno.errorcode.get(error.errno, str(error.errno))
    reason = error.strerror or os.strerror(error.errno or 0)
    advice = _ADVICE.get(error.errno, "make it writable or choose another ROOT")
    return (
        f"unitpipe: cannot write {where}: {reason} ({name}) — {advice}; "
        "committed units are kept and a rerun resumes"
    )


def reports_output_errors(main: Callable[..., int]) -> Callable[..., int]:
    """Wraps an entry point: a full disk or a read-only or unwritable output ends it with
    exit status 1 and one line on stderr (:func:`describe_output_error`), not a traceback
    from a Ray worker. Other errors are raised as they are."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except Exception as e:
            found = output_error(e)
            if found is None:
                raise
            logging.getLogger("pipelines").debug("stopped by", exc_info=True)
            root = _checked[-1] if _checked else None
            print(describe_output_error(found, root), file=sys.stderr, flush=True)
            return 1

    return wrapper


#: Roots this process checked: an error that names no file (a full disk while writing an
#: open file) is said to be under the last of them.
_checked: list[str] = []


def check_writable(root: str, create: bool = False) -> None:
    """Fails in a second, before any work, when ``root`` cannot be written: creates and
    removes a hidden probe file there. Object-store roots and (unless ``create``) missing
    ones are left to the stage, which says what is missing.

    Raises:
        UnwritableOutput: Naming ``root`` (read-only file system, no space, no permission).
    """
    if "://" in root:
        return
    _checked.append(root)
    try:
        if create:
            os.makedirs(root, exist_ok=True)
        elif not os.path.isdir(root):
            return
        probe = os.path.join(root, f".unitpipe-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"\0")  # A full disk refuses the first byte.
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise UnwritableOutput(e.errno, e.strerror, root) from e


def describe_throughput(record: dict) -> str:
    """One line of a stage's throughput record (:func:`shards.throughput.record`)."""
    hours = next(v for k, v in record.items() if k.startswith("hours_"))
    return (
        f"{hours:.3f} h in {record['wall_seconds']:.1f} s, "
        f"{record['audio_hours_per_second_per_worker']:.3f} audio-h/s per worker "
        f"({record['workers']}), {record['bytes_read']} bytes read, "
        f"{record['bytes_written']} written"
    )
