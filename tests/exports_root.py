"""A tiny labelled root for the export tests (lhotse, NeMo, Hugging Face), built once per test
session and copied for each module that asks, so every exporter reads the same data.

8 utterances of 0.5-2 s in 4 audio shards, MFCC k-means units (k=8) at 100 Hz. One audio
member is zeroed before labelling, so it fails to decode and the label pass rejects it: the
root holds an audio member without labels, which every export must leave out and count.
"""

from __future__ import annotations

import os
import shutil

import pyarrow.parquet as pq

from tests.session_roots import session_copy

#: The label set every export test reads.
LABELS = "km8"


def build_exports_root(tmp_path_factory, request) -> str:
    """A fresh copy of the session's labelled root (built on first use); returns its path."""
    return session_copy(tmp_path_factory, request, "exports-root", _build)


def _build(out: str) -> str:
    from shards import synthetic
    from shards.plan import ShardingOptions
    from shards.ray_sharding import run as shard
    from units.features.extractors import ExtractorOptions
    from units.features.sampling import SampleRequest
    from units.features.stage import run as extract
    from units.kmeans.estimator import KMeans
    from units.kmeans.stage import StageOptions
    from units.kmeans.stage import run as fit_kmeans
    from units.labels.stage import run as label

    corpus = os.path.join(out, "corpus")
    root = os.path.join(out, "root")
    synthetic.write_librispeech(corpus, speakers=2, chapters=1, utterances=4, seconds=(0.5, 2.0))
    shard([corpus], root, ShardingOptions(max_samples=2))
    victim = pq.read_table(os.path.join(root, "manifest", "utterances.parquet")).to_pylist()[5]
    tar = os.path.join(root, "shards", f"{victim['shard']}.tar")
    with open(tar, "r+b") as f:
        f.seek(victim["offset"])
        f.write(bytes(victim["size"]))
    extract(root, "mfcc", ExtractorOptions("mfcc"), SampleRequest(percent=50, seed=0))
    fit_kmeans(root, "mfcc", "km8", KMeans(8, seed=0, block_rows=512), StageOptions())
    meta = label(root, "km8", LABELS)
    assert meta["rejects"] == 1 and meta["utterances"] == 7 and len(meta["shards"]) == 4, meta
    shutil.rmtree(corpus)
    return root
