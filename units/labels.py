"""Unit labels: features with the k-means's own spec, then the nearest centroid, per utterance.

Layout under ``ROOT/labels/NAME/``::

    plan.json                lineage, written before any work
    units/000000.parquet     key, shard, units (list<uint16>), frames, frame_rate
    rejects/000000.parquet   utterances that could not be labelled, with the reason
    commits/000000.json      written last: the shard is complete
    meta.json                lineage (feature spec, k-means, manifest) and totals; last

``units/`` holds nothing but the label shards, so it is one Parquet dataset:
``pyarrow.dataset.dataset(".../units")`` and ``datasets.load_dataset("parquet",
data_dir=".../units")`` read it (temporary files start with a dot and are skipped), and it
joins the utterances manifest on ``key``.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pyarrow as pa

from shards.atomic import read_commit

from .extractor import FeatureSpec
from .extractors import ExtractorOptions
from .feature_store import FEATURE_REJECTS
from .kmeans_parts import Assigner

LABELS = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("units", pa.list_(pa.uint16()), nullable=False),
        pa.field("frames", pa.int32(), nullable=False),
        pa.field("frame_rate", pa.float32(), nullable=False),
    ]
)

#: Utterances that could not be labelled: the feature store's rejects schema.
LABEL_REJECTS = FEATURE_REJECTS


class LabelError(ValueError):
    """A k-means or request that cannot label: raised before any work."""


@dataclasses.dataclass(frozen=True)
class LabelLayout:
    """Paths of one label set."""

    root: str
    name: str

    @property
    def directory(self) -> str:
        return os.path.join(self.root, "labels", self.name)

    @property
    def units_dir(self) -> str:
        return os.path.join(self.directory, "units")

    def path(self, filename: str) -> str:
        return os.path.join(self.directory, filename)

    def make_dirs(self) -> None:
        for sub in ("units", "rejects", "commits"):
            os.makedirs(os.path.join(self.directory, sub), exist_ok=True)

    def units_path(self, shard: str) -> str:
        return os.path.join(self.units_dir, f"{shard}.parquet")

    def rejects_path(self, shard: str) -> str:
        return os.path.join(self.directory, "rejects", f"{shard}.parquet")

    def commit_path(self, shard: str) -> str:
        return os.path.join(self.directory, "commits", f"{shard}.json")

    def read_commit(self, shard: str) -> dict | None:
        return read_commit(self.commit_path(shard), self.units_path(shard))


def extractor_options(spec: FeatureSpec) -> ExtractorOptions:
    """The extractor options that rebuild the features a k-means was fitted on."""
    if spec.extractor in ("mfcc", "fbank"):
        return ExtractorOptions(spec.extractor)
    return ExtractorOptions(f"{spec.extractor}:{spec.checkpoint}", layer=spec.layer)


@dataclasses.dataclass
class KMeansModel:
    """A finished ``ROOT/kmeans/NAME``: centroids, the optional PCA, and the feature spec."""

    name: str
    spec: FeatureSpec
    centroids: np.ndarray
    pca_mean: np.ndarray | None
    pca_matrix: np.ndarray | None
    meta: dict

    @classmethod
    def load(cls, root: str, name: str) -> KMeansModel:
        directory = os.path.join(root, "kmeans", name)
        meta_path = os.path.join(directory, "kmeans.json")
        if not os.path.exists(meta_path):
            raise LabelError(
                f"no finished k-means {name!r} under {root}: run `python -m pipelines.kmeans "
                f"--root {root} --name {name} ...` first"
            )
        with open(meta_path) as f:
            meta = json.load(f)
        centroids = np.load(os.path.join(directory, "centroids.npy"))
        mean = matrix = None
        if meta.get("pca"):
            from .pca import PCA

            pca = PCA.load(os.path.join(directory, meta["pca"]["directory"]))
            pca.whiten = bool(meta["pca"]["whiten"])
            mean, matrix = pca.mean_.astype(np.float32), pca.matrix().astype(np.float32)
        if len(centroids) > 65536:
            raise LabelError(f"k={len(centroids)} does not fit uint16 units")
        return cls(name, FeatureSpec.from_json(meta["spec"]), centroids, mean, matrix, meta)

    def units(self, features: np.ndarray) -> np.ndarray:
        """uint16 unit per frame of ``features`` (T, dim)."""
        x = np.asarray(features, dtype=np.float32)
        if self.pca_mean is not None:
            x = (x - self.pca_mean) @ self.pca_matrix
        if len(x) == 0:
            return np.empty(0, np.uint16)
        return Assigner(self.centroids)(np.ascontiguousarray(x), distances=False)[0].astype(
            np.uint16
        )
