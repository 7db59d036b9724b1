"""Extract features of a seeded sample of a sharded corpus into a feature store, on Ray.

Example:
    python -m pipelines.features --root /data/ls100 --name mfcc --extractor mfcc --percent 10
    python -m pipelines.features --root /data/ls100 --name hubert6 \\
        --extractor hf:/models/hubert-base-ls960 --layer 6 --hours 100 --gpus-per-worker 1
    python -m pipelines.features --root /data/ls100 --name w2v14 \\
        --extractor fairseq:/models/wav2vec_vox_new.pt --layer 14 --percent 5

Rerunning the same command resumes; a finished store is left as it is. The run's JSON
record goes to ROOT/runs/features-NAME.json (--record); stdout gets a summary.
"""

from __future__ import annotations

import sys

from units.features.extractors import ExtractorOptions  # Light: the options' defaults.

from . import _args, _cli
from ._schema import REQUIRED, Choice, Float, Int, Option, Optional, Str, add_option, add_options

#: The feature options: the flags below, and the ``features`` section of the hubert config.
OPTIONS = {
    "name": _args.name("features"),
    "extractor": Option(
        Str(),
        REQUIRED,
        "mfcc, fbank, hf:PATH (local Hugging Face model directory, or a hub id such as "
        "facebook/hubert-base-ls960 found in the local Hugging Face cache), fairseq:PATH (.pt) "
        "or python:MODULE:CALLABLE (any extractor; examples/librosa_logmel.py)",
        "SPEC",
    ),
    "layer": Option(
        Optional(Int(lo=1)),
        None,
        "transformer block whose output is taken, counted from 1 (fairseq's output_layer)",
        "L",
    ),
    "percent": Option(Optional(Float()), None, "percent of the utterances to sample", "P"),
    "hours": Option(
        Optional(Float()), None, "hours of audio to sample (instead of --percent)", "H"
    ),
    "seed": Option(Int(), 0, "sample seed"),
    "gpus_per_worker": _args.gpus_per_worker(0),
    "dtype": Option(Optional(Choice(("bf16", "fp16"))), None, "autocast on GPU (default: float32)"),
    "threads": Option(Optional(Int(lo=1)), None, "torch threads per CPU worker", "N"),
    "batch_seconds": Option(
        Float(gt=0), ExtractorOptions.batch_seconds, "padded audio seconds per batch", "SECONDS"
    ),
    "bucket_seconds": Option(
        Optional(Float(gt=0)),
        None,
        "audio seconds sorted by length into batches at once (default: one batch on CPU, 8 on GPU)",
        "SECONDS",
    ),
}

RECORD = "ROOT/runs/features-NAME.json"


def add_arguments(parser) -> None:
    _args.add_root(parser, flag_help="dataset root written by pipelines.shard")
    size = parser.add_mutually_exclusive_group(required=True)
    add_option(size, "percent", OPTIONS["percent"])
    add_option(size, "hours", OPTIONS["hours"])
    add_options(parser, OPTIONS, skip=("percent", "hours"))
    _args.add_progress(parser)
    _args.add_ray(parser)


def extractor_options(args) -> ExtractorOptions:
    """The :class:`units.features.extractors.ExtractorOptions` of ``args``."""
    return ExtractorOptions(
        args.extractor,
        layer=args.layer,
        dtype=args.dtype,
        threads=args.threads,
        batch_seconds=args.batch_seconds,
        bucket_seconds=args.bucket_seconds,
    )


def sample_request(args):
    """The :class:`units.features.sampling.SampleRequest` of ``args``: ``hours`` wins over
    ``percent`` when both are set (a config that sets hours over a default percent)."""
    from units.features.sampling import SampleRequest

    percent = None if args.hours is not None else args.percent
    return SampleRequest(percent=percent, hours=args.hours, seed=args.seed)


def check(args) -> None:
    """The sample and the extractor (its checkpoint is readable, its layer exists): before
    Ray, without loading a model."""
    from units.features.extractors import ExtractorError, describe
    from units.features.sampling import SampleError

    try:
        sample_request(args).validate()
        args.spec = describe(extractor_options(args))
    except (ExtractorError, SampleError) as e:
        raise _cli.UsageError(str(e)) from None


def prepare(args) -> None:
    _cli.check_writable(args.root)  # A read-only or full ROOT fails here, in a second.


def run(args) -> dict:
    from shards.core.outputs import StageError
    from units.features.stage import run as extract

    from ._ray import connect

    connect(args)
    try:
        return extract(
            args.root,
            args.name,
            extractor_options(args),
            sample_request(args),
            gpus_per_worker=args.gpus_per_worker,
            progress=args.progress,
            spec=getattr(args, "spec", None),
        )
    except StageError as e:
        raise _cli.UsageError(str(e)) from None


def summarize(args, result: dict) -> str:
    sample = result.get("sample", {})
    spec = result.get("spec", {})
    what = (
        f"{sample.get('utterances', result.get('utterances'))} utterances "
        f"({sample.get('hours', 0.0):.3f} h), {result.get('rows')} frames of "
        f"{spec.get('dim')}-dim {args.extractor} features in {args.root}/features/{args.name}"
    )
    if not _cli.did_work(result):
        return f"features: nothing to do: the store is complete; {what}"
    return f"features: wrote {result['shards_written']} feature shard(s): {what}"


def record_path(args) -> str:
    return _cli.record_path(args.root, "features", args.name)


def main(argv: list[str] | None = None) -> int:
    return _cli.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
