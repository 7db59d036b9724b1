"""Every Arrow schema that ``units`` stores, in one place (``shards.schemas`` holds the shard
stage's): a reader and a writer of the same table import the same constant, so they cannot
disagree.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from shards.core.outputs import REJECTS

__all__ = [
    "FEATURE_INDEX", "LABELS", "LABELS_DEDUP", "PIECES", "REJECTS", "W2VU_ROWS", "list_column",
]  # fmt: skip

#: A feature shard's index: each utterance's first row in ``shards/NNNNNN.npy`` and frames.
FEATURE_INDEX = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("offset", pa.int64(), nullable=False),
        pa.field("frames", pa.int64(), nullable=False),
    ]
)

#: A label shard: each utterance's units at the frame rate of the k-means's features.
LABELS = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("units", pa.list_(pa.uint16()), nullable=False),
        pa.field("frames", pa.int32(), nullable=False),
        pa.field("frame_rate", pa.float32(), nullable=False),
    ]
)

#: With ``dedup``: GSLM-style runs, each unit once with the frames it lasted
#: (``units == np.repeat(dedup_units, durations)``).
LABELS_DEDUP = LABELS.append(pa.field("dedup_units", pa.list_(pa.uint16()), nullable=False)).append(
    pa.field("durations", pa.list_(pa.int32()), nullable=False)
)

#: Per audio shard of a wav2vec-U output: where each utterance's pooled rows sit in
#: ``features/NNNNNN.npy``.
W2VU_ROWS = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        # Frame-level cluster ids before merging (fairseq's CLUS128/{split}.src line).
        pa.field("clusters", pa.list_(pa.uint16()), nullable=False),
        pa.field("frames", pa.int32(), nullable=False),
        pa.field("row", pa.int64(), nullable=False),
        pa.field("length", pa.int32(), nullable=False),
    ]
)

#: A pieces shard: each utterance's piece ids, and each piece's first frame and frames.
PIECES = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("pieces", pa.list_(pa.int32()), nullable=False),
        pa.field("starts", pa.list_(pa.int32()), nullable=False),
        pa.field("lengths", pa.list_(pa.int32()), nullable=False),
        pa.field("frame_rate", pa.float32(), nullable=False),
    ]
)


def list_column(arrays: list[np.ndarray], kind: pa.DataType) -> pa.ListArray:
    """One list per array (units, durations, piece ids ...), built from their concatenation
    rather than element by element."""
    offsets = np.zeros(len(arrays) + 1, np.int32)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    values = np.concatenate(arrays) if arrays else np.empty(0, kind.to_pandas_dtype())
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, kind))
