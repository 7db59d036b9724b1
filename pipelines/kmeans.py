"""Fit k-means (optionally after PCA) on a feature store, distributed on Ray.

Example:
    python -m pipelines.kmeans --root /data/ls100 --features mfcc --k 100 --name mfcc100
    python -m pipelines.kmeans --root /data/ls100 --features hubert6 --k 500 --name h6k500 \\
        --fairseq-export
    python -m pipelines.kmeans --root /data/ll --features w2v14 --k 128 --name w2vu \\
        --pca 512 --init k-means++ --address auto

Outputs go to ROOT/kmeans/NAME: centroids.npy, kmeans.json, iterations.parquet (and pca/,
kmeans.joblib). Rerunning the same command resumes from the last finished iteration; a
finished fit is left as it is.
"""

from __future__ import annotations

import argparse
import json
import sys

from units.kmeans import ALGORITHMS, INITS

from . import _cli
from ._ray import add_ray_arguments, connect


def build_parser() -> argparse.ArgumentParser:
    parser = _cli.parser("pipelines.kmeans", __doc__)
    parser.add_argument("--root", required=True, help="dataset root")
    parser.add_argument("--features", required=True, help="feature store (ROOT/features/NAME)")
    parser.add_argument("--name", required=True, help="output name (ROOT/kmeans/NAME)")
    parser.add_argument("--k", type=int, required=True, help="number of clusters")
    parser.add_argument("--pca", type=int, default=None, help="PCA to this dimension first")
    parser.add_argument("--whiten", action="store_true", help="whiten the PCA projection")
    parser.add_argument("--init", choices=INITS, default="k-means||", help="(default: %(default)s)")
    parser.add_argument(
        "--algorithm", choices=ALGORITHMS, default="lloyd", help="(default: %(default)s)"
    )
    parser.add_argument("--max-iter", type=int, default=100, help="(default: %(default)s)")
    parser.add_argument(
        "--tol", type=float, default=1e-4, help="relative inertia change (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument(
        "--batch-size", type=int, default=10_000, help="mini-batch rows (default: %(default)s)"
    )
    parser.add_argument(
        "--stream",
        action="store_true",
        help="workers read rows from the store on every pass instead of holding them",
    )
    parser.add_argument("--workers", type=int, default=None, help="actors (default: all CPUs)")
    parser.add_argument(
        "--gpus-per-worker", type=float, default=0, help="GPUs per actor (default: %(default)s)"
    )
    parser.add_argument(
        "--fairseq-export",
        action="store_true",
        help="also write kmeans.joblib, loadable by fairseq's dump_km_label.py",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_ray_arguments(parser)
    return parser


@_cli.reports_output_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _cli.setup_logging()
    _cli.check_writable(args.root)  # A read-only or full ROOT fails here, in a second.
    for flag, value in (("--k", args.k), ("--max-iter", args.max_iter)):
        if value < 1:
            print(f"error: {flag} must be >= 1, got {value}", file=sys.stderr)
            return 2
    if args.pca is not None and args.pca < 1:
        print(f"error: --pca must be >= 1, got {args.pca}", file=sys.stderr)
        return 2
    from units.feature_store import FeatureStore

    try:  # Before Ray starts: a missing store is a usage error.
        FeatureStore(args.root, args.features)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    connect(args)
    from units.kmeans import KMeans
    from units.kmeans_ray import KMeansStageError, StageOptions, run

    km = KMeans(
        args.k,
        init=args.init,
        max_iter=args.max_iter,
        tol=args.tol,
        seed=args.seed,
        algorithm=args.algorithm,
        batch_size=args.batch_size,
    )
    options = StageOptions(
        pca=args.pca,
        whiten=args.whiten,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        hold=not args.stream,
        fairseq_export=args.fairseq_export,
        progress=not args.no_progress,
    )
    try:
        meta = run(args.root, args.features, args.name, km, options)
    except KMeansStageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(meta, indent=1, sort_keys=True))
    if not meta["written"]:
        print(f"nothing to do: k-means {args.name} is complete")
    else:
        rate = meta["throughput"]
        print(
            f"wrote {args.root}/kmeans/{args.name}: k={meta['k']}, {meta['iterations']} "
            f"iterations, inertia {meta['inertia_per_frame']:.4g} per frame: "
            + _cli.describe_throughput(rate)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
