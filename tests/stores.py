"""Finished feature stores built directly from arrays, for the stages that read them."""

from __future__ import annotations

import numpy as np

from shards.core.outputs import ShardOutput
from units.features.extractor import MFCC_SPEC
from units.features.store import FeatureShardWriter, finalize, store_layout

#: Mixture components of the generated frames.
K = 12


def frames(n: int, seed: int, k: int = K) -> np.ndarray:
    """MFCC-shaped (39-d) float32 frames from a fixed mixture of ``k`` Gaussians."""
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(99).normal(0, 3, (k, 39))
    return (means[rng.integers(0, k, n)] + rng.normal(0, 1, (n, 39))).astype(np.float32)


def write_store(root, name, utterances_per_shard=((300, 500, 200), (400,), (250, 350))):
    """A finished feature store of MFCC-shaped frames, keys ``spk-SHARD-UTT``; returns its
    rows in store order (float16, as stored)."""
    layout = store_layout(str(root), name)
    layout.make_dirs()
    rows, shards = [], []
    for s, lengths in enumerate(utterances_per_shard):
        shard = f"{s:06d}"
        writer = FeatureShardWriter(ShardOutput(layout, shard), 39)
        for u, length in enumerate(lengths):
            feats = frames(length, seed=100 * s + u)
            writer.add(f"spk-{s}-{u}", feats)
            rows.append(feats.astype(np.float16))
        writer.commit()
        shards.append(shard)
    finalize(layout, shards, {"spec": MFCC_SPEC.to_json(), "request": {"percent": 100}})
    return np.concatenate(rows) if rows else np.empty((0, 39), np.float16)
