"""wav2vec-U audio features: PCA, merge runs of one cluster, mean-pool by half.

fairseq's ``prepare_audio.sh`` runs these steps as separate scripts, each reading the
previous one's ``.npy``; here they are one function per utterance, applied while the audio
streams, with the same arithmetic:

1. ``apply_pca.py``: ``x @ A + b`` with the ``{dim}_pca_A.npy`` / ``{dim}_pca_b.npy`` pair.
2. ``merge_clusters.py --pooling mean``: consecutive frames whose cluster ids (from the
   k-means on the layer features before the PCA, ``CLUS128``) are equal become their mean.
3. ``mean_pool.py --subsample-rate 0.5``: ``ceil(n * rate)`` outputs, each the mean of an
   equal share of frames; the tail is padded with copies of the last frame so it divides
   (or, with ``remove_extra``, the frames that do not fit are dropped).

Layout under ``ROOT/w2vu/NAME/``, fairseq's extracted-features layout (what
``ExtractedFeaturesDataset`` and wav2vec-U's GAN training read)::

    {split}.npy        float32 (frames, dim), every utterance of the split in tsv order
    {split}.lengths    frames per utterance, one per line
    {split}.tsv        audio root, then ``NNNNNN.zip:OFFSET:SIZE<TAB>SAMPLES`` per utterance
    pca/               the PCA, with {dim}_pca_A.npy and {dim}_pca_b.npy
    features/          per audio shard: NNNNNN.npy, the pooled rows of its utterances
    rows/              per audio shard: NNNNNN.parquet (key, clusters, where its rows are)
    commits/           a shard's record, written last
    meta.json          lineage and counts, written last
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from shards.core import storage
from units.labels.model import dedup


def merge_runs(features: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """One row per run of equal consecutive ``clusters``: the mean of its ``features``.

    Args:
        features: (T, d) frames.
        clusters: (T,) cluster id per frame.

    Returns:
        float32 (runs, d), summed in float64.
    """
    if len(features) != len(clusters):
        raise ValueError(f"{len(features)} frames but {len(clusters)} cluster ids")
    if len(features) == 0:
        return np.empty((0, features.shape[1]), np.float32)
    _, counts = dedup(clusters)  # The runs, as GSLM's deduplicated units.
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    sums = np.add.reduceat(np.asarray(features, np.float64), starts, axis=0)
    return (sums / counts[:, None]).astype(np.float32)


def mean_pool(features: np.ndarray, rate: float = 0.5, remove_extra: bool = False) -> np.ndarray:
    """Subsamples (n, d) to ``ceil(n * rate)`` rows, each the mean of equal consecutive shares.

    When ``n`` does not divide, the tail is padded with copies of the last frame, or, with
    ``remove_extra``, ``target - n % target`` frames are cut and one output fewer is made
    (fairseq's ``mean_pool.py``). That cut always leaves equal shares at rate 0.5, not at
    every rate, so ``remove_extra`` takes rate 0.5 only.

    Raises:
        ValueError: ``remove_extra`` with a rate other than 0.5.
    """
    if remove_extra and rate != 0.5:
        raise ValueError(f"remove_extra pools evenly at rate 0.5 only, not {rate}")
    n, dim = features.shape
    if n == 0:
        return np.empty((0, dim), np.float32)
    target = math.ceil(n * rate)
    x = np.asarray(features, np.float64)
    rem = n % target
    if rem:
        if remove_extra:
            x = x[: -(target - rem)]
            target -= 1
        else:
            x = np.concatenate([x, np.repeat(x[-1:], target - rem, axis=0)])
    return x.reshape(target, -1, dim).mean(axis=1).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class W2VUPrep:
    """The per-utterance transform, from layer features and their cluster ids.

    Attributes:
        pca_a: (d, dim) projection, as ``{dim}_pca_A.npy``.
        pca_b: (dim,) offset, as ``{dim}_pca_b.npy``.
        rate: Mean-pool subsample rate.
        remove_extra: Drop the frames that do not pool evenly instead of padding.
    """

    pca_a: np.ndarray
    pca_b: np.ndarray
    rate: float = 0.5
    remove_extra: bool = False

    @classmethod
    def load(cls, directory: str, dim: int, **kwargs) -> W2VUPrep:
        """Reads the wav2vec-U PCA files, the ones fairseq's ``apply_pca.py`` would use."""
        a = storage.load_npy(os.path.join(directory, f"{dim}_pca_A.npy"))
        b = storage.load_npy(os.path.join(directory, f"{dim}_pca_b.npy"))
        return cls(a, b, **kwargs)

    def __call__(self, features: np.ndarray, clusters: np.ndarray) -> np.ndarray:
        projected = np.asarray(features, np.float32) @ self.pca_a + self.pca_b
        return mean_pool(merge_runs(projected, clusters), self.rate, self.remove_extra)
