"""The demo job on in-process Ray, HuBERT's first iteration end to end on generated speech.

Generates about 20 minutes of speech-like audio from synthetic speakers with exact
frame-level phone alignments (``pipelines.demo.corpus``: the runtime packages never import
it), then runs ``pipelines.hubert`` on it with the config it writes to WORKDIR/demo.yaml:
shards it, extracts MFCC features of a seeded sample, fits k = 100 units on them, labels
every utterance, exports fairseq's tsv/km/dict, and writes the unit-quality report: PNMI,
phone and cluster purity against the generated alignments, and the figures, in
WORKDIR/root/reports/mfcc100/report.html. Then the other targets on the same corpus
(:mod:`pipelines.demo.targets`): k = 50 and 200 labelled in one pass, BEST-RQ labels,
acoustic pieces, and one page comparing the label sets. Each stage prints a summary; the
records go to WORKDIR/root/runs/.

Example:
    python -m pipelines.demo --workdir demo-output
    python -m pipelines.demo --workdir /tmp/small --minutes 3
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import _args, _cli
from .._schema import Float, Option, add_option

RECORD = "WORKDIR/root/runs/hubert-mfcc100.json"


def add_arguments(parser) -> None:
    parser.add_argument(
        "--workdir", default="demo-output", help="where corpus and root go (default: %(default)s)"
    )
    parser.add_argument("--fresh", action="store_true", help="delete the workdir first")
    add_option(parser, "minutes", Option(Float(gt=0), 20.0, "demo audio", "MINUTES"))
    _args.add_progress(parser)


def config(workdir: str, corpus: str) -> dict:
    """The demo's ``pipelines.hubert`` config."""
    return {
        "root": os.path.join(workdir, "root"),
        "inputs": [corpus],
        "shard": {"shard_bytes": "2MiB"},
        "features": {"name": "mfcc", "extractor": "mfcc", "percent": 50, "seed": 0},
        "kmeans": {"name": "mfcc100", "k": 100, "seed": 0},
        "label": {
            "name": "mfcc100",
            "fairseq_splits": {"train": 90, "valid": 10},
            "split_by": "utterance",
        },
        "report": {"phones": os.path.join(corpus, "phones.tsv")},
        "ray": {"num_cpus": 2},
    }


def check(args) -> None:
    """Nothing beyond the flags' types: the config is checked when it is written."""


def prepare(args) -> None:
    """Generates the corpus (once), writes the config and checks it as hubert does."""
    import shutil

    import yaml

    from .. import hubert
    from .corpus import write_demo_corpus

    if args.fresh and os.path.isdir(args.workdir):
        shutil.rmtree(args.workdir)
    corpus = os.path.join(args.workdir, "corpus", "demo")
    if not os.path.exists(os.path.join(corpus, "phones.tsv")):
        print(f"generating {args.minutes:g} minutes of demo speech in {corpus}", flush=True)
        write_demo_corpus(corpus, minutes=args.minutes, seed=0)
    path = os.path.join(args.workdir, "demo.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config(args.workdir, corpus), f, sort_keys=False)
    print(f"config: {path} (the same run: unitpipe hubert --config {path})", flush=True)
    args.hubert = argparse.Namespace(
        config=path,
        overrides=[],
        print_config=False,
        progress=args.progress,
        address=None,
        num_cpus=None,
        record=args.record,
    )
    hubert.check(args.hubert)
    hubert.prepare(args.hubert)


def run(args) -> dict:
    from .. import hubert
    from .targets import run_targets

    result = hubert.run(args.hubert)
    config = result["config"]
    targets = run_targets(config["root"], config["report"]["phones"], args.progress)
    return dict(result, targets=targets)


def summarize(args, result: dict) -> str:
    from .. import hubert
    from .targets import summary

    lines = [hubert.summarize(args.hubert, result).replace("hubert:", "demo:", 1)]
    return "\n".join(lines + summary(result["config"]["root"], result["targets"]))


def record_path(args) -> str:
    from .. import hubert

    return hubert.record_path(args.hubert)


def main(argv: list[str] | None = None) -> int:
    return _cli.main(sys.modules[__name__], argv)
