"""Prepare wav2vec-U audio features from a sharded corpus, on Ray.

The steps of fairseq's prepare_audio.sh in one resumable job: layer features (layer 14 of a
wav2vec 2.0 large by default) -> k-means (k=128) on them -> PCA (512) -> for every
utterance, merge consecutive frames of one cluster by their mean -> mean-pool by 0.5. Writes
ROOT/w2vu/NAME/{split}.npy, {split}.lengths and {split}.tsv in the layout of fairseq's
extracted-features dataset, with the PCA in ROOT/w2vu/NAME/pca.

Every step uses the one feature spec (model, layer, waveform normalisation) recorded with
the features, so the clusters, the PCA and the output can never disagree (fairseq#4464).

Example:
    python -m pipelines.w2vu --root /data/ls100 --name w2vu \\
        --extractor fairseq:/models/wav2vec_vox_new.pt --splits train=98,valid=2
    python -m pipelines.w2vu --root /data/ls100 --name w2vu --features w2v14 \\
        --splits train=90,valid=5,test=5 --split-by speaker --gpus-per-worker 1

With --extractor, layer features of --percent of the corpus are first extracted into
ROOT/features/NAME-layerL (skipped when complete). Rerunning the same command resumes.
"""

from __future__ import annotations

import json
import sys

from . import _cli
from ._ray import add_ray_arguments, connect
from .label import parse_splits


def build_parser():
    parser = _cli.parser("pipelines.w2vu", __doc__)
    parser.add_argument("--root", required=True, help="dataset root")
    parser.add_argument("--name", required=True, help="output name (ROOT/w2vu/NAME)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--features", help="an existing feature store of layer features")
    source.add_argument("--extractor", help="hf:PATH or fairseq:PATH to extract features with")
    parser.add_argument("--layer", type=int, default=14, help="with --extractor (default: 14)")
    parser.add_argument(
        "--percent",
        type=float,
        default=100.0,
        help="with --extractor: percent of the corpus the fits see (default: %(default)s)",
    )
    parser.add_argument(
        "--splits", default="train=100", help="NAME=PERCENT,... (default: %(default)s)"
    )
    parser.add_argument(
        "--split-by",
        choices=("utterance", "speaker"),
        default="utterance",
        help="(default: %(default)s)",
    )
    parser.add_argument("--split-seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--k", type=int, default=128, help="clusters (default: %(default)s)")
    parser.add_argument("--pca-dim", type=int, default=512, help="(default: %(default)s)")
    parser.add_argument(
        "--subsample", type=float, default=0.5, help="mean-pool rate (default: %(default)s)"
    )
    parser.add_argument(
        "--remove-extra",
        action="store_true",
        help="drop frames that do not pool evenly (default: pad with the last frame)",
    )
    parser.add_argument("--seed", type=int, default=0, help="k-means seed (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=None, help="actors (default: all CPUs)")
    parser.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        help="GPUs per actor (default: 1 when the cluster has GPUs; 0 for CPUs only)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_ray_arguments(parser)
    return parser


@_cli.reports_output_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _cli.setup_logging()
    _cli.check_writable(args.root)  # A read-only or full ROOT fails here, in a second.
    from units.extractors import ExtractorOptions, build
    from units.sampling import SampleRequest
    from units.w2vu_ray import W2VUOptions, run

    features, options = args.features, None
    try:  # Before Ray starts: bad splits or a model that does not load are usage errors.
        splits = parse_splits(args.splits)
        if not 0 < args.subsample <= 1:
            raise ValueError(f"--subsample must be in (0, 1], got {args.subsample}")
        if args.extractor is not None:
            options = ExtractorOptions(args.extractor, layer=args.layer)
            build(options)
            features = f"{args.name}-layer{args.layer}"
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    connect(args)
    try:
        if options is not None:
            from units.features_ray import run as extract

            extract(
                args.root,
                features,
                options,
                SampleRequest(percent=args.percent),
                gpus_per_worker=args.gpus_per_worker,
                progress=not args.no_progress,
            )
        meta = run(
            args.root,
            features,
            args.name,
            splits,
            by=args.split_by,
            split_seed=args.split_seed,
            options=W2VUOptions(
                k=args.k,
                pca_dim=args.pca_dim,
                rate=args.subsample,
                remove_extra=args.remove_extra,
                seed=args.seed,
                workers=args.workers,
                gpus_per_worker=args.gpus_per_worker,
            ),
            progress=not args.no_progress,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(meta, indent=1, sort_keys=True))
    if meta["shards_written"] == 0:
        print(f"nothing to do: w2vu {args.name} is complete")
    else:
        rate = meta["throughput"]
        print(
            f"wrote {args.root}/w2vu/{args.name}: {meta['splits_written']}: "
            + _cli.describe_throughput(rate)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
