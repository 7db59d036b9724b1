"""Centroids in fairseq's layout: the ``kmeans.joblib`` that ``dump_km_label.py`` loads.

fairseq's ``learn_kmeans.py`` saves a fitted ``sklearn.cluster.MiniBatchKMeans`` and
``dump_km_label.py`` reads its ``cluster_centers_``; SpeechBrain's discrete tokenizers and
users' scripts call ``.predict()``. So the file holds a real fitted scikit-learn ``KMeans``
whose centres are ours (scikit-learn comes with librosa, a dependency).
"""

from __future__ import annotations

import io
import warnings

import numpy as np

from shards.core.atomic import write_atomic


def sklearn_model(centroids: np.ndarray, inertia: float | None = None):
    """A fitted ``sklearn.cluster.KMeans`` with exactly ``centroids`` as its centres.

    It is fitted on the centroids themselves from ``init=centroids`` (each is its own
    cluster), which sets every attribute scikit-learn's ``predict`` and ``transform`` check,
    then given our centres outright (a fit could move one where two centroids coincide) and
    our fit's ``inertia_``. ``labels_`` is dropped: it would describe that one-pass fit, not
    the features.
    """
    from sklearn.cluster import KMeans

    c = np.ascontiguousarray(centroids, dtype=np.float32)
    model = KMeans(n_clusters=len(c), init=c, n_init=1, max_iter=1)
    with warnings.catch_warnings():  # A one-iteration fit warns that it did not converge.
        warnings.simplefilter("ignore")
        model.fit(c)
    model.cluster_centers_ = c.copy()
    model.inertia_ = float("nan") if inertia is None else float(inertia)
    del model.labels_
    return model


def export(centroids: np.ndarray, path: str, inertia: float | None = None) -> None:
    """Writes ``path``: :func:`sklearn_model` of ``centroids``, joblib-dumped."""
    import joblib  # Only a stage asked for the export needs it.

    buffer = io.BytesIO()
    joblib.dump(sklearn_model(centroids, inertia), buffer)
    write_atomic(path, buffer.getvalue())
