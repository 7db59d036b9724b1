"""BEST-RQ labels: a random-projection quantizer, and every utterance labelled with it, on Ray.

The quantizer (Chiu et al., ICML 2022) is not trained: feature frames (80 log-mel
filterbanks by default) are stacked 4 at a time (25 Hz), normalised with statistics measured
once on a seeded sample, projected by a fixed random matrix to 16 dimensions and labelled by
the nearest entry of a fixed random codebook of 8,192 (both sides l2-normalised). The same
--seed gives the same projection and codebooks on any machine.

Outputs: ROOT/bestrq/NAME (the quantizer: statistics, projection, codebooks, quantizer.json
with its lineage), ROOT/labels/NAME/units/*.parquet (the labels, one Parquet dataset, in the
layout of k-means labels; ``units_1`` ... with --codebooks > 1), and with --fairseq-splits,
ROOT/labels/NAME/fairseq/ for fairseq's HuBERT task (label_rate 25; with several codebooks,
{split}.km1 ... for task.labels='["km","km1",...]').

Example:
    python -m pipelines.bestrq --root /data/ls100 --name rq
    python -m pipelines.bestrq --root /data/ll --name rq4 --codebooks 4 --hours 20 \\
        --fairseq-splits train=99,valid=1 --address auto

Rerunning the same command resumes; a finished quantizer and label set are left as they are.
The run's JSON record goes to ROOT/runs/bestrq-NAME.json (--record); stdout gets a summary.
"""

from __future__ import annotations

import sys

from . import _args, _cli
from ._schema import REQUIRED, Float, Int, Option, Optional, Str, add_option, add_options
from .label import OPTIONS as LABEL_OPTIONS

OPTIONS = {
    "name": Option(Str(), REQUIRED, "name under ROOT/bestrq/ and ROOT/labels/", "NAME"),
    "extractor": Option(
        Str(),
        "fbank",
        "input features: fbank (80 log-mel), mfcc, hf:PATH, fairseq:PATH or python:MODULE:CALLABLE",
        "SPEC",
    ),
    "layer": Option(Optional(Int(lo=1)), None, "layer, with an SSL --extractor", "L"),
    "stack": Option(Int(lo=1), 4, "feature frames per label (4: 10 ms frames, 25 Hz labels)", "N"),
    "dim": Option(Int(lo=1), 16, "projection dimension", "D"),
    "codebook_size": Option(Int(lo=1), 8192, "entries per codebook, at most 65536", "K"),
    "codebooks": Option(Int(lo=1), 1, "codebooks, each labelling every frame", "N"),
    "seed": Option(Int(lo=0), 0, "seed of the projection, the codebooks and the sample"),
    "percent": Option(
        Optional(Float()), None, "percent of the utterances the statistics are measured on", "P"
    ),
    "hours": Option(
        Optional(Float()),
        None,
        "hours of audio the statistics are measured on (default: 10, or the whole corpus "
        "when it is smaller)",
        "H",
    ),
    "features": Option(
        Optional(Str()),
        None,
        "measure the statistics on this finished feature store instead of sampling",
        "STORE",
    ),
    "workers": _args.WORKERS,
    "gpus_per_worker": _args.gpus_per_worker(None),
    **{
        key: LABEL_OPTIONS[key]
        for key in ("dedup", "fairseq_splits", "split_by", "split_seed", "fairseq_audio")
    },
}

RECORD = "ROOT/runs/bestrq-NAME.json"


def add_arguments(parser) -> None:
    _args.add_root(parser)
    size = parser.add_mutually_exclusive_group()
    add_option(size, "percent", OPTIONS["percent"])
    add_option(size, "hours", OPTIONS["hours"])
    add_options(parser, OPTIONS, skip=("percent", "hours"))
    _args.add_progress(parser)
    _args.add_ray(parser)


def _extractor(args):
    from units.features.extractors import ExtractorOptions

    return ExtractorOptions(args.extractor, layer=args.layer)


def _config(args):
    from units.bestrq.quantizer import QuantizerConfig

    return QuantizerConfig(
        stack=args.stack,
        dim=args.dim,
        codebook_size=args.codebook_size,
        codebooks=args.codebooks,
        seed=args.seed,
    )


def _sample(args):
    """The sample request, or ``None`` for the stage's default."""
    from units.features.sampling import SampleRequest

    if args.percent is None and args.hours is None:
        return None
    return SampleRequest(percent=args.percent, hours=args.hours, seed=args.seed)


def check(args) -> None:
    """The quantizer's config, the sample and the extractor: before Ray."""
    from units.features.extractors import ExtractorError, describe
    from units.features.sampling import SampleError

    if args.features is not None and (args.percent is not None or args.hours is not None):
        raise _cli.UsageError("--features names the sample: leave out --percent and --hours")
    try:
        _config(args).check()
        sample = _sample(args)
        if sample is not None:
            sample.validate()
        describe(_extractor(args))
    except (ValueError, ExtractorError, SampleError) as e:
        raise _cli.UsageError(str(e)) from None


def prepare(args) -> None:
    from shards.core import storage
    from units.labels.fairseq import REMOTE_ROOT_HINT

    _cli.check_writable(args.root)
    if args.fairseq_splits and storage.is_url(args.root):
        hint = REMOTE_ROOT_HINT.format(root=args.root)
        raise _cli.UsageError(f"--fairseq-splits: fairseq reads local files: {hint}")


def run(args) -> dict:
    from shards.core.outputs import StageError
    from units.bestrq.stage import run as bestrq

    from ._ray import connect
    from .label import export

    connect(args)
    try:
        result = bestrq(
            args.root,
            args.name,
            extractor=_extractor(args),
            config=_config(args),
            sample=_sample(args),
            features=args.features,
            workers=args.workers,
            gpus_per_worker=args.gpus_per_worker,
            dedup=args.dedup,
            progress=args.progress,
        )
    except StageError as e:
        raise _cli.UsageError(str(e)) from None
    if args.fairseq_splits:
        result = dict(result, fairseq=export(args))
    return result


def summarize(args, result: dict) -> str:
    codebooks = result["codebooks"]
    what = (
        f"{result['utterances']} utterances ({result['frames']} frames at "
        f"{result['frame_rate']:g} Hz, {result['hours']:.3f} h), {codebooks} codebook"
        f"{'s' if codebooks > 1 else ''} of {result['k']}, in {args.root}/labels/{args.name}/units"
    )
    line = (
        f"bestrq: labelled {what}"
        if _cli.did_work(result)
        else f"bestrq: nothing to do: the labels are complete; {what}"
    )
    if "fairseq" in result:
        from .label import describe_export

        line += "\n" + describe_export(args, result["fairseq"])
    return line


def record_path(args) -> str:
    return _cli.record_path(args.root, "bestrq", args.name)


def main(argv: list[str] | None = None) -> int:
    return _cli.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
