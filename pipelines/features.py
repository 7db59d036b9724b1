"""Extract features of a seeded sample of a sharded corpus into a feature store, on Ray.

Example:
    python -m pipelines.features --root /data/ls100 --name mfcc --extractor mfcc --percent 10
    python -m pipelines.features --root /data/ls100 --name hubert6 \\
        --extractor hf:/models/hubert-base-ls960 --layer 6 --hours 100 --gpus-per-worker 1
    python -m pipelines.features --root /data/ls100 --name w2v14 \\
        --extractor fairseq:/models/wav2vec_vox_new.pt --layer 14 --percent 5

Rerunning the same command resumes; a finished store is left as it is.
"""

from __future__ import annotations

import argparse
import json
import sys

from units.extractors import ExtractorError, ExtractorOptions, build
from units.sampling import SampleError, SampleRequest

from . import _cli
from ._ray import add_ray_arguments, connect


def build_parser() -> argparse.ArgumentParser:
    parser = _cli.parser("pipelines.features", __doc__)
    parser.add_argument("--root", required=True, help="dataset root written by pipelines.shard")
    parser.add_argument("--name", required=True, help="feature store name (ROOT/features/NAME)")
    parser.add_argument(
        "--extractor",
        required=True,
        help="mfcc, fbank, hf:PATH (local Hugging Face model directory) or fairseq:PATH (.pt)",
    )
    parser.add_argument(
        "--layer",
        type=int,
        default=None,
        help="transformer block whose output is taken, counted from 1 (fairseq's output_layer)",
    )
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--percent", type=float, help="percent of the utterances to sample")
    size.add_argument("--hours", type=float, help="hours of audio to sample")
    parser.add_argument("--seed", type=int, default=0, help="sample seed (default: %(default)s)")
    parser.add_argument(
        "--gpus-per-worker",
        type=float,
        default=0,
        help="GPUs per extraction actor; 0 runs on CPUs (default: %(default)s)",
    )
    parser.add_argument(
        "--dtype", choices=("bf16", "fp16"), default=None, help="autocast on GPU (default: float32)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads per CPU worker")
    parser.add_argument(
        "--batch-seconds",
        type=float,
        default=120.0,
        help="padded audio seconds per batch (default: %(default)s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_ray_arguments(parser)
    return parser


@_cli.reports_output_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _cli.setup_logging()
    _cli.check_writable(args.root)  # A read-only or full ROOT fails here, in a second.
    from units.features_ray import FeatureStageError, run

    options = ExtractorOptions(
        args.extractor,
        layer=args.layer,
        dtype=args.dtype,
        threads=args.threads,
        batch_seconds=args.batch_seconds,
    )
    request = SampleRequest(percent=args.percent, hours=args.hours, seed=args.seed)
    try:  # Before Ray starts: a bad extractor, checkpoint or layer is a usage error.
        spec = build(options).spec
        request.validate()
    except (ExtractorError, SampleError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    connect(args)
    try:
        summary = run(
            args.root,
            args.name,
            options,
            request,
            gpus_per_worker=args.gpus_per_worker,
            progress=not args.no_progress,
            spec=spec,
        )
    except FeatureStageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1, sort_keys=True))
    if summary["shards_written"] == 0:
        print(f"nothing to do: feature store {args.name} is complete")
    else:
        print(
            f"wrote {summary['shards_written']} feature shard(s) to {args.root}/features/"
            f"{args.name}: {summary['utterances']} utterances, {summary['rows']} frames; "
            + _cli.describe_throughput(summary["throughput"])
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
