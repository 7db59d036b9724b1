"""The demo job: generate a small speech-like corpus, then shard it on in-process Ray.

Example:
    python -m pipelines.demo --workdir demo-output

Later stages (features, k-means, labels, report) join this demo as they land.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from shards import synthetic

from . import shard


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workdir", default="demo-output", help="where corpus and root go")
    parser.add_argument("--fresh", action="store_true", help="delete the workdir first")
    args = parser.parse_args(argv)
    if args.fresh and os.path.isdir(args.workdir):
        shutil.rmtree(args.workdir)
    corpus = os.path.join(args.workdir, "corpus", "LibriSpeech-like")
    if not os.path.isdir(corpus):
        print(f"generating a LibriSpeech-like corpus in {corpus}")
        synthetic.write_librispeech(
            corpus, speakers=4, chapters=2, utterances=8, seconds=(2.0, 8.0), seed=0
        )
    root = os.path.join(args.workdir, "root")
    return shard.main(
        [
            "--input",
            corpus,
            "--output",
            root,
            "--shard-bytes",
            "2MiB",
            "--num-cpus",
            "2",
            "--no-progress",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
