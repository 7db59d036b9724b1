"""Label every utterance of a sharded corpus with the units of a finished k-means, on Ray.

The features are computed again, streaming, with exactly the spec the k-means was fitted on
(extractor, checkpoint, layer, PCA); they are never written. Units go to
ROOT/labels/NAME/units/*.parquet (key, units, frames, frame_rate): one Parquet dataset.

With --fairseq-splits, also ROOT/labels/NAME/fairseq/{split}.tsv, {split}.km and
dict.km.txt for fairseq's HuBERT training (audio paths point into the shards, no copies).

Several k-means of one extractor (k = 100, 500, 2,000 on one layer, or several layers of one
model; bestrq:NAME for a BEST-RQ quantizer of the same features) label in one pass: --kmeans A
B C --name LA LB LC computes each batch's features once (one forward to the deepest layer) and
writes one label set per target, each the same files as a pass of its own; a shard is done
when all have it.

Example:
    python -m pipelines.label --root /data/ls100 --kmeans mfcc100 --name it1 \\
        --fairseq-splits train=99,valid=1 --split-by speaker
    python -m pipelines.label --root /data/ll --kmeans h6k500 --name it2 --gpus-per-worker 1
    python -m pipelines.label --root /data/ll --kmeans h9k100 h9k500 h9k2000 \\
        --name it2-100 it2-500 it2-2000

Rerunning the same command resumes; a finished label set is left as it is. The run's JSON
record goes to ROOT/runs/label-NAME.json (--record); stdout gets a summary.
"""

from __future__ import annotations

import argparse
import sys

from . import _args, _cli
from ._schema import Bool, Choice, Int, Option, Optional, Splits, Str, add_options

#: The label options: the flags below, and the ``label`` section of the hubert config.
OPTIONS = {
    "name": _args.name("labels"),
    "workers": _args.WORKERS,
    "gpus_per_worker": _args.gpus_per_worker(None),
    "extractor": Option(
        Optional(Str()),
        None,
        "hf:PATH or fairseq:PATH to use instead of the checkpoint path the k-means "
        "recorded (a moved model); it must compute the same features (sha256, layer)",
        "SPEC",
    ),
    "layer": Option(Optional(Int(lo=1)), None, "layer, with --extractor", "L"),
    "dedup": Option(Bool(), False, "also store GSLM-style deduplicated units with their durations"),
    "fairseq_splits": Option(
        Optional(Splits()),
        None,
        "write fairseq's tsv/km/dict for these splits (percents add up to 100)",
        "NAME=PERCENT,...",
    ),
    "split_by": Option(Choice(("utterance", "speaker")), "utterance", "what a split draws"),
    "split_seed": Option(Int(), 0, "seed of the split draw"),
    "fairseq_audio": Option(
        Choice(("shards", "source")),
        "shards",
        "tsv paths into the shard tars, or the original files where an utterance is a "
        "whole 16 kHz mono file",
    ),
}

RECORD = "ROOT/runs/label-NAME.json"


def add_arguments(parser) -> None:
    _args.add_root(parser)
    parser.add_argument(
        "--kmeans",
        required=True,
        nargs="+",
        metavar="NAME",
        help="finished k-means (ROOT/kmeans/NAME), or bestrq:NAME (a BEST-RQ quantizer); "
        "several of one extractor label in one pass",
    )
    parser.add_argument(
        "--name",
        required=True,
        nargs="+",
        metavar="NAME",
        help="label set under ROOT/labels/, one per --kmeans",
    )
    add_options(parser, OPTIONS, skip=("name",))
    _args.add_progress(parser)
    _args.add_ray(parser)


def parse_splits(text: str) -> dict[str, float]:
    """``train=99,valid=1`` -> ``{"train": 99.0, "valid": 1.0}``, checked
    (:class:`pipelines._schema.Splits`).

    Raises:
        ValueError: Not ``NAME=PERCENT,...``, a bad name, or percents that do not add up
            to 100.
    """
    return Splits().parse(text)


def _requested(args):
    if args.extractor is None:
        return None
    from units.features.extractors import ExtractorOptions

    return ExtractorOptions(args.extractor, layer=args.layer)


def targets(args) -> list[tuple[str, str]]:
    """``(k-means, label set)`` pairs: one each from the hubert config, several from
    ``--kmeans A B --name X Y``."""
    kmeans = [args.kmeans] if isinstance(args.kmeans, str) else list(args.kmeans)
    names = [args.name] if isinstance(args.name, str) else list(args.name)
    if len(kmeans) != len(names):
        raise _cli.UsageError(
            f"--name gives {len(names)} label set(s) for {len(kmeans)} k-means: one per k-means"
        )
    if len(set(names)) != len(names):
        raise _cli.UsageError(f"--name {' '.join(names)}: the label sets must differ")
    return list(zip(kmeans, names, strict=True))


