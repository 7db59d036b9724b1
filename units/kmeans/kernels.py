"""Compiled loops for the k-means parts, where numpy has no single fast call.

Per-cluster sums of the rows (the M-step's numerator) are a scatter-add: ``sums[label[i]] +=
x[i]``. numpy's ways of writing it are slow: ``np.add.at`` is 60x slower than a loop, a
one-hot sparse product (scipy) or a ``bincount`` per column 6-15x (measured on 65,536 rows,
d = 39, k = 100: loop 0.9 ms, sparse 14 ms, ``bincount`` 6 ms, ``add.at`` 59 ms; d = 768,
k = 500: 14 ms against 112 ms sparse). So the loop is compiled with numba (installed with
librosa), written by hand for that speed; without numba, the sparse product gives the same
bits more slowly.

Every sum is float64 and adds the rows in row order per cluster, whichever way it runs (no
``fastmath``: LLVM may not reorder the additions), so the result is a function of the block
alone: the determinism contract of :mod:`units.kmeans.tree_sum` holds on top of it.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import scipy.sparse

log = logging.getLogger(__name__)

_compiled = None  # The numba kernel once compiled, False where numba is missing.
_compiling: threading.Thread | None = None
_lock = threading.Lock()


def _compile() -> None:
    global _compiled
    try:
        import numba
    except ImportError:  # pragma: no cover - numba comes with librosa.
        log.info("numba is missing: k-means sums use a sparse product (slower)")
        _compiled = False
        return
    kernel = numba.njit(cache=True, nogil=True)(_scatter_add)
    # The first call loads the machine code from numba's cache (or compiles it).
    kernel(
        np.zeros((1, 1), np.float32), np.zeros(1, np.int64), np.zeros((1, 1)), np.zeros(1, np.int64)
    )
    _compiled = kernel


def warm_up() -> None:
    """Starts making the compiled kernel ready on a thread of its own, and returns.

    A process's first compiled call costs about a second (importing numba, loading the
    machine code from its cache): a k-means part calls this when it is created, so that
    cost overlaps the loading of its rows and the seeding, whose small sums take the sparse
    product meanwhile (:func:`cluster_sums` never waits for the compiler; both ways give
    the same bits).
    """
    global _compiling
    with _lock:
        if _compiled is None and _compiling is None:
            _compiling = threading.Thread(target=_compile, name="numba-warm-up", daemon=True)
            _compiling.start()


def _kernel(wait: bool = True):
    """The compiled kernel, False where numba is missing, or None while a warm-up thread
    is still compiling and ``wait`` is False."""
    with _lock:
        thread = _compiling
    if thread is not None:
        if not wait and thread.is_alive():
            return None
        thread.join()
    elif _compiled is None:
        _compile()
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
    # compiler; anything larger does.
    kernel = _kernel(wait=len(x) * x.shape[1] > _WAIT_ABOVE)
    if not kernel:
        return _sparse_sums(x, labels, k)
    sums = np.zeros((k, x.shape[1]), np.float64)
    counts = np.zeros(k, np.int64)
    if len(x):
        kernel(np.ascontiguousarray(x), np.ascontiguousarray(labels, np.int64), sums, counts)
    return sums, counts


def _sparse_sums(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The same sums as a one-hot sparse matrix times the rows (csr: row order per cluster)."""
    n = len(x)
    onehot = scipy.sparse.csr_matrix((np.ones(n), (labels, np.arange(n))), shape=(k, n))
    sums = np.asarray(onehot @ x.astype(np.float64))
    return sums, np.bincount(labels, minlength=k).astype(np.int64)
