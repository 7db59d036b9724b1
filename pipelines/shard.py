"""Shard a speech corpus into WebDataset tars with Parquet manifests, on Ray.

Example:
    python -m pipelines.shard --input /data/LibriSpeech/train-clean-100 --output /data/ls100
    ray job submit --working-dir . -- python -m pipelines.shard --input ... --output ...

Rerunning the same command resumes an interrupted job and writes only the missing shards;
rerunning a finished job does nothing and says so.
"""

from __future__ import annotations

import argparse
import json
import sys

from shards.discover import AUDIO_EXTENSIONS, LAYOUTS
from shards.plan import ShardingOptions, parse_size

from . import _cli
from ._ray import add_ray_arguments, connect


def build_parser() -> argparse.ArgumentParser:
    parser = _cli.parser("pipelines.shard", __doc__)
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="corpus directories or list files (.tsv .csv .jsonl .parquet), local paths or URLs",
    )
    parser.add_argument("--output", required=True, metavar="ROOT", help="dataset root to write")
    parser.add_argument(
        "--layout",
        default="auto",
        choices=LAYOUTS,
        help="input layout (default: %(default)s, detects librispeech, librilight or dir)",
    )
    parser.add_argument(
        "--segment",
        default="none",
        choices=("none", "vad"),
        help="one sample per file, or voice-activity segments (default: %(default)s)",
    )
    parser.add_argument(
        "--target-seconds",
        type=float,
        default=30.0,
        help="voiced seconds per segment with --segment vad (default: %(default)s)",
    )
    parser.add_argument(
        "--vad",
        default="webrtc",
        choices=("webrtc", "energy"),
        help="detector for files without a voice_activity sidecar (default: %(default)s)",
    )
    parser.add_argument(
        "--shard-bytes", default="1GiB", help="largest shard size (default: %(default)s)"
    )
    parser.add_argument(
        "--max-samples",
        type=int,
        default=10_000,
        help="most samples per shard (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="shuffle inputs across shards with this seed (default: key order)",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="fully decode files whose bytes are copied as they are",
    )
    parser.add_argument(
        "--extensions",
        default=",".join(AUDIO_EXTENSIONS),
        help="audio extensions taken from directory trees (default: %(default)s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_ray_arguments(parser)
    return parser


def options_from(args) -> ShardingOptions:
    return ShardingOptions(
        layout=args.layout,
        segment=args.segment,
        target_seconds=args.target_seconds,
        shard_bytes=parse_size(args.shard_bytes),
        max_samples=args.max_samples,
        seed=args.seed,
        verify=args.verify,
        vad=args.vad,
        extensions=tuple(
            e.strip().lower().lstrip(".") for e in args.extensions.split(",") if e.strip()
        ),
    )


@_cli.reports_output_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _cli.setup_logging()
    from shards.ray_sharding import UsageError, run, validate

    try:
        opts = options_from(args)
        validate(args.input, args.output, opts)
    except (UsageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _cli.check_writable(args.output, create=True)
    connect(args)
    try:
        summary = run(args.input, args.output, opts, progress=not args.no_progress)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1, sort_keys=True))
    if summary["shards_written"] == 0:
        print(f"nothing to do: {summary['shards']} shards in {args.output} were already committed")
    else:
        print(
            f"wrote {summary['shards_written']} shard(s) to {args.output}: "
            f"{summary['hours']:.3f} h in {summary['segments']} samples, "
            f"{summary['rejects']} rejected; " + _cli.describe_throughput(summary["throughput"])
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
