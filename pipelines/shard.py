"""Shard a speech corpus into WebDataset tars with Parquet manifests, on Ray.

Example:
    unitpipe shard --input /data/LibriSpeech/train-clean-100 --output /data/ls100
    python -m pipelines.shard --input /data/LibriSpeech/train-clean-100 --output /data/ls100
    ray job submit --working-dir . -- python -m pipelines.shard --input ... --output ...

Rerunning the same command resumes an interrupted job and writes only the missing shards;
rerunning a finished job does nothing and says so. The run's JSON record (the manifest
summary, shards written, throughput) goes to ROOT/runs/shard.json (--record); stdout gets a
summary.
"""

from __future__ import annotations

import sys

from . import _args, _cli
from ._schema import Bool, Choice, Float, Int, Option, Optional, Size, StrList, add_options

#: The library's choices (shards.discover.LAYOUTS, shards.vad.DETECTORS and
#: AUDIO_EXTENSIONS), spelled here so that --help imports no audio library;
#: tests/pipelines/test_cli.py checks that they agree.
LAYOUTS = ("auto", "librispeech", "librilight", "dir", "list")
DETECTORS = ("webrtc", "energy")
AUDIO_EXTENSIONS = ("flac", "wav", "ogg", "oga", "opus", "mp3", "aiff", "aif", "au", "caf", "w64")

#: The sharding options: the flags below, and the ``shard`` section of the hubert config.
OPTIONS = {
    "layout": Option(
        Choice(LAYOUTS), "auto", "input layout (auto detects librispeech, librilight or dir)"
    ),
    "segment": Option(
        Choice(("none", "vad")), "none", "one sample per file, or voice-activity segments"
    ),
    "target_seconds": Option(
        Float(), 30.0, "voiced seconds per segment with --segment vad", "SECONDS"
    ),
    "vad": Option(Choice(DETECTORS), "webrtc", "detector for files without a sidecar"),
    "shard_bytes": Option(Size(), "1GiB", "largest shard size (1GiB, 512MiB, bytes)", "SIZE"),
    "max_samples": Option(Int(), 10_000, "most samples per shard", "N"),
    "seed": Option(
        Optional(Int()), None, "shuffle inputs across shards with this seed (default: key order)"
    ),
    "verify": Option(Bool(), False, "fully decode files whose bytes are copied as they are"),
    "extensions": Option(
        StrList(), list(AUDIO_EXTENSIONS), "audio extensions taken from directory trees", "EXT,..."
    ),
}

RECORD = "ROOT/runs/shard.json"


def add_arguments(parser) -> None:
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="corpus directories or list files (.tsv .csv .jsonl .parquet), local paths or URLs",
    )
    parser.add_argument("--output", required=True, metavar="ROOT", help="dataset root to write")
    add_options(parser, OPTIONS)
    _args.add_progress(parser)
    _args.add_ray(parser)


def sharding_options(args):
    """The :class:`shards.plan.ShardingOptions` of ``args``, validated.

    Raises:
        UsageError: A size that does not read, or options the library refuses.
    """
    from shards.plan import ShardingOptions, parse_size

    try:
        options = ShardingOptions(
            layout=args.layout,
            segment=args.segment,
            target_seconds=args.target_seconds,
            shard_bytes=parse_size(args.shard_bytes),
            max_samples=args.max_samples,
            seed=args.seed,
            verify=args.verify,
            vad=args.vad,
            extensions=tuple(e.strip().lower().lstrip(".") for e in args.extensions),
        )
        options.validate()
    except ValueError as e:
        raise _cli.UsageError(str(e)) from None
    return options


def check(args) -> None:
    sharding_options(args)


def prepare(args) -> None:
    from shards.ray_sharding import UsageError, validate

    try:
        validate(args.input, args.output, sharding_options(args))
    except UsageError as e:
        raise _cli.UsageError(str(e)) from None
    _cli.check_writable(args.output, create=True)


def run(args) -> dict:
    from shards.ray_sharding import UsageError
    from shards.ray_sharding import run as shard

    from ._ray import connect

    connect(args)
    try:
        return shard(args.input, args.output, sharding_options(args), progress=args.progress)
    except UsageError as e:
        raise _cli.UsageError(str(e)) from None


def summarize(args, result: dict) -> str:
    done = f"{result['hours']:.3f} h in {result['segments']} samples, {result['rejects']} rejected"
    if result["rejects"]:
        done += f" (why: {args.output}/manifest/rejects.parquet)"
    if result["shards_written"] == 0:
        return (
            f"shard: nothing to do: {result['shards']} shards in {args.output} were already "
            f"committed; {done}"
        )
    return (
        f"shard: wrote {result['shards_written']} shard(s) of {result['shards']} to "
        f"{args.output}/shards; {done}"
    )


def record_path(args) -> str:
    return _cli.record_path(args.output, "shard")


def main(argv: list[str] | None = None) -> int:
    return _cli.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
