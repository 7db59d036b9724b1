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
import os

import numpy as np

from shards.core import storage
from shards.core.atomic import read_json
from shards.core.outputs import OutputLayout, StageError
from units.features.extractor import FeatureSpec
from units.features.frames import FrameContract
from units.kmeans.parts import CHUNK_ROWS, Assigner


def label_layout(root: str, name: str) -> OutputLayout:
    """The files of label set ``name`` (see the module docstring)."""
    return OutputLayout(
        root,
        "labels",
        name,
        data={"units": "units/{shard}.parquet"},
        rejects="rejects/{shard}.parquet",
        commit="commits/{shard}.json",
    )


def dedup(units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of equal units: ``(values, durations)`` with ``np.repeat(values, durations)``
    equal to ``units`` (GSLM's deduplicated units, durations in frames)."""
    units = np.asarray(units)
    if len(units) == 0:
        return units[:0], np.empty(0, np.int32)
    starts = np.flatnonzero(np.r_[True, units[1:] != units[:-1]])
    return units[starts], np.diff(np.r_[starts, len(units)]).astype(np.int32)


# The checkpoint path may move; its sha256 says whether it is the same model.
_SPEC_FIELDS = [f.name for f in dataclasses.fields(FeatureSpec) if f.name != "checkpoint"]


def check_spec(kmeans: str, recorded: FeatureSpec, extractor: FeatureSpec) -> None:
    """Raises :class:`StageError` unless ``extractor`` (a described or built extractor's
    spec) computes the features ``recorded`` names.

    Every field that decides a feature vector must agree (extractor, dimension, frame
    contract, checkpoint sha256, layer, waveform normalisation); only the checkpoint's path
    may differ, so a moved model still labels.
    """
    diffs = [
        f"{name}: k-means {getattr(recorded, name)!r}, extractor {getattr(extractor, name)!r}"
        for name in _SPEC_FIELDS
        if getattr(recorded, name) != getattr(extractor, name)
    ]
    if diffs:
        raise StageError(
            f"k-means {kmeans!r} was fitted on other features than this extractor computes "
            f"({'; '.join(diffs)}): label with the extractor the k-means recorded, or fit a "
            "k-means on these features"
        )


def check_same_features(models: list) -> None:
    """Raises :class:`StageError` unless ``models`` (labelling targets) read the features
    of one extractor: the same fields but the layer (one forward pass gives every layer)
    and the checkpoint's path."""
    first = models[0]
    for model in models[1:]:
        diffs = [
            f"{name}: {getattr(first.spec, name)!r} vs {getattr(model.spec, name)!r}"
            for name in _SPEC_FIELDS
            if name != "layer" and getattr(first.spec, name) != getattr(model.spec, name)
        ]
        if diffs:
            raise StageError(
                f"{first.name!r} and {model.name!r} read features of different extractors "
                f"({'; '.join(diffs)}): one pass labels targets of one extractor (any layers)"
            )


@dataclasses.dataclass
class KMeansModel:
    """A finished ``ROOT/kmeans/NAME``: centroids, the optional PCA, and the feature spec."""

    name: str
    spec: FeatureSpec
    centroids: np.ndarray
    pca_mean: np.ndarray | None
    pca_matrix: np.ndarray | None
    meta: dict
    _assigners: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def load(cls, root: str, name: str) -> KMeansModel:
        directory = os.path.join(root, "kmeans", name)
        meta_path = os.path.join(directory, "kmeans.json")
        if not storage.exists(meta_path):
            raise StageError(
                f"no finished k-means {name!r} under {root}: run `python -m pipelines.kmeans "
                f"--root {root} --name {name} ...` first"
            )
        meta = read_json(meta_path)
        centroids = storage.load_npy(os.path.join(directory, "centroids.npy"))
        mean = matrix = None
        if meta.get("pca"):
            from units.kmeans.pca import PCA

            pca = PCA.load(os.path.join(directory, meta["pca"]["directory"]))
            pca.whiten = bool(meta["pca"]["whiten"])
            mean, matrix = pca.mean_.astype(np.float32), pca.matrix().astype(np.float32)
        if len(centroids) > 65536:
            raise StageError(f"k={len(centroids)} does not fit uint16 units")
        return cls(name, FeatureSpec.from_json(meta["spec"]), centroids, mean, matrix, meta)

    @property
    def contract(self) -> FrameContract:
        """The units' framing: the features' own (one unit per feature frame)."""
        return self.spec.contract

    @property
    def k(self) -> int:
        return len(self.centroids)

    def units_of(self, features: list[np.ndarray], device: str = "cpu") -> list[np.ndarray]:
        """:meth:`units` of each utterance's features, with one search for the batch: the
        method every labelling target has (:class:`units.labels.targets.Target`)."""
        units = self.units(np.concatenate(features), device=device)
        bounds = np.cumsum([0] + [len(f) for f in features])
        return [units[bounds[i] : bounds[i + 1]] for i in range(len(features))]

    def units(self, features: np.ndarray, device: str = "cpu") -> np.ndarray:
        """uint16 unit per frame of ``features`` (T, dim): the PCA, then the nearest centroid.

        ``device="cuda"`` assigns with faiss's GPU index. The assigner is built once per
        model and device, so callers can label utterance by utterance or in batches.
        """
        x = np.asarray(features, dtype=np.float32)
        if self.pca_mean is not None:
            x = (x - self.pca_mean) @ self.pca_matrix
        if len(x) == 0:
            return np.empty(0, np.uint16)
        if device not in self._assigners:
            self._assigners[device] = Assigner(self.centroids, device=device)
        labels = self._assigners[device](np.ascontiguousarray(x), distances=False)[0]
        return labels.astype(np.uint16)

    def units_on_device(self, features):
        """uint16 unit per frame of ``features``, a float32 ``(T, dim)`` torch tensor on any
        device: the PCA and the nearest centroid (GEMM argmin, full float32) run where the
        features are, and only the units come back to the host. On a GPU the label pass's
        features never leave it."""
        import torch

        device = features.device
        key = ("torch", str(device))
        if key not in self._assigners:
            c = torch.from_numpy(self.centroids).to(device)
            pca = None
            if self.pca_mean is not None:
                pca = tuple(
                    torch.from_numpy(a).to(device) for a in (self.pca_mean, self.pca_matrix)
                )
            self._assigners[key] = ((-2 * c.T).contiguous(), (c.double() ** 2).sum(1).float(), pca)
        ct_m2, norms, pca = self._assigners[key]
        x = features if pca is None else (features - pca[0]) @ pca[1]
        labels = torch.empty(len(x), dtype=torch.int32, device=device)
        for s in range(0, len(x), CHUNK_ROWS):  # Bounded (rows, k) distances at a time.
            labels[s : s + CHUNK_ROWS] = torch.addmm(norms, x[s : s + CHUNK_ROWS], ct_m2).argmin(1)
        return labels.cpu().numpy().astype(np.uint16)
