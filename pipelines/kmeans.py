"""Fit k-means (optionally after PCA) on a feature store, distributed on Ray.

Example:
    python -m pipelines.kmeans --root /data/ls100 --features mfcc --k 100 --name mfcc100
    python -m pipelines.kmeans --root /data/ls100 --features hubert6 --k 500 --name h6k500 \\
        --fairseq-export
    python -m pipelines.kmeans --root /data/ll --features w2v14 --k 128 --name w2vu \\
        --pca 512 --init k-means++ --address auto

Rows: each Ray worker holds its share of the store's frames in memory (float32, read once)
or streams them from the store on every pass (bounded memory, a read per pass). --rows auto
(the default) says which before any work, from the store's size (its frames and dimension)
and the memory Ray offers each worker: it holds when the largest share takes at most 70% of
what a worker can get, and streams otherwise. The decision and its numbers are logged at
INFO and kept in kmeans.json and the run record ("rows_decision"). --rows hold where holding
would not fit is obeyed with a warning, not refused: the estimate is conservative, Ray's
memory is what nodes had when Ray started there, and an autoscaling cluster may grow into
it. --stream is --rows stream, as before.

Outputs go to ROOT/kmeans/NAME: centroids.npy, kmeans.json, iterations.parquet (and pca/,
kmeans.joblib). Iteration 0 is the initial centroids; iteration i, the centroids after i
updates; kmeans.json's "iterations" is the last. Rerunning the same command resumes from
the last finished iteration; a finished fit is left as it is. The run's JSON record goes to
ROOT/runs/kmeans-NAME.json (--record); stdout gets a summary.
"""

from __future__ import annotations

import sys

from . import _args, _cli
from ._schema import REQUIRED, Bool, Choice, Float, Int, Option, Optional, add_options

#: The library's choices (units.kmeans.estimator.INITS and ALGORITHMS), spelled here so that --help
#: imports no numerics; tests/pipelines/test_cli.py checks that they agree.
INITS = ("k-means||", "k-means++", "random")
ALGORITHMS = ("lloyd", "minibatch")
#: units.kmeans.memory.ROWS, spelled here for the same reason.
ROWS = ("auto", "hold", "stream")

#: The k-means options: the flags below, and the ``kmeans`` section of the hubert config.
#: Their ranges beyond the type (k fits uint16 units, ...) are the estimator's own checks
#: (:meth:`units.kmeans.estimator.KMeans.check_params`), run by :func:`check` before Ray starts.
OPTIONS = {
    "name": _args.name("kmeans"),
    "k": Option(Int(), REQUIRED, "number of clusters, 1 to 65536 (units are uint16)", "K"),
    "pca": Option(Optional(Int(lo=1)), None, "PCA to this dimension first", "DIM"),
    "whiten": Option(Bool(), False, "whiten the PCA projection"),
    "init": Option(Choice(INITS), "k-means||", "seeding"),
    "algorithm": Option(Choice(ALGORITHMS), "lloyd", "full passes, or mini-batches"),
    "max_iter": Option(Int(), 100, "iterations (mini-batch: passes over the data) at most", "N"),
    "tol": Option(Float(), 1e-4, "stop when the inertia improves by less than this fraction"),
    "seed": Option(Int(), 0, "seed of everything random"),
    "batch_size": Option(Int(), 10_000, "mini-batch rows", "ROWS"),
    "rows": Option(
        Choice(ROWS),
        "auto",
        "workers hold their rows in memory (float32, read once) or stream them from the store "
        "on every pass (bounded memory); auto holds when the largest worker's share takes at "
        "most 70%% of the memory Ray offers a worker, and streams otherwise",
    ),
    "stream": Option(Bool(), False, "the same as --rows stream (kept for existing scripts)"),
    "workers": _args.WORKERS,
    "gpus_per_worker": _args.gpus_per_worker(0),
    "fairseq_export": Option(
        Bool(), False, "also write kmeans.joblib, loadable by fairseq's dump_km_label.py"
    ),
}

RECORD = "ROOT/runs/kmeans-NAME.json"


def add_arguments(parser) -> None:
    _args.add_root(parser)
    parser.add_argument(
        "--features", required=True, metavar="NAME", help="feature store (ROOT/features/NAME)"
    )
    add_options(parser, OPTIONS)
    _args.add_progress(parser)
    _args.add_ray(parser)


def estimator(args):
    """The :class:`units.kmeans.estimator.KMeans` of ``args``, its parameters checked.

    Raises:
        UsageError: Parameters the estimator refuses (k out of 1..65536, max_iter < 1, ...).
    """
    from units.kmeans.estimator import KMeans

    km = KMeans(
        args.k,
        init=args.init,
        max_iter=args.max_iter,
        tol=args.tol,
        seed=args.seed,
        algorithm=args.algorithm,
        batch_size=args.batch_size,
    )
    try:
        km.check_params()
    except ValueError as e:
        raise _cli.UsageError(str(e)) from None
    return km


def rows(args) -> str:
    """What ``--rows`` and ``--stream`` ask for together: ``auto``, ``hold`` or ``stream``.
    The hubert config has no ``rows`` key: ``kmeans.stream`` alone decides there.

    Raises:
        UsageError: ``--stream`` with ``--rows hold``.
    """
    chosen = getattr(args, "rows", None) or "auto"
    if getattr(args, "stream", False):
        if chosen == "hold":
            raise _cli.UsageError(
                "--stream is --rows stream, and --rows hold says the opposite: give one of them"
            )
        return "stream"
    return chosen


def check(args) -> None:
    estimator(args)
    rows(args)


def prepare(args) -> None:
    _cli.check_writable(args.root)  # A read-only or full ROOT fails here, in a second.
    from units.features.store import FeatureStore

    try:  # A missing store is a usage error.
        FeatureStore(args.root, args.features)
    except FileNotFoundError as e:
        raise _cli.UsageError(str(e)) from None


def run(args) -> dict:
    from shards.core.outputs import StageError
    from units.kmeans.stage import StageOptions
    from units.kmeans.stage import run as fit

    from ._ray import connect

    connect(args)
    options = StageOptions(
        pca=args.pca,
        whiten=args.whiten,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        rows=rows(args),
        fairseq_export=args.fairseq_export,
        progress=args.progress,
    )
    try:
        return fit(args.root, args.features, args.name, estimator(args), options)
    except StageError as e:
        raise _cli.UsageError(str(e)) from None


def summarize(args, result: dict) -> str:
    hours = result.get("throughput", {}).get("hours_clustered")
    audio = f" ({hours:.3f} h of audio)" if hours is not None else ""
    stop = "converged" if result.get("converged") else "stopped at --max-iter"
    decision = result.get("rows_decision") or {}
    held = f", rows {decision['rows']}" if decision.get("rows") else ""
    what = (
        f"k={result['k']} on {result['rows']} frames of {result['features']}{audio}{held}, "
        f"{result['iterations']} iterations ({stop}), inertia "
        f"{result['inertia_per_frame']:.4g} per frame, in {args.root}/kmeans/{args.name}"
    )
    if not _cli.did_work(result):
        return f"kmeans: nothing to do: the fit is complete; {what}"
    return f"kmeans: {what}"


def record_path(args) -> str:
    return _cli.record_path(args.root, "kmeans", args.name)


def main(argv: list[str] | None = None) -> int:
    return _cli.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
