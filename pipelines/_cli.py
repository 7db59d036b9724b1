"""What every entry point shares: one parser per stage whose help is the module docstring
(with its examples), one-line usage errors (exit status 2) before any work, logging set up in
one place, the run record written to a file and a short summary on stdout, and one clear
line (not a traceback) when the output cannot be written: a full disk, a read-only or
unwritable ROOT.

A stage module (``pipelines.shard``, ``pipelines.kmeans``, ...) defines:

- ``add_arguments(parser)``: its flags (the shared ones come from :mod:`pipelines._args`);
- ``check(args)``: every check of the arguments alone, before Ray starts; raises
  :class:`UsageError` (or returns an exit status to stop early, as ``--print-config``);
- ``prepare(args)`` (optional): the checks against ROOT (writable, the inputs exist);
- ``run(args)``: connects to Ray and runs the stage; returns its result (a dict);
- ``summarize(args, result)``: what it did and where the output is (the throughput and
  the record's path follow, :func:`record_and_summarize`);
- ``record_path(args)``: where its record goes by default, and ``RECORD``: that, for --help.

``python -m pipelines.X`` and ``unitpipe X`` build the same parser (:func:`configure`) and
run it with :func:`execute`. Stage modules import torch, Ray, scipy and the library only
inside these functions, so ``--help`` stays quick.
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Callable
from types import ModuleType

from . import _args

log = logging.getLogger("pipelines")


class UsageError(ValueError):
    """Arguments, a config or a ROOT that cannot work: one line on stderr, exit status 2."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit status 2): the usage
    line that argparse prints first is in ``--help``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def one_line(message: object) -> str:
    """A message on one line (a YAML error, say, spans several)."""
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


def configure(parser: argparse.ArgumentParser, module: ModuleType) -> argparse.ArgumentParser:
    """Gives ``parser`` the stage's flags, then the logging and record flags of every stage;
    its help shows the module docstring verbatim."""
    parser.description = module.__doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    module.add_arguments(parser)
    _args.add_output(parser, record=getattr(module, "RECORD", None))
    parser.set_defaults(prog=parser.prog)
    return parser


def main(module: ModuleType, argv: list[str] | None = None) -> int:
    """``python -m MODULE ARGS``: parses ``argv`` and runs the stage (:func:`execute`)."""
    # Run with -m, a module is __main__; its spec keeps the name it was run by.
    name = module.__spec__.name if module.__spec__ is not None else module.__name__
    parser = configure(Parser(prog=f"python -m {name}"), module)
    return execute(module, parser.parse_args(argv))


def execute(module: ModuleType, args: argparse.Namespace) -> int:
    """Checks, prepares, runs and reports a stage; returns the exit status.

    0: done (the record written, its summary on stdout). 1: the output could not be
    written (:func:`reports_output_errors`). 2: a usage error, before any work when the
    arguments alone show it.
    """
    setup_logging(args.log_level)

    @reports_output_errors
    def go(_argv=None) -> int:
        try:
            early = module.check(args)
            if early is not None:
                return early
            if hasattr(module, "prepare"):
                module.prepare(args)
            result = module.run(args)
        except UsageError as e:
            print(f"{args.prog}: error: {one_line(e)}", file=sys.stderr, flush=True)
            return 2
        print(record_and_summarize(module, args, result), flush=True)
        return 0

    return go()


def record_and_summarize(module: ModuleType, args: argparse.Namespace, result: dict) -> str:
    """Writes the stage's record; returns its summary: what was done, its throughput (when
    it did work) and where the record is."""
    path = args.record or module.record_path(args)
    write_record(path, result)
    lines = [module.summarize(args, result)]
    if did_work(result) and isinstance(result.get("throughput"), dict):
        lines.append("  " + describe_throughput(result["throughput"]))
    lines.append(f"  record: {path}")
    return "\n".join(lines)


def did_work(result: dict) -> bool:
    """Whether a stage wrote anything (``shards_written``; ``written`` for k-means)."""
    return bool(result.get("shards_written", result.get("written", True)))


def record_path(root: str, stage: str, name: str | None = None) -> str:
    """``ROOT/runs/STAGE-NAME.json``: the record of a stage's last run."""
    return os.path.join(root, "runs", f"{stage}-{name}.json" if name else f"{stage}.json")


def write_record(path: str, record: dict) -> None:
    """Writes ``record`` as JSON at ``path`` (a local path or a URL), atomically: a reader
    sees the last run's whole record or the one before."""
    from shards.core import storage
    from shards.core.atomic import write_atomic

    directory = os.path.dirname(path)
    if directory:
        storage.makedirs(directory)
    text = json.dumps(record, indent=1, sort_keys=True, default=str) + "\n"
    write_atomic(path, text.encode())


class _TqdmHandler(logging.Handler):
    """Log lines on stderr through ``tqdm.write``: a line printed while a progress bar is
    live goes above the bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # Logging must never raise.
            self.handleError(record)


def setup_logging(level: str = "INFO") -> None:
    """The one logging setup of every entry point: ``level`` and above on stderr.

    Calling it again replaces its own handler (a test or a program may run several entry
    points in one process) and leaves other handlers alone. Matplotlib's INFO lines (its
    font cache) are noise to a user: it logs warnings and errors only.
    """
    value = logging.getLevelName(level.upper())
    if not isinstance(value, int):
        raise ValueError(f"unknown log level {level!r}")
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _TqdmHandler)]:
        root.removeHandler(handler)
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(value)
    logging.getLogger("matplotlib").setLevel(max(value, logging.WARNING))


def timed(started: float) -> str:
    """Seconds since ``started`` (``time.monotonic()``), for a summary."""
    return f"{time.monotonic() - started:.1f} s"


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
    """One line of a stage's throughput record (:func:`shards.core.throughput.record`)."""
    hours = next(v for k, v in record.items() if k.startswith("hours_"))
    return (
        f"{hours:.3f} h in {record['wall_seconds']:.1f} s, "
        f"{record['audio_hours_per_second_per_worker']:.3f} audio-h/s per worker "
        f"({record['workers']}), {record['bytes_read']} bytes read, "
        f"{record['bytes_written']} written"
    )
