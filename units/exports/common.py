"""What every export of a label set reads: the finished set, its contract, its labelled rows
shard by shard, and the record it leaves (``export.json``)."""

from __future__ import annotations

import json
import os

import pyarrow.compute as pc

from shards.core import storage
from shards.core.atomic import read_json, write_atomic
from shards.core.outputs import StageError
from shards.root import RootLayout
from units.features.extractor import FeatureSpec
from units.features.frames import SAMPLE_RATE, FrameContract
from units.labels.model import label_layout

#: Manifest columns every exporter reads per labelled utterance.
MANIFEST_COLUMNS = ["key", "shard", "offset", "size", "num_samples", "speaker"]


def finished_meta(root: str, labels: str) -> dict:
    """The label set's ``meta.json`` (written when every shard is labelled).

    Raises:
        StageError: No such label set, or one whose label pass has not finished.
    """
    layout = label_layout(root, labels)
    meta = read_json(layout.path("meta.json"))
    if meta is not None:
        return meta
    if read_json(layout.path("plan.json")) is not None:
        raise StageError(
            f"label set {labels!r} under {root} is unfinished (no meta.json): rerun its "
            "`unitpipe label` command to finish it, then export"
        )
    known = storage.listdir(os.path.join(root, "labels"))
    raise StageError(
        f"no label set {labels!r} under {root} (label sets: {', '.join(known) or 'none'})"
    )


def label_contract(meta: dict) -> FrameContract:
    """The framing of a label set's units: its features', stacked for BEST-RQ."""
    contract = FeatureSpec.from_json(meta["spec"]).contract
    if meta.get("target") == "bestrq":
        from units.bestrq.quantizer import stacked_contract

        contract = stacked_contract(contract, meta["stack"])
    return contract


def unit_columns(meta: dict) -> list[str]:
    """``units``, and ``units_1`` ... for a target with several codebooks."""
    return ["units"] + [f"units_{c}" for c in range(1, meta.get("codebooks", 1))]


def labelled_rows(root: str, labels: str, shard: str, meta: dict) -> tuple[list[dict], int]:
    """The labelled utterances of one audio shard, in stored order, and how many of its
    utterances have no labels (label-pass rejects).

    Each row is the manifest's (:data:`MANIFEST_COLUMNS`) with each unit column as a uint16
    array. Every utterance's units are checked against the frame contract (DESIGN.md,
    invariant 4) before anything is exported.

    Raises:
        RuntimeError: Units that break the frame contract, or labels of keys that are not
            in the shard (labels of another root).
    """
    root = RootLayout(root).root
    manifest = storage.read_parquet(
        RootLayout(root).manifest("utterances.parquet"),
        columns=MANIFEST_COLUMNS,
        filters=pc.field("shard") == shard,
    )
    columns = unit_columns(meta)
    path = label_layout(root, labels).shard_path("units", shard)
    table = storage.read_parquet(path, columns=["key", "frames", *columns])
    keys = table.column("key").to_pylist()
    frames = table.column("frames").to_numpy()
    units = {}
    for column in columns:
        values = table.column(column).combine_chunks()
        offsets, flat = values.offsets.to_numpy(), values.values.to_numpy()
        units[column] = [flat[offsets[i] : offsets[i + 1]] for i in range(len(keys))]
    index = {key: i for i, key in enumerate(keys)}
    contract = label_contract(meta)
    rows = []
    for row in manifest.to_pylist():
        i = index.pop(row["key"], None)
        if i is None:
            continue
        expected = contract.frames(row["num_samples"])
        lengths = {column: len(units[column][i]) for column in columns}
        if frames[i] != expected or any(n != expected for n in lengths.values()):
            raise RuntimeError(
                f"{path}: key {row['key']!r} has units {lengths} and frames={frames[i]} for "
                f"{row['num_samples']} samples, expected {expected} at {contract.rate:g} Hz; "
                "the label shard is damaged: delete it and its commit record and relabel"
            )
        rows.append(dict(row, **{column: units[column][i] for column in columns}))
    if index:
        raise RuntimeError(
            f"label shard {shard} of {labels!r} has keys that are not in the manifest's shard "
            f"{shard}: {sorted(index)[:5]}; the labels belong to another root"
        )
    return rows, manifest.num_rows - len(rows)


def skipped(root: str, labels: str, shard: str) -> dict:
    """The result of a shard whose export is complete: its counts from the label shard's
    commit record, so that nothing is read again."""
    record = label_layout(root, labels).read_commit(shard)
    if record is None:
        raise StageError(f"label shard {shard} of {labels!r} is not committed")
    return {
        "shard": shard,
        "skipped": True,
        "utterances": record["utterances"],
        "unlabelled": record["rejects"],
        "frames": record["frames"],
    }


def totals(results: list[dict]) -> dict:
    """The counts of all shards' results."""
    return {
        "utterances": sum(r["utterances"] for r in results),
        "unlabelled": sum(r["unlabelled"] for r in results),
        "frames": sum(r["frames"] for r in results),
    }


def write_record(out: str, record: dict) -> dict:
    """Writes ``OUT/export.json`` unless it already says the same (a rerun that did nothing
    rewrites nothing); returns ``record``."""
    path = storage.join(out, "export.json")
    if read_json(path) != record:
        write_atomic(path, json.dumps(record, indent=1, sort_keys=True).encode())
    return record


def lineage(labels: str, meta: dict) -> dict:
    """What an ``export.json`` says of the label set it came from."""
    return {
        "labels": labels,
        "target": meta.get("target", "kmeans"),
        "kmeans": meta.get("kmeans"),
        "bestrq": meta.get("bestrq"),
        "k": meta["k"],
        "codebooks": meta.get("codebooks", 1),
        "label_rate": meta["frame_rate"],
        "sample_rate": SAMPLE_RATE,
        "manifest_sha256": meta.get("manifest_sha256"),
    }
