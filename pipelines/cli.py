"""``unitpipe SUBCOMMAND ...``: every entry point under one command.

Each subcommand is the ``python -m pipelines.SUBCOMMAND`` module with the same flags;
``unitpipe SUBCOMMAND --help`` shows its examples.
"""

from __future__ import annotations

import importlib
import sys

#: Each subcommand's one-line summary: the first line of its module's docstring, kept here
#: so that ``unitpipe --help`` imports no stage (torch, Ray and scipy take seconds to load).
#: ``tests/pipelines/test_cli.py`` checks that the two agree.
SUMMARIES = {
    "shard": "Shard a speech corpus into WebDataset tars with Parquet manifests, on Ray.",
    "features": "Extract features of a seeded sample of a sharded corpus into a feature store, "
    "on Ray.",
    "kmeans": "Fit k-means (optionally after PCA) on a feature store, distributed on Ray.",
    "label": "Label every utterance of a sharded corpus with the units of a finished k-means, "
    "on Ray.",
    "report": "Write a unit-quality report for a label set: ROOT/reports/NAME/report.html and "
    "metrics.json.",
    "hubert": "One HuBERT iteration end to end: shard -> features (a sample) -> k-means -> "
    "labels -> report.",
    "w2vu": "Prepare wav2vec-U audio features from a sharded corpus, on Ray.",
    "demo": "The demo job on in-process Ray, HuBERT's first iteration end to end on generated "
    "speech.",
}
SUBCOMMANDS = tuple(SUMMARIES)


def usage() -> str:
    lines = ["usage: unitpipe SUBCOMMAND [--help] [ARGS...]", "", "subcommands:"]
    lines += [f"  {name:<9} {summary}" for name, summary in SUMMARIES.items()]
    lines += [
        "",
        "Example:",
        "  unitpipe hubert --config configs/hubert-mfcc.yaml root=/data/ls100",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"error: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return importlib.import_module(f"pipelines.{name}").main(rest)


if __name__ == "__main__":
    sys.exit(main())
