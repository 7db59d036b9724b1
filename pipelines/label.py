"""Label every utterance of a sharded corpus with the units of a finished k-means, on Ray.

The features are computed again, streaming, with exactly the spec the k-means was fitted on
(extractor, checkpoint, layer, PCA); they are never written. Units go to
ROOT/labels/NAME/units/*.parquet (key, units, frames, frame_rate): one Parquet dataset.

With --fairseq-splits, also ROOT/labels/NAME/fairseq/{split}.tsv, {split}.km and
dict.km.txt for fairseq's HuBERT training (audio paths point into the shards, no copies).

Example:
    python -m pipelines.label --root /data/ls100 --kmeans mfcc100 --name it1 \\
        --fairseq-splits train=99,valid=1 --split-by speaker
    python -m pipelines.label --root /data/ll --kmeans h6k500 --name it2 --gpus-per-worker 1

Rerunning the same command resumes; a finished label set is left as it is.
"""

from __future__ import annotations

import json
import sys

from . import _cli
from ._ray import add_ray_arguments, connect


def build_parser():
    parser = _cli.parser("pipelines.label", __doc__)
    parser.add_argument("--root", required=True, help="dataset root")
    parser.add_argument("--kmeans", required=True, help="finished k-means (ROOT/kmeans/NAME)")
    parser.add_argument("--name", required=True, help="label set name (ROOT/labels/NAME)")
    parser.add_argument("--workers", type=int, default=None, help="actors (default: all CPUs)")
    parser.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        help="GPUs per actor (default: 1 when the cluster has GPUs; 0 for CPUs only)",
    )
    parser.add_argument(
        "--extractor",
        default=None,
        help="hf:PATH or fairseq:PATH to use instead of the checkpoint path the k-means "
        "recorded (a moved model); it must compute the same features (sha256, layer)",
    )
    parser.add_argument("--layer", type=int, default=None, help="layer, with --extractor")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--dedup",
        action="store_true",
        help="also store GSLM-style deduplicated units with their durations",
    )
    parser.add_argument(
        "--fairseq-splits",
        default=None,
        help="NAME=PERCENT,...: write fairseq's tsv/km/dict for these splits (add up to 100)",
    )
    parser.add_argument(
        "--split-by",
        choices=("utterance", "speaker"),
        default="utterance",
        help="(default: %(default)s)",
    )
    parser.add_argument("--split-seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument(
        "--fairseq-audio",
        choices=("shards", "source"),
        default="shards",
        help="tsv paths into the shard tars, or the original files where an utterance is a "
        "whole 16 kHz mono file (default: %(default)s)",
    )
    add_ray_arguments(parser)
    return parser


def parse_splits(text: str) -> dict[str, float]:
    """``train=99,valid=1`` -> ``{"train": 99.0, "valid": 1.0}``."""
    out = {}
    for part in text.split(","):
        name, sep, percent = part.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--fairseq-splits: {part!r} is not NAME=PERCENT")
        out[name.strip()] = float(percent)
    return out


@_cli.reports_output_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _cli.setup_logging()
    _cli.check_writable(args.root)  # A read-only or full ROOT fails here, in a second.
    from units import extractors
    from units.labels import KMeansModel, LabelError, check_spec

    requested = None
    try:  # Before Ray starts: a missing k-means, bad splits, other features: usage errors.
        splits = parse_splits(args.fairseq_splits) if args.fairseq_splits else None
        model = KMeansModel.load(args.root, args.kmeans)
        if args.extractor is not None:
            requested = extractors.ExtractorOptions(args.extractor, layer=args.layer)
            check_spec(args.kmeans, model.spec, extractors.build(requested).spec)
    except (LabelError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    connect(args)
    from units.labels_ray import run

    try:
        meta = run(
            args.root,
            args.kmeans,
            args.name,
            workers=args.workers,
            gpus_per_worker=args.gpus_per_worker,
            extractor=requested,
            dedup=args.dedup,
            progress=not args.no_progress,
        )
    except LabelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(meta, indent=1, sort_keys=True))
    if meta["shards_written"] == 0:
        print(f"nothing to do: labels {args.name} are complete")
    else:
        rate = meta["throughput"]
        print(
            f"labelled {meta['utterances']} utterances ({meta['frames']} frames at "
            f"{meta['frame_rate']:g} Hz) into {args.root}/labels/{args.name}/units: "
            + _cli.describe_throughput(rate)
        )
    if splits:
        from units.fairseq_export import export

        try:
            record = export(
                args.root,
                args.name,
                splits,
                by=args.split_by,
                seed=args.split_seed,
                audio=args.fairseq_audio,
            )
        except LabelError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"fairseq export: {record['splits']} at label_rate {record['label_rate']:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
