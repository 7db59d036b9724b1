"""The flags several stages share, each defined once: the dataset root and output names,
Ray workers, the progress bar, logging and the run record. Ray's own group (``--address``,
``--num-cpus``) is :data:`RAY` here too; :mod:`pipelines._ray` connects with it.

Only the standard library is imported here: building a parser (``--help``) must not load
torch, Ray or scipy.
"""

from __future__ import annotations

from ._schema import REQUIRED, Float, Int, Option, Optional, Str, add_option, add_options

ROOT = Option(Str(), REQUIRED, "dataset root: a local path or a URL (s3://bucket/prefix)", "ROOT")

#: Ray workers of the stages that run them (k-means actors; label and wav2vec-U tasks at once).
WORKERS = Option(Optional(Int(lo=1)), None, "Ray workers (default: one per CPU)", "N")

#: In-process local Ray or a cluster; also the ``ray`` section of the hubert config.
RAY = {
    "address": Option(
        Optional(Str()),
        None,
        "Ray cluster to join (also RAY_ADDRESS; under `ray job submit` it is set for you). "
        "Default: start Ray in this process",
    ),
    "num_cpus": Option(
        Optional(Int(lo=1)), None, "CPUs for in-process local Ray (default: all)", "N"
    ),
}

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def name(what: str) -> Option:
    """A required output or input name, ``ROOT/<what>/NAME``."""
    return Option(Str(), REQUIRED, f"name under ROOT/{what}/", "NAME")


def gpus_per_worker(default: float | None) -> Option:
    """GPUs per actor; ``None`` lets the stage take one per actor when the cluster has GPUs."""
    if default is None:
        return Option(
            Optional(Float(ge=0)),
            None,
            "GPUs per actor (default: 1 when the cluster has GPUs; 0 for CPUs only)",
            "G",
        )
    return Option(Float(ge=0), default, "GPUs per actor; 0 runs on CPUs", "G")


def add_root(parser, *, flag_help: str | None = None) -> None:
    """``--root ROOT``."""
    option = ROOT if flag_help is None else Option(ROOT.kind, REQUIRED, flag_help, "ROOT")
    add_option(parser, "root", option)


def add_ray(parser) -> None:
    """``--address`` and ``--num-cpus``: in-process local Ray, or a cluster."""
    add_options(parser.add_argument_group("ray"), RAY)


def add_progress(parser) -> None:
    """``--no-progress``: the live bars on stderr are on by default."""
    parser.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bars on stderr",
    )


def add_output(parser, *, record: str | None) -> None:
    """``--log-level``, ``-q/--quiet`` and, for stages that keep one, ``--record PATH``
    (``record`` is the default path, as help shows it)."""
    group = parser.add_argument_group("output")
    levels = group.add_mutually_exclusive_group()
    levels.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default="INFO",
        metavar="LEVEL",
        help="log messages of this level and above on stderr: "
        f"{', '.join(LOG_LEVELS)} (default: %(default)s; DEBUG adds every k-means iteration)",
    )
    levels.add_argument(
        "-q",
        "--quiet",
        dest="log_level",
        action="store_const",
        const="WARNING",
        help="warnings and errors only (--log-level WARNING)",
    )
    if record is not None:
        group.add_argument(
            "--record",
            default=None,
            metavar="PATH",
            help="where this run's JSON record goes, written atomically (local path or URL; "
            f"default: {record}). Stdout gets a summary only",
        )
    parser.set_defaults(record=None)
