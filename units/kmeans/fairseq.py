"""Centroids in fairseq's layout: the ``kmeans.joblib`` that ``dump_km_label.py`` loads."""

from __future__ import annotations

import io
import types

import numpy as np

from shards.core.atomic import write_atomic


def export(centroids: np.ndarray, path: str) -> None:
    """A joblib file that fairseq's ``dump_km_label.py`` loads: it reads only
    ``cluster_centers_``, so a plain namespace (no scikit-learn, no unitpipe needed to load)
    carries it."""
    import joblib  # Only a stage asked for the export needs it.

    buffer = io.BytesIO()
    joblib.dump(types.SimpleNamespace(cluster_centers_=np.asarray(centroids, np.float32)), buffer)
    write_atomic(path, buffer.getvalue())
