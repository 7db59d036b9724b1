"""Write a unit-quality report for a label set: ROOT/reports/NAME/report.html and metrics.json.

With --phones (fairseq's frame-level phone tsv at 100 Hz, a CTM, an MFA TextGrid or a
directory of them), the report gives phone purity, cluster purity and PNMI as the HuBERT
paper defines them, and the P(phone | unit) figure; without, unit usage only. Runs on the
driver alone (no Ray): it reads the label shards one at a time.

Example:
    python -m pipelines.report --root /data/ls100 --labels it1 --phones /data/dev-phones.tsv
    python -m pipelines.report --root /data/ll --labels it2 --phones /data/mfa_textgrids/
"""

from __future__ import annotations

import json
import os
import sys

from . import _cli


def build_parser():
    parser = _cli.parser("pipelines.report", __doc__)
    parser.add_argument("--root", required=True, help="dataset root")
    parser.add_argument("--labels", required=True, help="label set (ROOT/labels/NAME)")
    parser.add_argument("--phones", default=None, help="reference phones (tsv, ctm, TextGrid)")
    parser.add_argument(
        "--out", default=None, help="output directory (default: ROOT/reports/LABELS)"
    )
    return parser


@_cli.reports_output_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _cli.setup_logging()
    from units import report

    try:
        built = report.build(args.root, args.labels, args.phones)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or os.path.join(args.root, "reports", args.labels)
    _cli.check_writable(args.root if args.out is None else os.path.dirname(os.path.abspath(out)))
    paths = report.write(built, out)
    print(json.dumps(built.metrics, indent=1, sort_keys=True))
    print(report.headline(built.metrics))
    print(f"report: {paths['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
