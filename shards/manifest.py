"""Joining the committed shards' parts into the root's manifests and summary.

Parts are read one shard at a time and streamed into the output files, so the driver's
memory does not grow with the corpus.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json

import pyarrow as pa
import pyarrow.compute as pc

from .core import storage
from .core.atomic import ParquetStream, fsync_dir, read_json, write_atomic, write_parquet_atomic
from .root import RootLayout
from .schemas import REJECTS, SHARDS, UTTERANCES

#: Rows per Parquet row group in the joined manifests.
ROW_GROUP = 65_536


def finalize(
    layout: RootLayout,
    num_shards: int,
    plan_rejects: list[dict],
    meta: dict,
    run: dict,
    planned_sources: pa.ChunkedArray | pa.Array,
) -> dict:
    """Writes ``utterances``, ``shards``, ``rejects`` and ``summary.json`` from the parts.

    Args:
        layout: The root.
        num_shards: Shards in the plan (all must be committed).
        plan_rejects: Rejects from discovery, probing and planning.
        meta: The plan's metadata (files discovered, layout).
        run: This run's throughput record (:func:`shards.core.throughput.record`).
        planned_sources: The plan's ``source`` column, a row per planned input: which files
            could give utterances to more than one shard.

    Returns:
        The summary.
    """
    # A file gives utterances to one shard, unless the plan lists it twice (a list input
    # may, under two keys): files taken are counted per shard, those few apart.
    listed_twice = pa.array(sorted(sources_listed_twice(planned_sources)), pa.string())
    taken_twice: set[str] = set()
    files_taken = 0
    with (
        ParquetStream(layout.manifest("utterances.parquet"), UTTERANCES, ROW_GROUP) as utterances,
        ParquetStream(layout.manifest("rejects.parquet"), REJECTS, ROW_GROUP) as rejects,
    ):
        rejects.write(pa.Table.from_pylist(plan_rejects, schema=REJECTS))
        shard_rows = []
        speakers: set[str] = set()
        by_reason: collections.Counter[str] = collections.Counter()
        by_reason.update(r["reason"] for r in plan_rejects)
        for i in range(num_shards):
            record = layout.read_commit(i)
            if record is None:
                name = layout.shard_name(i)
                raise RuntimeError(f"shard {name} is not committed; rerun to finish it")
            shard_rows.append({k: record[k] for k in SHARDS.names})
            table = storage.read_parquet(layout.utterances_part(i), schema=UTTERANCES)
            utterances.write(table)
            speakers.update(pc.unique(table.column("speaker")).drop_null().to_pylist())
            sources = pc.unique(table.column("source"))
            twice = pc.is_in(sources, value_set=listed_twice)
            taken_twice.update(sources.filter(twice).to_pylist())
            files_taken += len(sources) - twice.true_count
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
        "files_taken": files_taken + len(taken_twice),
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


def sources_listed_twice(sources: pa.ChunkedArray | pa.Array, chunk: int = 1 << 16) -> set[str]:
    """The values that occur more than once in ``sources``.

    Sorted indices (8 bytes a row) and one chunk of sorted values at a time: neither a hash
    set of every value nor a sorted copy of the column is ever held (at Libri-light scale,
    7 million paths, either would be about a gigabyte on the driver).
    """
    order = pc.sort_indices(sources)
    found: set[str] = set()
    for lo in range(0, len(order), chunk):
        # One value before the chunk, so that a run across the chunk's edge is seen.
        values = pc.take(sources, order[max(0, lo - 1) : lo + chunk])
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()
        same = pc.equal(values.slice(1), values.slice(0, len(values) - 1))
        found.update(values.slice(1).filter(same).to_pylist())
    return found


def read_summary(layout: RootLayout) -> dict | None:
    return read_json(layout.manifest("summary.json"))
