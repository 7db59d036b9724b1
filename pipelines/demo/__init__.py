"""The demo job on in-process Ray, HuBERT's first iteration end to end on generated speech.

Generates about 20 minutes of speech-like audio from synthetic speakers with exact
frame-level phone alignments (``pipelines.demo.corpus``: the runtime packages never import
it), shards it, extracts MFCC features of a seeded sample, fits k = 100 units on them,
labels every utterance, exports fairseq's tsv/km/dict, and writes the unit-quality report:
PNMI, phone and cluster purity against the generated alignments, and the figures, in
WORKDIR/root/reports/mfcc100/report.html.

Example:
    python -m pipelines.demo --workdir demo-output
    python -m pipelines.demo --workdir /tmp/small --minutes 3
"""

from __future__ import annotations

import argparse
import os
import shutil

from shards.plan import ShardingOptions, parse_size
from shards.ray_sharding import run as shard
from units import report
from units.extractors import ExtractorOptions
from units.fairseq_export import export as export_fairseq
from units.features_ray import run as extract
from units.kmeans import KMeans
from units.kmeans_ray import run as fit_kmeans
from units.labels_ray import run as label
from units.sampling import SampleRequest

from .. import _cli
from .._ray import connect
from .corpus import write_demo_corpus


@_cli.reports_output_errors
def main(argv: list[str] | None = None) -> int:
    parser = _cli.parser("pipelines.demo", __doc__)
    parser.add_argument("--workdir", default="demo-output", help="where corpus and root go")
    parser.add_argument("--fresh", action="store_true", help="delete the workdir first")
    parser.add_argument(
        "--minutes", type=float, default=20.0, help="demo audio (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    _cli.setup_logging()
    if args.fresh and os.path.isdir(args.workdir):
        shutil.rmtree(args.workdir)
    corpus = os.path.join(args.workdir, "corpus", "demo")
    if not os.path.exists(os.path.join(corpus, "phones.tsv")):
        print(f"generating {args.minutes:g} minutes of demo speech in {corpus}")
        write_demo_corpus(corpus, minutes=args.minutes, seed=0)
    root = os.path.join(args.workdir, "root")
    connect(argparse.Namespace(address=None, num_cpus=2))
    shards = shard([corpus], root, ShardingOptions(shard_bytes=parse_size("2MiB")))
    print(
        f"shards: {shards['shards']} shard(s) in {root}/shards, {shards['hours']:.3f} h in "
        f"{shards['segments']} samples, {shards['rejects']} rejected"
    )
    features = extract(root, "mfcc", ExtractorOptions("mfcc"), SampleRequest(percent=50, seed=0))
    print(
        f"features: {features['utterances']} utterances ({features['sample']['hours']:.3f} h), "
        f"{features['rows']} frames of {features['spec']['dim']}-dim MFCC in "
        f"{root}/features/mfcc"
    )
    km = fit_kmeans(root, "mfcc", "mfcc100", KMeans(100, seed=0))
    print(
        f"k-means: k={km['k']} on {km['rows']} frames, {km['iterations']} iterations, "
        f"inertia {km['inertia_per_frame']:.2f} per frame, in {root}/kmeans/mfcc100"
    )
    labels = label(root, "mfcc100", "mfcc100")
    print(
        f"labels: {labels['utterances']} utterances, {labels['frames']} units at "
        f"{labels['frame_rate']:g} Hz, in {root}/labels/mfcc100/units"
    )
    fairseq = export_fairseq(root, "mfcc100", {"train": 90, "valid": 10}, by="utterance")
    print(
        f"fairseq: {fairseq['splits']} in {root}/labels/mfcc100/fairseq "
        f"(label_rate {fairseq['label_rate']:g})"
    )
    built = report.build(root, "mfcc100", os.path.join(corpus, "phones.tsv"))
    paths = report.write(built, os.path.join(root, "reports", "mfcc100"))
    print(report.headline(built.metrics))
    print(f"report: {paths['report']}")
    return 0
