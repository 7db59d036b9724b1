"""Write a unit-quality report for a label set: ROOT/reports/NAME/report.html and metrics.json.

With --phones (fairseq's frame-level phone tsv at 100 Hz, a CTM, an MFA TextGrid or a
directory of them), the report gives phone purity, cluster purity and PNMI as the HuBERT
paper defines them, and the P(phone | unit) figure; without, unit usage only. Runs on the
driver alone (no Ray): it reads the label shards one at a time.

Example:
    python -m pipelines.report --root /data/ls100 --labels it1 --phones /data/dev-phones.tsv
    python -m pipelines.report --root /data/ll --labels it2 --phones /data/mfa_textgrids/

The run's JSON record (the metrics and the files written) goes to
ROOT/runs/report-LABELS.json (--record); stdout gets the headline numbers.
"""

from __future__ import annotations

import os
import sys

from . import _args, _cli
from ._schema import Option, Optional, Str, add_options

#: The report options: the flags below, and the ``report`` section of the hubert config.
OPTIONS = {
    "phones": Option(
        Optional(Str()), None, "reference phones for PNMI (tsv, ctm, TextGrid directory)", "PATH"
    ),
    "out": Option(
        Optional(Str()), None, "output directory (default: ROOT/reports/LABELS)", "DIRECTORY"
    ),
}

RECORD = "ROOT/runs/report-LABELS.json"


def add_arguments(parser) -> None:
    _args.add_root(parser)
    parser.add_argument(
        "--labels", required=True, metavar="NAME", help="label set (ROOT/labels/NAME)"
    )
    add_options(parser, OPTIONS)


def check(args) -> None:
    if args.phones is not None and "://" not in args.phones and not os.path.exists(args.phones):
        raise _cli.UsageError(f"--phones {args.phones}: no such file or directory")


def _out(args) -> str:
    return args.out or os.path.join(args.root, "reports", args.labels)


def run(args) -> dict:
    from units.quality import report

    try:  # No labels, unreadable references, references at another rate: usage errors.
        built = report.build(args.root, args.labels, args.phones)
    except (ValueError, FileNotFoundError) as e:
        raise _cli.UsageError(str(e)) from None
    out = _out(args)
    _cli.check_writable(args.root if args.out is None else os.path.dirname(os.path.abspath(out)))
    paths = report.write(built, out)
    return {
        "labels": args.labels,
        "metrics": built.metrics,
        "headline": report.headline(built.metrics),
        "paths": paths,
    }


def summarize(args, result: dict) -> str:
    return f"report: {result['paths']['report']}\n  {result['headline']}"


def record_path(args) -> str:
    return _cli.record_path(args.root, "report", args.labels)


def main(argv: list[str] | None = None) -> int:
    return _cli.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
