"""``unitpipe SUBCOMMAND ...``: every entry point under one command.

Each subcommand is the ``python -m pipelines.SUBCOMMAND`` module with the same flags;
``unitpipe SUBCOMMAND --help`` shows its examples.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = ("shard", "features", "kmeans", "label", "report", "hubert", "w2vu", "demo")


def _summary(name: str) -> str:
    doc = importlib.import_module(f"pipelines.{name}").__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def usage() -> str:
    lines = ["usage: unitpipe SUBCOMMAND [--help] [ARGS...]", "", "subcommands:"]
    lines += [f"  {name:<9} {_summary(name)}" for name in SUBCOMMANDS]
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
