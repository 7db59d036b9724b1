"""Write unit-quality reports for label sets (ROOT/reports/NAME), and their comparison on a page.

Each label set gets ROOT/reports/NAME/report.html and metrics.json; several label sets also
get one page that compares them side by side (ROOT/reports/compare-A+B+C/comparison.html).

With --phones (fairseq's frame-level phone tsv at 100 Hz, a CTM, an MFA TextGrid or a
directory of them), the report gives phone purity, cluster purity and PNMI as the HuBERT
paper defines them, and the P(phone | unit) figure; without, unit usage only. Runs on the
driver alone (no Ray): it reads the label shards one at a time.

With several --labels (k-means of several k or layers, BEST-RQ codebooks, ...), each set
gets its own report as with one, and ROOT/reports/compare-A+B+C/comparison.html (--out)
puts them side by side on the same references: one row per set with PNMI, purities,
perplexity, units and deduplicated units per second, the best of each column marked.

Example:
    python -m pipelines.report --root /data/ls100 --labels it1 --phones /data/dev-phones.tsv
    python -m pipelines.report --root /data/ll --labels it2 --phones /data/mfa_textgrids/
    python -m pipelines.report --root /data/ls100 --labels km100 km500 rq --phones /data/dev.tsv

A rerun never replaces a report with a poorer one, and never leaves an earlier run's files:
each report's files are written to a hidden sibling directory and swapped in as a whole.
Without --phones, a report already in the output directory decides: when it was made with
reference phones that are still there with the same sha256 (metrics.json records it),
they are used again; when they are gone or changed and the labels are the same, that
report is kept as it is, nothing is written and the summary says so (give --phones to
rebuild it, or --out for a usage-only report elsewhere); when the labels changed, the
report shows unit usage. The output directory must hold nothing but a report's files.

The run's JSON record (the metrics and the files written) goes to
ROOT/runs/report-LABELS.json (report-A+B+C.json for several; --record); stdout gets the
headline numbers (one line per label set for several).
"""

from __future__ import annotations

import os
import sys

from . import _args, _cli
from ._schema import Option, Optional, Str, add_options

#: The report options: the flags below, and the ``report`` section of the hubert config.
OPTIONS = {
    "phones": Option(
        Optional(Str()),
        None,
        "reference phones for PNMI (tsv, ctm, TextGrid directory; default: those of the report "
        "already in the output directory, while their sha256 is unchanged)",
        "PATH",
    ),
    "out": Option(
        Optional(Str()),
        None,
        "output directory (default: ROOT/reports/LABELS; the comparison's, for several "
        "label sets: ROOT/reports/compare-A+B+C)",
        "DIRECTORY",
    ),
}

RECORD = "ROOT/runs/report-LABELS.json (report-A+B+C.json for several)"


def add_arguments(parser) -> None:
    _args.add_root(parser)
    parser.add_argument(
        "--labels",
        required=True,
        nargs="+",
        metavar="NAME",
        help="label set (ROOT/labels/NAME); several: each one's report and their comparison",
    )
    add_options(parser, OPTIONS)


def _names(args) -> list[str]:
    """The label sets: ``--labels`` gives a list, the hubert pipeline one name."""
    return [args.labels] if isinstance(args.labels, str) else list(args.labels)


def _joined(args) -> str:
    """``A+B+C``: the label sets' names in the comparison's directory and record."""
    return "+".join(_names(args))


def check(args) -> None:
    names = _names(args)
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise _cli.UsageError(f"--labels names {', '.join(twice)} more than once")
    if args.phones is not None and "://" not in args.phones and not os.path.exists(args.phones):
        raise _cli.UsageError(f"--phones {args.phones}: no such file or directory")


def _out(args) -> str:
    names = _names(args)
    if len(names) == 1:
        return args.out or os.path.join(args.root, "reports", names[0])
    return args.out or os.path.join(args.root, "reports", f"compare-{_joined(args)}")


def run(args) -> dict:
    from units.quality import compare, report

    names = _names(args)
    out = _out(args)
    if args.out is None or len(names) > 1:  # Each set's own report goes under ROOT.
        _cli.check_writable(args.root)
    if args.out is not None:
        _cli.check_writable(os.path.dirname(os.path.abspath(out)))
    results = {}
    # No labels, unreadable references, references at another rate, an output directory
    # holding other files: usage errors.
    try:
        if len(names) == 1:  # One label set: the record it has always had.
            return _result(names[0], report.update(args.root, names[0], out, args.phones))
        comparison = compare.compare(args.root, names, args.phones)
        for name in names:
            own = os.path.join(args.root, "reports", name)
            built = comparison.reports[name]
            done = report.update(args.root, name, own, args.phones, built=built)
            results[name] = _result(name, done)
    except (ValueError, FileNotFoundError) as e:
        raise _cli.UsageError(str(e)) from None
    reports = {name: r["paths"]["report"] for name, r in results.items()}
    return {
        "labels": names,
        "reports": results,
        "comparison": comparison.rows,
        "headline": compare.headline(comparison),
        "paths": compare.write_comparison(comparison, out, reports),
    }


def _result(name: str, done) -> dict:
    """One label set's record: its numbers, headline and files, whether it was written, and
    what was decided about its reference phones (``note``, when none were given)."""
    from units.quality import report

    result = {
        "labels": name,
        "metrics": done.metrics,
        "headline": report.headline(done.metrics),
        "paths": done.paths,
        "written": done.written,
    }
    if done.note:
        result["note"] = done.note
    return result


def _report_lines(result: dict) -> list[str]:
    state = "" if result.get("written", True) else " (kept as it was)"
    lines = [f"report: {result['paths']['report']}{state}"]
    return lines + ([f"  note: {result['note']}"] if result.get("note") else [])


def summarize(args, result: dict) -> str:
    if "comparison" not in result:
        return "\n".join(_report_lines(result) + [f"  {result['headline']}"])
    lines = [line for r in result["reports"].values() for line in _report_lines(r)]
    lines.append(f"comparison: {result['paths']['comparison']}")
    return "\n".join(lines + [f"  {line}" for line in result["headline"]])


def record_path(args) -> str:
    return _cli.record_path(args.root, "report", _joined(args))


def main(argv: list[str] | None = None) -> int:
    return _cli.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
