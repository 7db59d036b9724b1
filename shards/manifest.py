"""Joining the committed shards' parts into the root's manifests and summary.

Parts are read one shard at a time and streamed into the output files, so the driver's
memory does not grow with the corpus.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json

import pyarrow as pa

from .core import storage
from .core.atomic import ParquetStream, fsync_dir, read_json, write_atomic, write_parquet_atomic
from .root import RootLayout
from .schemas import REJECTS, SHARDS, UTTERANCES

#: Rows per Parquet row group in the joined manifests.
ROW_GROUP = 65_536


def finalize(
    layout: RootLayout, num_shards: int, plan_rejects: list[dict], meta: dict, run: dict
) -> dict:
    """Writes ``utterances``, ``shards``, ``rejects`` and ``summary.json`` from the parts.

    Args:
        layout: The root.
        num_shards: Shards in the plan (all must be committed).
        plan_rejects: Rejects from discovery, probing and planning.
        meta: The plan's metadata (files discovered, layout).
        run: This run's throughput record (:func:`shards.core.throughput.record`).

    Returns:
        The summary.
    """
    with (
        ParquetStream(layout.manifest("utterances.parquet"), UTTERANCES, ROW_GROUP) as utterances,
        ParquetStream(layout.manifest("rejects.parquet"), REJECTS, ROW_GROUP) as rejects,
    ):
        rejects.write(pa.Table.from_pylist(plan_rejects, schema=REJECTS))
        shard_rows = []
        speakers: set[str] = set()
        by_reason: collections.Counter[str] = collections.Counter()
        by_reason.update(r["reason"] for r in plan_rejects)
        sources_taken: set[str] = set()
        for i in range(num_shards):
            record = layout.read_commit(i)
            if record is None:
                name = layout.shard_name(i)
                raise RuntimeError(f"shard {name} is not committed; rerun to finish it")
            shard_rows.append({k: record[k] for k in SHARDS.names})
            table = storage.read_parquet(layout.utterances_part(i), schema=UTTERANCES)
            utterances.write(table)
            speakers.update(s for s in table.column("speaker").to_pylist() if s is not None)
            sources_taken.update(table.column("source").to_pylist())
            part_rejects = storage.read_parquet(layout.rejects_part(i), schema=REJECTS)
            rejects.write(part_rejects)
            by_reason.update(part_rejects.column("reason").to_pylist())
        shards = pa.Table.from_pylist(shard_rows, schema=SHARDS)
        seconds = float(sum(r["seconds"] for r in shard_rows))
        # Each fsync waits on the disk: the three manifests are synced side by side (the
        # file system commits them together), their directory once, the summary last.
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            published = [
                pool.submit(utterances.publish, sync_dir=False),
                pool.submit(rejects.publish, sync_dir=False),
                pool.submit(
                    write_parquet_atomic, layout.manifest("shards.parquet"), shards, None, False
                ),
            ]
            for done in published:
                done.result()
        fsync_dir(layout.manifest_dir)
    summary = {
        "layout": meta.get("layout"),
        "files": meta["files"],
        "files_taken": len(sources_taken),
        "segments": int(sum(r["samples"] for r in shard_rows)),
        "hours": seconds / 3600.0,
        "seconds": seconds,
        "speakers": len(speakers),
        "shards": num_shards,
        "bytes": int(sum(r["bytes"] for r in shard_rows)),
        "rejects": int(sum(by_reason.values())),
        "rejects_by_reason": dict(sorted(by_reason.items())),
        # Throughput of the run that finished the job (a resumed run counts its own work).
        "throughput": run,
    }
    write_atomic(
        layout.manifest("summary.json"), json.dumps(summary, indent=1, sort_keys=True).encode()
    )
    return summary


def read_summary(layout: RootLayout) -> dict | None:
    return read_json(layout.manifest("summary.json"))
