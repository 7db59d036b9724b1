"""PCA from distributed moments: mean and covariance in float64, eigendecomposed on the driver.

Each part returns, per block, the row count, the sum and the scatter ``x^T x`` in float64;
they are summed in the fixed tree order of :mod:`units.kmeans.tree_sum`, so the result does not
depend on the number of workers. Only ``d x d`` numbers reach the driver.

wav2vec-U's ``scripts/pca.py`` trains a ``faiss.PCAMatrix`` and saves ``{dim}_pca_A.npy``
(``A.T``, shape ``(d_in, d_out)``) and ``{dim}_pca_b.npy`` (``b``, shape ``(d_out,)``), applied
as ``x @ A + b`` by ``apply_pca.py``; :meth:`PCA.save_wav2vec_u` writes that layout.
:func:`fit_pca` fits one into a directory of a stage's output, or loads the one an earlier
run committed there.

Example:
    >>> rng = np.random.default_rng(0)
    >>> x = (rng.standard_normal((1000, 3)) * [5, 2, 0.1]).astype(np.float32)
    >>> pca = PCA(2).fit(x)
    >>> pca.components_.shape, bool(pca.explained_variance_[0] > pca.explained_variance_[1])
    ((2, 3), True)
"""

from __future__ import annotations

import json
import os

import numpy as np

from shards.core import storage
from shards.core.atomic import read_json, write_atomic, write_npy_atomic
from units.kmeans import parts as kmeans_parts
from units.kmeans.parts import DataError, LocalParts, Part, cores


class PCA:
    """Principal components of data held in parts (or of an array).

    Args:
        n_components: Output dimension.
        whiten: Scale each component to unit variance (faiss's ``eigen_power=-0.5``).

    Attributes:
        mean_: (d,) float64.
        components_: (n_components, d) float64, rows sorted by decreasing variance, each
            signed so that its largest-magnitude entry is positive.
        explained_variance_: (n_components,) float64 eigenvalues of the covariance
            (normalised by ``n - 1``, as numpy's ``cov`` and scikit-learn).
        n_samples_: Rows seen.
        total_variance_: Trace of the covariance (all components).
    """

    def __init__(self, n_components: int, *, whiten: bool = False):
        self.n_components = n_components
        self.whiten = whiten

    def fit(self, data) -> PCA:
        """Fits on an array or on parts (see :func:`units.kmeans.transport.distribute`).

        Raises:
            DataError: No rows, fewer than two, or ``n_components`` larger than the dimension.
        """
        if isinstance(data, np.ndarray):  # One part per CPU: each runs on one BLAS thread.
            parts = LocalParts.from_array(data, parts=cores())
        else:
            parts = data
        if not 1 <= self.n_components <= parts.dim:
            raise DataError(
                f"n_components={self.n_components} must be between 1 and the dimension {parts.dim}"
            )
        n, total, scatter = kmeans_parts.reduce(parts, parts.map(Part.moments))
        if n < 2:
            raise DataError(f"PCA needs at least 2 rows, got {n}")
        mean = total / n
        cov = (scatter - n * np.outer(mean, mean)) / (n - 1)
        values, vectors = np.linalg.eigh((cov + cov.T) / 2)
        order = np.argsort(values)[::-1][: self.n_components]
        components = vectors[:, order].T
        signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(1)])
        self.mean_ = mean
        self.components_ = components * signs[:, None]
        self.explained_variance_ = np.maximum(values[order], 0.0)
        self.n_samples_ = int(n)
        self.total_variance_ = float(np.trace(cov))
        return self

    def _check(self) -> None:
        if not hasattr(self, "components_"):
            raise RuntimeError("this PCA is not fitted yet: call fit() first")

    def matrix(self) -> np.ndarray:
        """(d, n_components) float64: ``transform(x) == (x - mean_) @ matrix()``."""
        self._check()
        m = self.components_.T
        if self.whiten:
            m = m / np.sqrt(np.maximum(self.explained_variance_, 1e-12))
        return m

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Projects rows of ``x`` (float32 out)."""
        self._check()
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.mean_):
            raise DataError(f"expected rows of dimension {len(self.mean_)}, got shape {x.shape}")
        return ((x - self.mean_) @ self.matrix()).astype(np.float32)

    def save(self, directory: str) -> dict[str, str]:
        """Writes ``pca_mean.npy``, ``pca_components.npy``, ``pca_variance.npy`` and the
        wav2vec-U pair; returns the paths by role."""
        self._check()
        paths = {}
        for role, array in (
            ("mean", self.mean_),
            ("components", self.components_),
            ("variance", self.explained_variance_),
        ):
            paths[role] = os.path.join(directory, f"pca_{role}.npy")
            write_npy_atomic(paths[role], array)
        paths.update(self.save_wav2vec_u(directory))
        return paths

    def save_wav2vec_u(self, directory: str) -> dict[str, str]:
        """``{dim}_pca_A.npy`` (d_in, d_out) and ``{dim}_pca_b.npy`` (d_out,), float32, so
        that ``x @ A + b`` equals :meth:`transform` (wav2vec-U's ``apply_pca.py``)."""
        a = self.matrix()
        b = -self.mean_ @ a
        dim = self.n_components
        paths = {
            "wav2vec_u_A": os.path.join(directory, f"{dim}_pca_A.npy"),
            "wav2vec_u_b": os.path.join(directory, f"{dim}_pca_b.npy"),
        }
        write_npy_atomic(paths["wav2vec_u_A"], a.astype(np.float32))
        write_npy_atomic(paths["wav2vec_u_b"], b.astype(np.float32))
        return paths

    @classmethod
    def load(cls, directory: str, *, whiten: bool = False) -> PCA:
        """A PCA saved by :meth:`save`."""
        components = storage.load_npy(os.path.join(directory, "pca_components.npy"))
        pca = cls(len(components), whiten=whiten)
        pca.mean_ = storage.load_npy(os.path.join(directory, "pca_mean.npy"))
        pca.components_ = components
        pca.explained_variance_ = storage.load_npy(os.path.join(directory, "pca_variance.npy"))
        return pca


def fit_pca(parts, directory: str, dim: int, whiten: bool = False) -> PCA:
    """Fits a PCA on ``parts`` into ``directory`` (with wav2vec-U's ``{dim}_pca_A/b.npy``),
    or loads the one an earlier run committed there (``pca.json`` is written last).

    Args:
        parts: Parts of any kind (in this process or in Ray actors): only their ``map`` is
            called.
        directory: Where the PCA is saved, or was committed by an earlier run.
        dim: Output dimension.
        whiten: Scale each component to unit variance.
    """
    committed = read_json(os.path.join(directory, "pca.json"))
    if committed is not None:
        pca = PCA.load(directory, whiten=whiten)
        pca.total_variance_ = committed["total_variance"]
        return pca
    pca = PCA(dim, whiten=whiten).fit(parts)
    storage.makedirs(directory)
    pca.save(directory)
    write_atomic(
        os.path.join(directory, "pca.json"),
        json.dumps({"dim": dim, "whiten": whiten, "total_variance": pca.total_variance_}).encode(),
    )
    return pca
