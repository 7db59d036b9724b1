"""Train HuBERT-AP acoustic pieces on a finished label set and encode every utterance, on Ray.

A sentencepiece model (BPE or unigram) is trained on the driver over the deduplicated units
of a seeded sample of the label set's utterances (--percent or --hours; default all), then
CPU actors encode every label shard: ROOT/pieces/NAME/pieces/*.parquet (key, pieces, and each
piece's start frame and length in frames), one Parquet dataset beside the model
(ROOT/pieces/NAME/model.spm) and its lineage (pieces.json).

With --fairseq-splits, also ROOT/pieces/NAME/fairseq/{split}.tsv, {split}.piece and
dict.piece.txt for fairseq's HuBERT task: one piece id per frame (--fairseq-level frames,
HuBERT-AP's target, label_rate = the label set's frame rate) or one per piece
(--fairseq-level pieces, label_rate -1: sequence targets).

Example:
    python -m pipelines.pieces --root /data/ls960 --labels it2 --name ap5k --vocab-size 5000 \\
        --fairseq-splits train=99,valid=1
    python -m pipelines.pieces --root /data/ll --labels h6k500 --name ap10k \\
        --vocab-size 10000 --model-type unigram --hours 1000 --seed 1

Rerunning the same command resumes with the same model; finished pieces are left as they
are, and other options under the same name are refused. The run's JSON record goes to
ROOT/runs/pieces-NAME.json (--record); stdout gets a summary.
"""

from __future__ import annotations

import sys

from . import _args, _cli
from ._schema import REQUIRED, Choice, Float, Int, Option, Optional, Str, add_option, add_options
from .label import OPTIONS as LABEL_OPTIONS

#: The pieces options: the flags below.
OPTIONS = {
    "labels": Option(Str(), REQUIRED, "finished label set (ROOT/labels/NAME)", "NAME"),
    "name": _args.name("pieces"),
    "vocab_size": Option(
        Int(lo=2), REQUIRED, "pieces, <unk> included (at least the label set's k + 1)", "N"
    ),
    "model_type": Option(Choice(("bpe", "unigram")), "bpe", "sentencepiece's algorithm"),
    "percent": Option(
        Optional(Float(gt=0, le=100)),
        None,
        "percent of the utterances to train on (default: all)",
        "P",
    ),
    "hours": Option(
        Optional(Float(gt=0)), None, "about this many hours to train on (instead of --percent)", "H"
    ),
    "seed": Option(Int(), 0, "seed of the sample and of sentencepiece"),
    "workers": _args.WORKERS,
    "fairseq_splits": LABEL_OPTIONS["fairseq_splits"],
    "split_by": LABEL_OPTIONS["split_by"],
    "split_seed": LABEL_OPTIONS["split_seed"],
    "fairseq_level": Option(
        Choice(("frames", "pieces")),
        "frames",
        "fairseq label lines: a piece id per frame (HuBERT-AP) or per piece (label_rate -1)",
    ),
}

RECORD = "ROOT/runs/pieces-NAME.json"


def add_arguments(parser) -> None:
    _args.add_root(parser)
    size = parser.add_mutually_exclusive_group()
    add_option(size, "percent", OPTIONS["percent"])
    add_option(size, "hours", OPTIONS["hours"])
    add_options(parser, OPTIONS, skip=("percent", "hours"))
    _args.add_progress(parser)
    _args.add_ray(parser)


def check(args) -> None:
    """The flags' own ranges are checked by their kinds; nothing else to check alone."""


def prepare(args) -> None:
    """The label set is finished, the vocabulary holds its units and the sample asked for
    exists: before Ray, not after a sample read."""
    _cli.check_writable(args.root)  # A read-only or full ROOT fails here, in a second.
    from shards.core.outputs import StageError
    from units.pieces.model import check_vocab_size
    from units.pieces.stage import finished_labels, sample_fraction

    try:
        meta = finished_labels(args.root, args.labels)
        check_vocab_size(args.vocab_size, int(meta["k"]))
        sample_fraction(meta, args.percent, args.hours)
    except StageError as e:
        raise _cli.UsageError(str(e)) from None
    except ValueError as e:
        raise _cli.UsageError(f"labels {args.labels!r} (k={meta['k']}): {e}") from None


def run(args) -> dict:
    from shards.core.outputs import StageError
    from units.pieces.stage import run as pieces

    from ._ray import connect

    connect(args)
    try:
        result = pieces(
            args.root,
            args.labels,
            args.name,
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            percent=args.percent,
            hours=args.hours,
            seed=args.seed,
            workers=args.workers,
            progress=args.progress,
        )
        if args.fairseq_splits:
            from units.pieces.fairseq import export_fairseq

            exported = export_fairseq(
                args.root,
                args.name,
                args.fairseq_splits,
                by=args.split_by,
                seed=args.split_seed,
                level=args.fairseq_level,
            )
            result = dict(result, fairseq=exported)
    except StageError as e:
        raise _cli.UsageError(str(e)) from None
    return result


def summarize(args, result: dict) -> str:
    what = (
        f"{result['utterances']} utterances ({result['frames']} frames at "
        f"{result['frame_rate']:g} Hz) as {result['pieces']} pieces of a "
        f"{result['vocab_size']}-piece {result['model_type']} model trained on "
        f"{result['sample_utterances']} utterances, in {args.root}/pieces/{args.name}/pieces"
    )
    line = (
        f"pieces: encoded {what}"
        if _cli.did_work(result)
        else f"pieces: nothing to do: the pieces are complete; {what}"
    )
    if "fairseq" in result:
        record = result["fairseq"]
        line += (
            f"\nfairseq: {record['splits']} in {args.root}/pieces/{args.name}/fairseq "
            f"(label_rate {record['label_rate']:g}, {record['level']})"
        )
    return line


def record_path(args) -> str:
    return _cli.record_path(args.root, "pieces", args.name)


def main(argv: list[str] | None = None) -> int:
    return _cli.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
