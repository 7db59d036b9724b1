"""A small MFCC k-means root for the label-pass and pieces tests, built once per test session
and copied for each module that asks, so the modules do not shard, extract and fit it each.

10 utterances of 0.5-2 s (2 speakers x 5) in 3 audio shards of 4, 4 and 2, MFCC features of a
50% sample, k-means ``km8`` (k=8) and ``km8pca`` (k=8 on a PCA to 5 dimensions); nothing
labelled. The corpus stays beside the template: the manifest's sources are its files, which
a fairseq export of source audio reads.
"""

from __future__ import annotations

import os

from tests.session_roots import session_copy


def build_mfcc_root(tmp_path_factory, request) -> str:
    """A fresh copy of the session's MFCC k-means root (built on first use); returns its path."""
    return session_copy(tmp_path_factory, request, "mfcc-root", _build)


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

    corpus = os.path.join(out, "corpus")
    root = os.path.join(out, "root")
    synthetic.write_librispeech(corpus, speakers=2, chapters=1, utterances=5, seconds=(0.5, 2.0))
    shard([corpus], root, ShardingOptions(max_samples=4))
    extract(root, "mfcc", ExtractorOptions("mfcc"), SampleRequest(percent=50, seed=0))
    fit_kmeans(root, "mfcc", "km8", KMeans(8, seed=0, block_rows=512), StageOptions())
    fit_kmeans(root, "mfcc", "km8pca", KMeans(8, seed=0, block_rows=512), StageOptions(pca=5))
    return root
