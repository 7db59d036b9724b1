"""Per-cluster sums for the k-means parts, where numpy has no single fast call.

Per-cluster sums of the rows (the M-step's numerator) are a scatter-add: ``sums[label[i]] +=
x[i]``. numpy's ways of writing it are slow: ``np.add.at`` is 60x slower than a loop, a
``bincount`` per column 6-15x (measured on 65,536 rows, d = 39, k = 100: loop 0.9 ms,
``bincount`` 6 ms, ``add.at`` 59 ms). Two ways are fast, and give the same bits:

- scipy's loop behind a CSC matrix times a dense one (:func:`_sparse_sums`): the one-hot
  matrix of the labels, column ``i`` holding a one at row ``label[i]``, times the rows in
  float64, converted a chunk at a time: 1.7 ms on 65,536 rows, d = 39, k = 100, and 35 ms
  at d = 768, k = 500;
- the loop compiled with numba (installed with librosa), written by hand for the last
  factor of 2.3-2.6 (0.66 and 15 ms): loading it costs a process about half a second of CPU
  (numba's import, then its cache), so it is loaded only by a process whose parts hold
  enough values for the passes to pay that back (:data:`COMPILE_FOR`).

Every sum is float64 and adds the rows in row order per cluster, whichever way it runs (no
``fastmath``: LLVM may not reorder the additions; scipy adds column after column into the
same output), so the result is a function of the block alone: the determinism contract of
:mod:`units.kmeans.tree_sum` holds on top of it.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import scipy.sparse

try:  # scipy's compiled loop under CSC @ dense: private, so a public path stands behind it.
    from scipy.sparse._sparsetools import csc_matvecs as _csc_matvecs
except ImportError:  # pragma: no cover - present in every scipy this project supports.
    _csc_matvecs = None

log = logging.getLogger(__name__)

#: Values (rows x dimensions) that a process's parts hold before it loads the compiled loop.
#: Loading costs about 0.5 s of CPU (numba's import 0.2 s, its cache 0.3 s, on the 2-core
#: EPYC); the sparse product costs about 0.4 ns more per value and pass (at d = 39 and at
#: 768), so the loop pays from 2^25 values on over 40 passes, from 50M over 25: 1M x 39 on
#: two workers (19.5M values each) sums sparse, 200k x 768 on two (77M each) compiled.
COMPILE_FOR = 1 << 25

_compiled = None  # The numba kernel once compiled, False where numba is missing.
_compiling: threading.Thread | None = None
_held = 0  # Values that this process's parts have held, added up over its life (warm_up).
_lock = threading.Lock()


def _compile() -> None:
    global _compiled
    try:
        import numba
    except ImportError:  # pragma: no cover - numba comes with librosa.
        log.info("numba is missing: k-means sums use the sparse product (slower)")
        _compiled = False
        return
    kernel = numba.njit(cache=True, nogil=True)(_scatter_add)
    # The first call loads the machine code from numba's cache (or compiles it).
    kernel(
        np.zeros((1, 1), np.float32), np.zeros(1, np.int64), np.zeros((1, 1)), np.zeros(1, np.int64)
    )
    _compiled = kernel


def warm_up(values: int = COMPILE_FOR) -> None:
    """Notes that a part of this process holds ``values`` values (rows x dimensions); once
    its parts have held :data:`COMPILE_FOR` or more, added up over the life of the process
    (one large fit, or many small ones in one interpreter), starts making the compiled loop
    ready on a thread of its own, and returns.

    A process's first compiled call costs about half a second (importing numba, loading the
    machine code from its cache): a k-means part calls this when it is created, so that
    cost overlaps the loading of its rows and the seeding, whose small sums take the sparse
    product meanwhile (:func:`cluster_sums` waits for the compiler only on large blocks;
    both ways give the same bits). Without an argument, it starts the compiler.
    """
    global _compiling, _held
    with _lock:
        _held += values
        if _held >= COMPILE_FOR and _compiled is None and _compiling is None:
            _compiling = threading.Thread(target=_compile, name="numba-warm-up", daemon=True)
            _compiling.start()


def _kernel(wait: bool = True):
    """The compiled kernel; False where numba is missing; None where no warm-up started (the
    process holds too little for it to pay), or while the warm-up thread is still compiling
    and ``wait`` is False."""
    with _lock:
        thread = _compiling
    if thread is None:
        return _compiled
    if not wait and thread.is_alive():
        return None
    thread.join()
    return _compiled


def _scatter_add(x, labels, sums, counts):  # pragma: no cover - runs compiled.
    n, d = x.shape
    for i in range(n):
        c = labels[i]
        counts[c] += 1
        for j in range(d):
            sums[c, j] += x[i, j]


#: Values (rows x dimensions) above which :func:`cluster_sums` waits for the compiled kernel.
_WAIT_ABOVE = 1 << 18


def cluster_sums(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster float64 sums (k, d), in row order within each cluster, and counts (k,).

    Args:
        x: (n, d) rows, float32 (or float64).
        labels: (n,) cluster of each row, in ``[0, k)``.
        k: Clusters.
    """
    # Rows that a sparse product sums in well under a millisecond do not wait for the
    # compiler; anything larger does, once a warm-up has started.
    kernel = _kernel(wait=len(x) * x.shape[1] > _WAIT_ABOVE)
    if not kernel:
        return _sparse_sums(x, labels, k)
    sums = np.zeros((k, x.shape[1]), np.float64)
    counts = np.zeros(k, np.int64)
    if len(x):
        kernel(np.ascontiguousarray(x), np.ascontiguousarray(labels, np.int64), sums, counts)
    return sums, counts


#: Bytes of rows converted to float64 at a time by :func:`_sparse_sums`: at d = 768 a chunk of
#: 4 MiB (682 rows) took 35 ms a block against 54 ms for 4,096 rows; at d = 39 any size did.
_CHUNK_BYTES = 1 << 22


def _sparse_sums(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The same sums as the one-hot CSC matrix of ``labels`` times the rows: scipy adds row
    ``i`` into its cluster's sums for ``i`` in order, into one output, a chunk of rows at a
    time."""
    n, d = x.shape
    labels = np.ascontiguousarray(labels, np.int64)
    counts = np.bincount(labels, minlength=k).astype(np.int64)
    if _csc_matvecs is None:  # scipy's public product: the same loop on all rows at once.
        onehot = scipy.sparse.csc_matrix((np.ones(n), labels, np.arange(n + 1)), shape=(k, n))
        return np.asarray(onehot @ x.astype(np.float64)), counts
    sums = np.zeros((k, d), np.float64)
    chunk = max(1, min(n, _CHUNK_BYTES // (8 * max(d, 1))))
    rows = np.empty((chunk, d), np.float64)
    ones, columns = np.ones(chunk), np.arange(chunk + 1, dtype=np.int64)
    out = sums.ravel()  # A view: scipy adds into it.
    for lo in range(0, n, chunk):
        m = min(chunk, n - lo)
        rows[:m] = x[lo : lo + m]
        # Column j of the one-hot matrix adds row j into sums[labels[j]] (y += 1.0 * x: exact).
        _csc_matvecs(
            k, m, d, columns[: m + 1], labels[lo : lo + m], ones[:m], rows[:m].ravel(), out
        )
    return sums, counts
