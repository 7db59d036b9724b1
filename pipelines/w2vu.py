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
ROOT/features/NAME-layerL (skipped when complete). Rerunning the same command resumes. The
run's JSON record goes to ROOT/runs/w2vu-NAME.json (--record); stdout gets a summary.
"""

from __future__ import annotations

import sys

from . import _args, _cli
from ._schema import (
    Bool,
    Choice,
    Float,
    Int,
    Option,
    Optional,
    Splits,
    Str,
    add_option,
    add_options,
)

#: The wav2vec-U options (the flags below).
OPTIONS = {
    "name": _args.name("w2vu"),
    "features": Option(Optional(Str()), None, "an existing feature store of layer features"),
    "extractor": Option(
        Optional(Str()), None, "hf:PATH or fairseq:PATH to extract features with", "SPEC"
    ),
    "layer": Option(Int(lo=1), 14, "with --extractor: the layer", "L"),
    "percent": Option(Float(), 100.0, "with --extractor: percent of the corpus the fits see", "P"),
    "splits": Option(Splits(), {"train": 100.0}, "split names and percents", "NAME=PERCENT,..."),
    "split_by": Option(Choice(("utterance", "speaker")), "utterance", "what a split draws"),
    "split_seed": Option(Int(), 0, "seed of the split draw"),
    "k": Option(Int(), 128, "clusters", "K"),
    "pca_dim": Option(Int(lo=1), 512, "PCA dimension", "DIM"),
    "subsample": Option(Float(gt=0, le=1), 0.5, "mean-pool rate", "RATE"),
    "remove_extra": Option(
        Bool(), False, "drop frames that do not pool evenly (default: pad with the last frame)"
    ),
    "seed": Option(Int(), 0, "k-means seed"),
    "workers": _args.WORKERS,
    "gpus_per_worker": _args.gpus_per_worker(None),
}

RECORD = "ROOT/runs/w2vu-NAME.json"


def add_arguments(parser) -> None:
    _args.add_root(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    add_option(source, "features", OPTIONS["features"])
    add_option(source, "extractor", OPTIONS["extractor"])
    add_options(parser, OPTIONS, skip=("features", "extractor"))
    _args.add_progress(parser)
    _args.add_ray(parser)


def check(args) -> None:
    """The k-means parameters, the pooling, and with --extractor the model and the sample:
    before Ray."""
    from units.features.extractors import ExtractorError, ExtractorOptions, describe
    from units.features.sampling import SampleError, SampleRequest
    from units.kmeans.estimator import KMeans

    try:
        KMeans(args.k, seed=args.seed).check_params()
        # The rule units.labels.w2vu_stage.run applies first thing, checked here before Ray starts.
        if args.remove_extra and args.subsample != 0.5:
            raise ValueError(f"--remove-extra pools evenly at rate 0.5 only, not {args.subsample}")
        if args.extractor is not None:
            SampleRequest(percent=args.percent).validate()
            args.spec = describe(ExtractorOptions(args.extractor, layer=args.layer))
    except (ExtractorError, SampleError, ValueError) as e:
        raise _cli.UsageError(str(e)) from None


def prepare(args) -> None:
    _cli.check_writable(args.root)  # A read-only or full ROOT fails here, in a second.


def _features(args) -> str:
    return args.features or f"{args.name}-layer{args.layer}"


def run(args) -> dict:
    from shards.core.outputs import StageError
    from units.features.extractors import ExtractorOptions
    from units.features.sampling import SampleRequest
    from units.features.stage import run as extract
    from units.labels.w2vu_stage import W2VUOptions
    from units.labels.w2vu_stage import run as prepare_w2vu

    from ._ray import connect

    connect(args)
    try:
        if args.extractor is not None:
            extract(
                args.root,
                _features(args),
                ExtractorOptions(args.extractor, layer=args.layer),
                SampleRequest(percent=args.percent),
                gpus_per_worker=args.gpus_per_worker,
                progress=args.progress,
                spec=getattr(args, "spec", None),
            )
        return prepare_w2vu(
            args.root,
            _features(args),
            args.name,
            args.splits,
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
            progress=args.progress,
        )
    except StageError as e:
        raise _cli.UsageError(str(e)) from None


def summarize(args, result: dict) -> str:
    where = f"{args.root}/w2vu/{args.name}"
    splits = result.get("splits_written")
    if not _cli.did_work(result):
        return f"w2vu: nothing to do: {where} is complete: {splits}"
    return f"w2vu: wrote {where}: {splits}"


def record_path(args) -> str:
    return _cli.record_path(args.root, "w2vu", args.name)


def main(argv: list[str] | None = None) -> int:
    return _cli.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