def check(args) -> None:
    if args.layer is not None and args.extractor is None:
        raise _cli.UsageError("--layer applies with --extractor only")
    targets(args)


def prepare(args) -> None:
    """The k-means exists, another extractor computes its features, and a fairseq export
    can be written (fairseq reads local files): before Ray, not after the label pass."""
    _cli.check_writable(args.root)  # A read-only or full ROOT fails here, in a second.
    from shards.core import storage
    from shards.core.outputs import StageError
    from units.features import extractors
    from units.labels import targets as label_targets
    from units.labels.fairseq import REMOTE_ROOT_HINT
    from units.labels.stage import rebuilding

    if args.fairseq_splits and storage.is_url(args.root):
        hint = REMOTE_ROOT_HINT.format(root=args.root)
        raise _cli.UsageError(f"--fairseq-splits: fairseq reads local files: {hint}")
    try:
        models = [label_targets.load(args.root, kmeans) for kmeans, _ in targets(args)]
        # One extractor (the one asked for, or the first k-means's) for every k-means.
        rebuilding(models, _requested(args))
    except (StageError, extractors.ExtractorError) as e:
        raise _cli.UsageError(str(e)) from None


def label_pass(args) -> dict:
    """The label pass alone (Ray connected); returns its result: the label set's, or with
    several, the first one's with ``label_sets`` (each set's result by name)."""
    from shards.core.outputs import StageError
    from units.labels.stage import run_many

    pairs = targets(args)
    try:
        results = run_many(
            args.root,
            [kmeans for kmeans, _ in pairs],
            [name for _, name in pairs],
            workers=args.workers,
            gpus_per_worker=args.gpus_per_worker,
            extractor=_requested(args),
            dedup=args.dedup,
            progress=args.progress,
        )
    except StageError as e:
        raise _cli.UsageError(str(e)) from None
    if len(results) == 1:
        return results[0]
    sets = {name: r for (_, name), r in zip(pairs, results, strict=True)}
    return dict(results[0], label_sets=sets)


def export(args) -> dict:
    """The fairseq files of a finished label set (``args.name``, one); returns
    ``export.json``'s content."""
    from shards.core.outputs import StageError
    from units.labels.fairseq import export as export_fairseq

    try:
        return export_fairseq(
            args.root,
            _one(args.name),
            args.fairseq_splits,
            by=args.split_by,
            seed=args.split_seed,
            audio=args.fairseq_audio,
        )
    except StageError as e:
        raise _cli.UsageError(str(e)) from None


def run(args) -> dict:
    from ._ray import connect

    connect(args)
    result = label_pass(args)
    if args.fairseq_splits:
        exports = {
            name: export(argparse.Namespace(**dict(vars(args), name=name)))
            for _, name in targets(args)
        }
        if "label_sets" in result:
            for name, record in exports.items():
                result["label_sets"][name]["fairseq"] = record
        result = dict(result, fairseq=next(iter(exports.values())))
    return result


def summarize(args, result: dict) -> str:
    sets = result.get("label_sets")
    if sets:
        return "\n".join(
            _summary(argparse.Namespace(**dict(vars(args), name=name)), r)
            for name, r in sets.items()
        )
    return _summary(argparse.Namespace(**dict(vars(args), name=_one(args.name))), result)


def _one(name) -> str:
    return name if isinstance(name, str) else name[0]


def _summary(args, result: dict) -> str:
    hours = result.get("hours")
    audio = f", {hours:.3f} h" if hours is not None else ""
    what = (
        f"{result['utterances']} utterances ({result['frames']} frames at "
        f"{result['frame_rate']:g} Hz{audio}) in {args.root}/labels/{args.name}/units"
    )
    line = (
        f"label: labelled {what}"
        if _cli.did_work(result)
        else f"label: nothing to do: the labels are complete; {what}"
    )
    if "fairseq" in result:
        line += "\n" + describe_export(args, result["fairseq"])
    return line


def describe_export(args, record: dict) -> str:
    """One line of a fairseq export."""
    return (
        f"fairseq: {record['splits']} in {args.root}/labels/{args.name}/fairseq "
        f"(label_rate {record['label_rate']:g})"
    )


def record_path(args) -> str:
    names = [args.name] if isinstance(args.name, str) else list(args.name)
    return _cli.record_path(args.root, "label", "+".join(names))


def main(argv: list[str] | None = None) -> int:
    return _cli.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
