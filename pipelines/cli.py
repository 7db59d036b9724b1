"""``unitpipe SUBCOMMAND ...``: every entry point under one command.

Each subcommand is the ``python -m pipelines.SUBCOMMAND`` module, with the same flags (one
definition, :func:`pipelines._cli.configure`); ``unitpipe SUBCOMMAND --help`` shows its
examples.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: Each subcommand's one-line summary: the first line of its module's docstring, kept here
#: so that ``unitpipe --help`` imports no stage. ``tests/pipelines/test_cli.py`` checks that
#: the two agree.
SUMMARIES = {
    "shard": "Shard a speech corpus into WebDataset tars with Parquet manifests, on Ray.",
    "features": "Extract features of a seeded sample of a sharded corpus into a feature store, "
    "on Ray.",
    "kmeans": "Fit k-means (optionally after PCA) on a feature store, distributed on Ray.",
    "label": "Label every utterance of a sharded corpus with the units of a finished k-means, "
    "on Ray.",
    "bestrq": "BEST-RQ labels: a random-projection quantizer, and every utterance labelled with "
    "it, on Ray.",
    "pieces": "Train HuBERT-AP acoustic pieces on a finished label set and encode every "
    "utterance, on Ray.",
    "report": "Write unit-quality reports for label sets (ROOT/reports/NAME), and their comparison "
    "on a page.",
    "hubert": "One HuBERT iteration end to end: shard -> features (a sample) -> k-means -> "
    "labels -> report.",
    "export": "Export a finished label set for lhotse, NeMo or Hugging Face datasets, one Ray "
    "task per shard.",
    "w2vu": "Prepare wav2vec-U audio features from a sharded corpus, on Ray.",
    "relocate": "Point the fairseq exports of a moved root at where the root is now.",
    "demo": "The demo job on in-process Ray, HuBERT's first iteration end to end on generated "
    "speech.",
}
SUBCOMMANDS = tuple(SUMMARIES)

_EPILOG = """\
Every subcommand takes --log-level LEVEL and -q/--quiet, writes its JSON record to a file
(ROOT/runs/, or --record PATH) and prints a short summary; `unitpipe SUBCOMMAND --help`
shows its flags and examples.

Example:
  unitpipe hubert --config configs/hubert-mfcc.yaml root=/data/ls100"""


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """The ``unitpipe`` parser: one subparser per subcommand, of which only ``chosen``
    gets its flags (importing its module); the others show their summary only. Without
    one (``unitpipe --help``) nothing but argparse is imported."""
    if chosen is not None:
        from . import _cli

        parser_class = _cli.Parser  # One-line errors.
    else:
        parser_class = argparse.ArgumentParser
    parser = parser_class(
        prog="unitpipe",
        description="unitpipe: a Ray data pipeline for self-supervised speech.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(
        dest="subcommand", metavar="SUBCOMMAND", title="subcommands", required=True
    )
    for name, summary in SUMMARIES.items():
        sub = subparsers.add_parser(name, help=summary, description=summary)
        if name == chosen:
            _cli.configure(sub, importlib.import_module(f"pipelines.{name}"))
    return parser


def usage() -> str:
    """``unitpipe --help``."""
    return build_parser().format_help()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0 if argv else 2
    name = argv[0]
    if name not in SUBCOMMANDS:
        print(
            f"unitpipe: error: unknown subcommand {name!r}; choose one of "
            f"{', '.join(SUBCOMMANDS)} (unitpipe --help)",
            file=sys.stderr,
        )
        return 2
    from . import _cli

    args = build_parser(name).parse_args(argv)
    return _cli.execute(importlib.import_module(f"pipelines.{name}"), args)


if __name__ == "__main__":
    sys.exit(main())
