"""Joining the committed shards' parts into the root's manifests and summary.

Parts are read one shard at a time and streamed into the output files, so the driver's
memory does not grow with the corpus.
"""

from __future__ import annotations

import collections
import contextlib
import json

import pyarrow as pa
import pyarrow.parquet as pq

from .core import storage
from .core.atomic import PendingFile, read_json, write_atomic, write_parquet_atomic
from .root import RootLayout
from .schemas import REJECTS, SHARDS, UTTERANCES

#: Rows per Parquet row group in the joined manifests.
ROW_GROUP = 65_536


class _StreamingParquet:
    """Appends tables to one Parquet file in fixed-size row groups (deterministic layout),
    streamed into a :class:`~shards.core.atomic.PendingFile` and published whole by
    :meth:`close`: the driver holds one row group, not the manifest. As a context manager it
    removes the file unless it was published."""

    def __init__(self, schema: pa.Schema, final: str):
        self._pending = PendingFile(final)
        self._writer = pq.ParquetWriter(self._pending.file, schema)
        self._tables: list[pa.Table] = []
        self._rows = 0

    def write(self, table: pa.Table) -> None:
        self._tables.append(table)
        self._rows += table.num_rows
        while self._rows >= ROW_GROUP:
            whole = pa.concat_tables(self._tables)
            self._writer.write_table(whole.slice(0, ROW_GROUP), row_group_size=ROW_GROUP)
            rest = whole.slice(ROW_GROUP)
            self._tables, self._rows = [rest], rest.num_rows

    def close(self) -> None:
        """Writes the last row group and the footer, and publishes the file."""
        if self._rows:
            self._writer.write_table(pa.concat_tables(self._tables), row_group_size=ROW_GROUP)
        self._writer.close()
        self._pending.publish()

    def __enter__(self) -> _StreamingParquet:
        return self

    def __exit__(self, *exc) -> None:
        if not self._pending.published:
            with contextlib.suppress(Exception):  # The error that got here is the one to see.
                self._writer.close()
        self._pending.discard()


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
        _StreamingParquet(UTTERANCES, layout.manifest("utterances.parquet")) as utterances,
        _StreamingParquet(REJECTS, layout.manifest("rejects.parquet")) as rejects,
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
        utterances.close()
        rejects.close()
    write_parquet_atomic(layout.manifest("shards.parquet"), shards)
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
