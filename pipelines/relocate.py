"""Point the fairseq exports of a moved root at where the root is now.

fairseq reads a tsv's first line as the directory of its audio, an absolute path; after a
root is moved or copied (rsync to another machine, a new mount point) every export under it
(ROOT/labels/*/fairseq, ROOT/pieces/*/fairseq) needs that line rewritten. This does it, and
checks that each export's audio links reach their shards: the links are relative, so a
root moved as a whole needs nothing else. An export that already points at itself is left
untouched, so a rerun does nothing. Runs on the local machine alone (no Ray).

Example:
    rsync -a /data/ls100/ /scratch/ls100/ && unitpipe relocate --root /scratch/ls100
    unitpipe relocate --root /scratch/ls100 --labels km500 --shards /fast/ls100/shards

The run's JSON record goes to ROOT/runs/relocate.json (--record); stdout lists what changed.
"""

from __future__ import annotations

import glob
import os
import sys

from . import _args, _cli

RECORD = "ROOT/runs/relocate.json"


def add_arguments(parser) -> None:
    _args.add_root(parser, flag_help="the root where it is now (local)")
    parser.add_argument(
        "--labels",
        nargs="+",
        metavar="NAME",
        help="only these label sets' exports (default: every export under ROOT)",
    )
    parser.add_argument(
        "--shards",
        metavar="DIRECTORY",
        help="link the exports' audio to the tars in DIRECTORY instead of ROOT/shards",
    )


def _exports(args) -> list[str]:
    if args.labels:
        return [os.path.join(args.root, "labels", name, "fairseq") for name in args.labels]
    found = []
    for kind in ("labels", "pieces"):
        found += glob.glob(os.path.join(args.root, kind, "*", "fairseq", "export.json"))
    return sorted(os.path.dirname(path) for path in found)


def check(args) -> None:
    if "://" in args.root:
        raise _cli.UsageError("fairseq reads local files: relocate a local root")
    if not os.path.isdir(args.root):
        raise _cli.UsageError(f"--root {args.root}: no such directory")
    if args.shards is not None and not os.path.isdir(args.shards):
        raise _cli.UsageError(f"--shards {args.shards}: no such directory")
    for directory in _exports(args) if args.labels else ():
        if not os.path.exists(os.path.join(directory, "export.json")):
            raise _cli.UsageError(f"{directory}: no fairseq export (run label --fairseq-splits)")


def run(args) -> dict:
    from shards.core.outputs import StageError
    from units.labels.relocate import relocate

    exports = _exports(args)
    if not exports:
        raise _cli.UsageError(f"no fairseq exports under {args.root}")
    try:
        results = [relocate(directory, args.shards) for directory in exports]
    except StageError as e:
        raise _cli.UsageError(str(e)) from None
    changed = sum(bool(r["rewritten"]) or bool(r["relinked"]) for r in results)
    return {"root": os.path.abspath(args.root), "exports": results, "written": changed}


def summarize(args, result: dict) -> str:
    lines = []
    for r in result["exports"]:
        what = ", ".join(r["rewritten"]) or "already in place"
        if r["relinked"]:
            what += f"; {r['relinked']} audio links to {args.shards}"
        lines.append(f"  {r['directory']}: {what}")
    head = f"relocate: {result['written']} of {len(result['exports'])} exports changed"
    return "\n".join([head] + lines)


def record_path(args) -> str:
    return _cli.record_path(args.root, "relocate")


def main(argv: list[str] | None = None) -> int:
    return _cli.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
