"""Every Arrow schema that ``shards`` stores, in one place.

A reader and a writer of the same table import the same constant, so they cannot disagree
(the habit of Hugging Face ``datasets``' ``pa_type`` constants).
"""

from __future__ import annotations

import enum

import pyarrow as pa

#: Sample rate of every stored sample (DESIGN.md, frame contracts).
SAMPLE_RATE = 16_000

#: Shortest sample kept: one 25 ms analysis window at 16 kHz.
MIN_SAMPLES = 400

#: Source sample rates taken (a header outside this range is not audio we can resample).
MIN_SOURCE_RATE, MAX_SOURCE_RATE = 2_000, 768_000

UTTERANCES = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        # Byte offset and size of the ``KEY.flac`` member's data inside the shard tar.
        pa.field("offset", pa.int64(), nullable=False),
        pa.field("size", pa.int64(), nullable=False),
        pa.field("num_samples", pa.int64(), nullable=False),
        pa.field("sample_rate", pa.int32(), nullable=False),
        pa.field("duration", pa.float64(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        # Segment span in the source file, seconds (0 and the file duration for whole files).
        pa.field("start", pa.float64(), nullable=False),
        pa.field("end", pa.float64(), nullable=False),
        pa.field("speaker", pa.string()),
        pa.field("group", pa.string()),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("original_sample_rate", pa.int32(), nullable=False),
        pa.field("original_channels", pa.int32(), nullable=False),
        pa.field("passthrough", pa.bool_(), nullable=False),
    ]
)

SHARDS = pa.schema(
    [
        pa.field("name", pa.string(), nullable=False),
        pa.field("samples", pa.int64(), nullable=False),
        pa.field("seconds", pa.float64(), nullable=False),
        pa.field("bytes", pa.int64(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
    ]
)

REJECTS = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("key", pa.string()),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
    ]
)

#: One row per discovered input file (:mod:`shards.discover`), before any audio is opened.
SOURCES = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("speaker", pa.string()),
        pa.field("group", pa.string()),
        pa.field("text", pa.string()),
        pa.field("sidecar", pa.string()),
    ]
)

#: One row per planned input file: which shard it goes to and what its header said.
PLAN = pa.schema(
    [
        pa.field("shard", pa.int32(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("sidecar", pa.string()),
        pa.field("speaker", pa.string()),
        pa.field("group", pa.string()),
        pa.field("text", pa.string()),
        pa.field("frames", pa.int64(), nullable=False),
        pa.field("sample_rate", pa.int32(), nullable=False),
        pa.field("channels", pa.int32(), nullable=False),
        pa.field("format", pa.string(), nullable=False),
        pa.field("subtype", pa.string(), nullable=False),
        pa.field("file_bytes", pa.int64(), nullable=False),
        pa.field("passthrough", pa.bool_(), nullable=False),
        pa.field("est_bytes", pa.int64(), nullable=False),
        pa.field("est_samples", pa.int64(), nullable=False),
    ]
)


class Stage(str, enum.Enum):
    """Where an input was turned away."""

    DISCOVER = "discover"
    PROBE = "probe"
    PLAN = "plan"
    SHARD = "shard"


class Reason(str, enum.Enum):
    """Reject reason codes, stable strings stored in ``rejects.parquet``."""

    MISSING = "missing"
    BROKEN_SYMLINK = "broken_symlink"
    PERMISSION_DENIED = "permission_denied"
    EMPTY_FILE = "empty_file"
    NOT_AUDIO = "not_audio"
    NO_SAMPLES = "no_samples"
    TOO_SHORT = "too_short"
    TRUNCATED = "truncated"
    CORRUPT = "corrupt"
    NON_FINITE = "non_finite"
    DUPLICATE_KEY = "duplicate_key"
    BAD_SIDECAR = "bad_sidecar"
    BAD_LIST_ENTRY = "bad_list_entry"
    BAD_NAME = "bad_name"
    NO_SPEECH = "no_speech"
    IO_ERROR = "io_error"
    #: Anything else a file made the decoder or resampler raise (the message names it).
    UNEXPECTED = "unexpected_error"


def reject_row(
    source: str, stage: Stage, reason: Reason, message: str, key: str | None = None
) -> dict:
    """Builds one ``REJECTS`` row."""
    return {
        "source": source,
        "key": key,
        "stage": Stage(stage).value,
        "reason": Reason(reason).value,
        "message": message,
    }
