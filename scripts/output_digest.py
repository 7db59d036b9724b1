"""Digests of every output a root holds, to show that a change leaves the outputs the same bytes.

Data files (tars, Parquet, ``.npy``, fairseq's ``.tsv``/``.km``/``.lengths``/dict) are hashed
as they are. JSON records are hashed after dropping what describes the run rather than the
data (wall times, throughput, the project version, absolute paths under the root): two runs
of the same code on the same machine then give the same digest list, and any other difference
is a change of output. Figures and HTML are left out (they depend on matplotlib's version).

Example:
    python -m pipelines.demo --workdir /tmp/a --fresh --minutes 5
    python -m pipelines.w2vu --root /tmp/a/root --features mfcc --name w2vu --k 16 \\
        --pca-dim 16 --splits train=90,valid=10
    python scripts/output_digest.py /tmp/a/root > a.txt
    (the same at another commit into /tmp/b) ; diff a.txt b.txt
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np
import pyarrow.parquet as pq

#: JSON keys that describe a run (how long, on what, where) rather than its output; any key
#: ending in "seconds" goes too. ``rows_decision`` is k-means's hold-or-stream choice, made
#: from the memory the nodes had free at start: the centroids are the same either way.
VOLATILE = {"throughput", "version", "started", "finished", "rows_decision"}
SKIPPED = (".png", ".html")


def _scrub(value, root: str):
    if isinstance(value, dict):
        return {
            k: _scrub(v, root)
            for k, v in value.items()
            if k not in VOLATILE and not k.endswith("seconds")
        }
    if isinstance(value, list):
        return [_scrub(v, root) for v in value]
    if isinstance(value, str):
        return value.replace(root, "ROOT")
    return value


def digest(path: str, root: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".json"):
        data = json.dumps(_scrub(json.loads(data), root), sort_keys=True).encode()
    elif path.endswith("iterations.parquet"):  # k-means's log: its timing columns vary
        table = pq.read_table(path)
        kept = [c for c in table.column_names if "seconds" not in c]
        data = json.dumps(table.select(kept).to_pydict()).encode()
    elif path.endswith("checkpoint.npz"):  # k-means's resume state, with its clock
        with np.load(path) as saved:
            state = _scrub(json.loads(str(saved["state"])), root)
            arrays = b"".join(saved[k].tobytes() for k in sorted(saved.files) if k != "state")
        data = json.dumps(state, sort_keys=True).encode() + arrays
    elif path.endswith(".tsv"):
        data = data.replace(root.encode(), b"ROOT")  # fairseq's first line: the audio root
    return hashlib.sha256(data).hexdigest()


def main(root: str) -> int:
    root = os.path.abspath(root)
    for directory, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(SKIPPED) or name.startswith("."):
                continue
            path = os.path.join(directory, name)
            print(f"{digest(path, root)}  {os.path.relpath(path, root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
