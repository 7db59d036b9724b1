"""k-means with scikit-learn's shape, on an array or on data spread over workers.

The loop talks to *parts* (:mod:`units.kmeans.parts`): in-process for an array, Ray actors
for a feature store or an array that the caller spread over a cluster
(:func:`units.kmeans.transport.distribute`; the estimator imports no Ray code). Each
iteration, every part assigns its rows to the nearest centroid and returns float64
per-cluster sums, counts and inertia per block; the driver sums them in a fixed tree order
(:mod:`units.kmeans.tree_sum`), so the centroids are bit-identical for any number of workers.

- Initialisation: ``k-means||`` (Bahmani et al. 2012: a few rounds that each sample about
  ``oversampling * k`` rows in proportion to their cost, then greedy weighted k-means++ on
  the candidates; drawn from the refinement sample when there is one), ``k-means++`` on a
  seeded sample, ``random`` rows, or an array; then Lloyd iterations on a seeded sample of
  the rows, a head start before the full passes.
- Empty clusters are re-seeded by splitting the largest cluster, as faiss does.
- Split-merge (after a seeded init): Lloyd never moves a centroid across the data, so it
  keeps two centroids in one dense region and one for two regions elsewhere. When it has
  nearly converged, the centroids whose removal costs least move to split the clusters
  that hold the most inertia (:func:`split_merge`), and Lloyd passes run on from there: a
  trial, kept only if it ends below the inertia it started from (its passes are not
  iterations). A trial runs on the refinement sample where there is one (a few percent of
  the rows), on all rows otherwise. On all rows the inertia of the iterations never rises;
  a trial kept on the sample may leave one iteration that rises, which Lloyd then goes on
  from (a rise is never taken for convergence).
  On 200k x 768, k = 500, two rounds took the inertia from 969 to 949 per point, below
  MiniBatchKMeans's best of 20.
- ``algorithm="minibatch"``: Sculley's mini-batch updates (per-centroid learning rate
  ``1 / count``), each batch a seeded Bernoulli sample of rows streamed from the parts.
- A checkpoint after every iteration: a killed fit resumes and ends with the centroids an
  uninterrupted one would have.

Example:
    >>> rng = np.random.default_rng(0)
    >>> x = np.concatenate([rng.normal(m, 0.1, (100, 2)) for m in (0, 5)]).astype(np.float32)
    >>> km = KMeans(2, seed=0).fit(x)
    >>> sorted(int(round(v)) for v in km.cluster_centers_[:, 0])
    [0, 5]
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable

import numpy as np

from shards.core import storage
from units.kmeans import parts as kmeans_parts
from units.kmeans.parts import DataError, LocalParts, Part

log = logging.getLogger(__name__)

INITS = ("k-means||", "k-means++", "random")
ALGORITHMS = ("lloyd", "minibatch")
_SPLIT_EPS = 1.0 / 1024.0  # faiss's EPS for splitting a cluster.
#: Lloyd on all rows before a split-merge step stops at this many times ``tol``.
_SWAP_TOL_FACTOR = 10.0
#: A pass prices a split-merge step when the last change was below this many times the
#: change at which the step is taken: Lloyd's changes fall several-fold per pass near the
#: end, so the step's pass is nearly always priced and the passes before it are not.
_PRICE_AHEAD = 10.0
#: The default refinement: ``(rows per centroid, largest share of the rows, iterations at
#: most)``, the first whose sample is at most that share of the rows; none when neither is.
#: A trial judged on the sample sees the inertia with a sampling error of about
#: ``1 / rows per centroid`` (0.3-0.4% at 256 on the 1M x 39 bench data), as large as the
#: gains of the split-merge steps it decides, and the full passes after a kept trial first
#: pay back the error that the sample's Lloyd steps put into every centroid. 512 rows and 40
#: iterations took a quarter fewer Lloyd iterations (full passes) than 256 and 20, at the
#: same inertia or lower, measured in process:
#:
#: - 1M x 39 bench data, k = 100 (a 5% sample), seeds 0-15: 8.3 iterations against 11.2,
#:   7% less time, 47.094 per point against 47.146;
#: - 52 minutes of LibriSpeech MFCC (313,634 frames), k = 100 (16%), seeds 0-17: 19.4
#:   against 26.9, 10% less time, 1495.31 against 1495.43;
#: - the same at k = 200 (33%), seeds 0-8: 20.0 against 27.6, 1340.50 against 1340.68,
#:   but 6% more time (each sample pass costs a third of a full one there): hence a
#:   quarter of the rows at most.
#:
#: 256 is faiss's default training size.
REFINEMENTS = ((512, 0.25, 40), (256, 0.5, 20))
#: Full passes of one split-merge trial after mini-batch steps, at most.
_TRIAL_PASSES = 20


class CheckpointMismatchError(ValueError):
    """A checkpoint exists but was written by a fit with another config or other data."""


#: Most clusters a fit may have: units are stored as uint16 (``units.labels.model``).
MAX_CLUSTERS = 65_536


@dataclasses.dataclass
class IterationStats:
    """One row of ``iterations_`` (and of ``iterations.parquet``).

    Lloyd: iteration ``i`` is a full pass over the rows with the centroids after ``i``
    updates, so iteration 0 is the initial centroids and the last, ``n_iter_``, the final
    ones: ``n_iter_ + 1`` rows. Its inertia, balance and empty clusters are those
    centroids'; ``seconds`` the pass and the update that follows it (none after the last).

    Mini-batch: iteration ``i`` (1 to ``n_iter_``) is the ``i``-th step: the inertia of its
    batch at the centroids it started from, and the update it made. ``relative_change``
    holds the smoothed batch inertia per row, which decides when to stop.
    """

    iteration: int
    inertia: float
    relative_change: float
    seconds: float
    worker_seconds: float
    empty_clusters: int
    imbalance: float


class KMeans:
    """k-means clustering.

    Args:
        n_clusters: k.
        init: ``"k-means||"``, ``"k-means++"``, ``"random"`` or a (k, d) array.
        max_iter: Lloyd iterations at most (mini-batch: passes over the data at most).
        tol: Stop when the inertia changes by less than this fraction (a pass whose
            inertia rose by more goes on).
        seed: Everything random derives from it.
        algorithm: ``"lloyd"`` (all rows each iteration) or ``"minibatch"``.
        batch_size: Rows per mini-batch (mini-batch only, on average).
        max_no_improvement: Mini-batch stops after this many batches without an improvement
            of the smoothed batch inertia.
        init_rounds: k-means|| rounds (Spark MLlib's default, 2, is plenty in practice).
        oversampling: k-means|| rows sampled per round, as a multiple of k.
        init_sample: Rows of the seeded sample that k-means++ runs on (default
            ``max(10000, 20 k)``; its cost grows with ``k^2 * sample``).
        refine_sample: After seeding (k-means|| or k-means++), Lloyd iterations run on a
            seeded sample of this many rows per centroid first, which costs a fraction of a
            full pass; skipped when the sample would be over half the data. Default: 512
            rows per centroid where that is at most a quarter of the rows, else 256
            (faiss's default training size) where that is at most half
            (:data:`REFINEMENTS`).
        refine_iter: Iterations on that sample at most (0: none). Default: 40 on a sample
            of 512 rows per centroid, 20 on one of 256.
        swap_rounds: Split-merge rounds after a seeded init (k-means|| or k-means++): when
            Lloyd has converged to ``10 * tol``, the centroids whose removal costs least
            move onto the clusters that hold the most inertia, splitting them
            (:func:`split_merge`); Lloyd passes run on from there, and the step is undone
            unless the inertia fell. After the last round Lloyd converges to ``tol``.
            Mini-batch: the rounds follow its steps, as full Lloyd passes. 0: none.
        swap_fraction: Centroids moved per round, as a fraction of k (at least one).
        parts: Parts to cut an array into when fitting in process, each computed on a thread
            of its own with one BLAS thread (as a Ray worker); default one per CPU of this
            process. The result is the same for any number.
        block_rows: Rows per block; blocks fix the order of every sum.
        random_state: scikit-learn's name for ``seed``: when given, it is the seed. An int
            only (a ``RandomState`` has no value a checkpoint could record).

    It follows scikit-learn's estimator contract where it can: ``get_params`` /
    ``set_params`` (so ``sklearn.base.clone`` and grid searches work), ``random_state``,
    ``fit`` / ``predict`` / ``fit_predict`` / ``transform`` / ``score``, and ``labels_`` after
    a fit on an in-memory array. It differs in that a fit may take Ray parts instead of an
    array (then there is no ``labels_``: the rows never come to this process), and ``init``
    is k-means|| by default.

    Attributes:
        cluster_centers_: (k, d) float32.
        inertia_: Sum of squared distances of all rows to their centroid (float64).
        n_iter_: Iterations run: centroid updates (Lloyd) or mini-batch steps.
        iterations_: One :class:`IterationStats` per iteration; Lloyd's starts with
            iteration 0, the initial centroids (``n_iter_ + 1`` rows).
        counts_: Rows per cluster at the final centroids.
        labels_: Each row's cluster, after a fit on an in-memory array.
    """

    def __init__(
        self,
        n_clusters: int,
        *,
        init="k-means||",
        max_iter: int = 100,
        tol: float = 1e-4,
        seed: int = 0,
        algorithm: str = "lloyd",
        batch_size: int = 10_000,
        max_no_improvement: int = 10,
        init_rounds: int = 2,
        oversampling: float = 2.0,
        init_sample: int | None = None,
        refine_sample: int | None = None,
        refine_iter: int | None = None,
        swap_rounds: int = 2,
        swap_fraction: float = 0.05,
        parts: int | None = None,
        block_rows: int = kmeans_parts.DEFAULT_BLOCK_ROWS,
        random_state: int | None = None,
    ):
        self.n_clusters = n_clusters
        self.init = init
        self.max_iter = max_iter
        self.tol = tol
        self.seed = seed
        self.algorithm = algorithm
        self.batch_size = batch_size
        self.max_no_improvement = max_no_improvement
        self.init_rounds = init_rounds
        self.oversampling = oversampling
        self.init_sample = init_sample
        self.refine_sample = refine_sample
        self.refine_iter = refine_iter
        self.swap_rounds = swap_rounds
        self.swap_fraction = swap_fraction
        self.parts = parts
        self.block_rows = block_rows
        if random_state is not None:
            self.seed = random_state

    # ------------------------------------------------------------------ scikit-learn
    @property
    def random_state(self) -> int:
        """``seed``, under scikit-learn's name."""
        return self.seed

    @random_state.setter
    def random_state(self, value: int) -> None:
        self.seed = value

    @classmethod
    def _param_names(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    def get_params(self, deep: bool = True) -> dict:
        """The constructor's arguments as set now (scikit-learn's contract)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params) -> KMeans:
        """Sets constructor arguments by name; returns ``self``.

        Raises:
            ValueError: A name the constructor does not take.
        """
        names = self._param_names()
        for name, value in params.items():
            if name not in names:
                raise ValueError(f"invalid parameter {name!r} for KMeans; valid: {names}")
            setattr(self, name, value)
        return self

    # ------------------------------------------------------------------ config
    def config(self) -> dict:
        """Everything that decides the result (a checkpoint must match it)."""
        init = self.init
        if not isinstance(init, str):
            init = "array:" + hashlib.sha256(np.ascontiguousarray(init).tobytes()).hexdigest()
        return {
            "n_clusters": self.n_clusters,
            "init": init,
            "max_iter": self.max_iter,
            "tol": self.tol,
            "seed": self.seed,
            "algorithm": self.algorithm,
            "batch_size": self.batch_size,
            "max_no_improvement": self.max_no_improvement,
            "init_rounds": self.init_rounds,
            "oversampling": self.oversampling,
            "init_sample": self.init_sample,
            "refine_sample": self.refine_sample,
            "refine_iter": self.refine_iter,
            "swap_rounds": self.swap_rounds,
            "swap_fraction": self.swap_fraction,
        }

    def check_params(self) -> None:
        """Checks the arguments alone (no data needed): a driver calls it before any work.

        Raises:
            ValueError: Naming the argument and its value, e.g. ``n_clusters=70000 must be
                at most 65536``.
        """
        k = self.n_clusters
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"n_clusters={k!r} must be a positive integer")
        if k > MAX_CLUSTERS:
            raise ValueError(
                f"n_clusters={k} must be at most {MAX_CLUSTERS}: units are stored as uint16"
            )
        if isinstance(self.init, str) and self.init not in INITS:
            raise ValueError(f"init={self.init!r} must be one of {INITS} or a (k, d) array")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm={self.algorithm!r} must be one of {ALGORITHMS}")
        if self.max_iter < 1:
            raise ValueError(f"max_iter={self.max_iter} must be >= 1")
        if not self.tol >= 0:
            raise ValueError(f"tol={self.tol} must be >= 0")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if isinstance(self.swap_rounds, bool) or self.swap_rounds < 0:
            raise ValueError(f"swap_rounds={self.swap_rounds} must be >= 0")
        if self.refine_sample is not None and (
            isinstance(self.refine_sample, bool) or self.refine_sample < 1
        ):
            raise ValueError(f"refine_sample={self.refine_sample} must be None or >= 1")
        if self.refine_iter is not None and (
            isinstance(self.refine_iter, bool) or self.refine_iter < 0
        ):
            raise ValueError(f"refine_iter={self.refine_iter} must be None or >= 0")
        if not 0 < self.swap_fraction <= 0.5:
            raise ValueError(f"swap_fraction={self.swap_fraction} must be in (0, 0.5]")

    def max_steps(self, rows: int) -> int:
        """The most iterations (mini-batch: steps) a fit on ``rows`` rows runs: the total of
        its progress bar."""
        if self.algorithm == "minibatch":
            return self.max_iter * max(1, math.ceil(rows / self.batch_size))
        return self.max_iter

    def _validate(self, parts) -> None:
        k = self.n_clusters
        self.check_params()
        if parts.rows < k:
            raise DataError(f"n_samples={parts.rows} should be >= n_clusters={k}")
        if not isinstance(self.init, str):
            shape = np.shape(self.init)
            if shape != (k, parts.dim):
                raise DataError(
                    f"init array has shape {shape}, expected (n_clusters={k}, dim={parts.dim})"
                )

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        data,
        *,
        checkpoint: str | None = None,
        check: bool = True,
        callback: Callable[[dict], None] | None = None,
    ) -> KMeans:
        """Fits the centroids.

        Args:
            data: A (n, d) array (fitted in this process), or parts such as
                :func:`units.kmeans.transport.distribute` returns for a feature store or an
                array spread over Ray workers.
            checkpoint: A directory: the state is saved there after every iteration, and a
                fit that finds a state there resumes from it.
            check: Scan the data for NaN/Inf first (it also loads held parts).
            callback: Called with each iteration's stats (a dict with the fields of
                :attr:`iterations_`) when it ends; a driver shows progress with it.

        Raises:
            DataError: Empty data, fewer rows than clusters, NaN/Inf (named), a bad init.
            CheckpointMismatchError: ``checkpoint`` holds another fit's state.
        """
        parts, owned = self._as_parts(data)
        try:
            self._fit(parts, checkpoint, check, callback)
        finally:
            if owned is not None:
                owned.shutdown()
        if isinstance(data, np.ndarray):  # In memory: scikit-learn's labels_, one more pass.
            self.labels_ = self.predict(data)
        return self

    def _fit(self, parts, checkpoint: str | None, check: bool, callback=None) -> KMeans:
        self._validate(parts)
        if check:
            check_finite(parts)
        state = self._resume(parts, checkpoint)
        if state is None:
            started = time.perf_counter()
            centroids = self._initial(parts)
            state = {"iteration": 0, "centroids": centroids, "history": [], "counts": None}
            state["swaps_left"] = self._swaps(parts)
            state["init_seconds"] = time.perf_counter() - started
            self._save(parts, checkpoint, state)
        if state.get("done"):
            log.info("k-means checkpoint is complete: nothing to do")
        elif self.algorithm == "lloyd":
            self._lloyd(parts, state, checkpoint, callback or _ignore)
        else:
            self._minibatch(parts, state, checkpoint, callback or _ignore)
        self.cluster_centers_ = state["centroids"]
        self.inertia_ = state["inertia"]
        self.counts_ = state["counts"]
        self.n_iter_ = state["iteration"]
        self.iterations_ = [IterationStats(**h) for h in state["history"]]
        self.init_seconds_ = state.get("init_seconds", 0.0)
        return self

    def _as_parts(self, data):
        """Parts for ``data``, and those this fit created and must shut down.

        The estimator never distributes data itself (it would have to import the Ray
        transport; it imports no Ray code, so it runs wherever numpy does): a caller spreads
        a store or an array over a cluster with :func:`units.kmeans.transport.distribute`
        and passes the parts.
        """
        if isinstance(data, np.ndarray):
            count = self.parts or kmeans_parts.cores()
            return LocalParts.from_array(data, parts=count, block_rows=self.block_rows), None
        if hasattr(data, "map") and hasattr(data, "blocks"):
            return data, None
        raise TypeError(
            f"cannot fit on {type(data).__name__}: pass an array, or parts such as "
            "units.kmeans.transport.distribute(store) returns"
        )

    # ------------------------------------------------------------------ init
    def _initial(self, parts) -> np.ndarray:
        k = self.n_clusters
        if not isinstance(self.init, str):
            return np.array(self.init, dtype=np.float32)
        rng = np.random.default_rng([self.seed, 0])
        if self.init == "random":
            picks = np.sort(rng.choice(parts.rows, size=k, replace=False))
            return gather_rows(parts, picks)
        if self.init == "k-means++":
            m = min(parts.rows, self.init_sample or max(10_000, 20 * k))
            picks = np.sort(rng.choice(parts.rows, size=m, replace=False))
            sample = gather_rows(parts, picks)
            return self._refine(parts, kmeans_plusplus(sample, k, rng))
        return self._refine(parts, self._kmeans_parallel(parts, rng))

    def _seeded(self) -> bool:
        """Split-merge follows a seeded init only: an array or random init asks for Lloyd
        (or mini-batch steps) from there and nothing else."""
        return isinstance(self.init, str) and self.init != "random"

    def _swaps(self, parts) -> int:
        """Split-merge rounds left for the Lloyd passes."""
        return self.swap_rounds if self._seeded() and self.algorithm == "lloyd" else 0

    def _refinement(self, parts) -> tuple[tuple[list[int], float], int] | None:
        """The refinement sample as :meth:`Part.sample_stats` draws it, ``(key, rate)``, and
        the Lloyd iterations on it at most; None when there is none (too large a share of
        the rows, or ``refine_iter=0``)."""
        choices = REFINEMENTS
        if self.refine_sample:  # Its own size, up to half the rows, iterations as on 256.
            choices = ((self.refine_sample, 0.5, REFINEMENTS[-1][2]),)
        for per_centroid, share, iterations in choices:
            rate = per_centroid * self.n_clusters / parts.rows
            if rate <= share:
                iterations = iterations if self.refine_iter is None else self.refine_iter
                return (([self.seed, 3], rate), iterations) if iterations > 0 else None
        return None

    def _refine_sample(self, parts) -> tuple[list[int], float] | None:
        """The refinement sample, ``(key, rate)``: the seeding, the refinement and the
        split-merge trials all run on these rows. None when there is none."""
        refinement = self._refinement(parts)
        return None if refinement is None else refinement[0]

    def _refine(self, parts, centroids: np.ndarray) -> np.ndarray:
        """Lloyd iterations on one seeded sample of ``refine_sample`` rows per centroid
        before any pass over all rows: a head start. Skipped when the sample would be most
        of the data."""
        refinement = self._refinement(parts)
        if refinement is None:
            return centroids
        sample, iterations = refinement
        previous = math.inf
        for _ in range(iterations):
            sums, counts, inertia = kmeans_parts.reduce(
                parts, parts.map(Part.sample_stats, centroids, *sample)
            )
            if inertia > 0 and (previous - inertia) / inertia < self.tol:
                break
            previous = inertia
            centroids, _ = update(centroids, sums, counts)
        return centroids

    def _moves(self) -> int:
        """Centroids one split-merge round moves."""
        return max(1, int(self.swap_fraction * self.n_clusters))

    def _kmeans_parallel(self, parts, rng: np.random.Generator) -> np.ndarray:
        """k-means|| candidates, weighted by the rows nearest to each, then greedy k-means++
        on them. When a refinement sample follows, the candidates come from that sample's
        rows (``refine_sample`` rows per centroid: plenty for the seeding, and the passes
        over it cost a fraction of one over all rows)."""
        k = self.n_clusters
        first = int(rng.integers(parts.rows))
        candidates = [gather_rows(parts, np.array([first]))]
        sample = self._refine_sample(parts)
        cost = kmeans_parts.reduce(parts, parts.map(Part.seed_update, candidates[0], 0, sample))
        n_candidates = 1
        for round_ in range(self.init_rounds):
            if cost <= 0:
                break  # Every row is a candidate already.
            sampled = parts.map(Part.seed_sample, self.seed, round_, self.oversampling * k, cost)
            new = np.concatenate([rows for _, rows in sampled])
            if len(new) == 0:
                continue
            candidates.append(new)
            cost = kmeans_parts.reduce(
                parts, parts.map(Part.seed_update, new, n_candidates, sample)
            )
            n_candidates += len(new)
        weights = kmeans_parts.reduce(parts, parts.map(Part.seed_weights, n_candidates))
        points = np.concatenate(candidates)
        log.info("k-means||: %d candidates for k=%d", len(points), k)
        # No weighted Lloyd steps on the candidates (Spark runs some): with few candidates per
        # cluster it pulled the seeds into worse minima (999 vs 972 per point at 768 dims).
        return kmeans_plusplus(points, k, rng, weights=weights.astype(np.float64))

    # ------------------------------------------------------------------ Lloyd
    def _lloyd(self, parts, state: dict, checkpoint: str | None, callback) -> None:
        history = state["history"]
        while True:
            started = time.perf_counter()
            trial = state.get("trial")
            if trial is not None:
                kept = self._trial_pass(parts, state, trial, started, checkpoint, callback)
                if kept is None:
                    continue  # The trial goes on, ended on the sample, or was undone.
                # Kept: its last pass is this iteration's, at the centroids it ended with.
                reduced, worker_seconds = kept
            else:
                results = parts.map(Part.stats, state["centroids"], self._price_swaps(state))
                reduced = kmeans_parts.reduce(parts, [nodes for nodes, _ in results])
                worker_seconds = max(s for _, s in results)
            sums, counts, inertia = reduced[:3]
            previous = history[-1]["inertia"] if history else math.inf
            change = (previous - inertia) / inertia if inertia > 0 else 0.0
            swapping = state.get("swaps_left", 0) > 0
            # Before a split-merge step Lloyd stops earlier: the step moves centroids far.
            # A rise is no convergence: after a trial kept on the sample, the first pass over
            # all rows may rise (Lloyd then goes on from the moved centroids).
            limit = self.tol * (_SWAP_TOL_FACTOR if swapping else 1)
            converged = bool(history) and abs(change) < limit
            at_max = state["iteration"] >= self.max_iter
            stats = {
                "iteration": state["iteration"],
                "inertia": inertia,
                "relative_change": change if history else math.nan,
                "worker_seconds": worker_seconds,
                "imbalance": imbalance(counts),
                "empty_clusters": 0,
            }
            # A pass that converged without pricing the step leaves it to the next pass.
            step = swapping and (converged or state.get("price_next", False)) and not at_max
            if step and len(reduced) < 5:
                state["price_next"], converged = True, False
            elif step:
                state.pop("price_next", None)
                moved, empty, count = split_merge(
                    state["centroids"], sums, counts, reduced[3], reduced[4], self._moves()
                )
                state["swaps_left"] -= 1
                if count:
                    # A trial: its passes are not iterations (the inertia rises at first);
                    # kept only if it ends below this inertia, else Lloyd goes on from here.
                    log.info("k-means split-merge: %d centroids moved", count)
                    stats.update(empty_clusters=empty, seconds=time.perf_counter() - started)
                    state["trial"] = self._trial(parts, state["centroids"], inertia)
                    state["trial_centroids"] = moved
                    state["trial_update"] = update(state["centroids"], sums, counts)[0]
                    state["trial_stats"] = stats
                    self._save(parts, checkpoint, state)
                    continue
                state["swaps_left"] = 0
                converged = False  # Converge to tol now.
            if converged or at_max:
                state.update(inertia=inertia, counts=counts, swaps_left=0)
                stats.update(
                    empty_clusters=int((counts == 0).sum()),
                    seconds=time.perf_counter() - started,
                )
                history.append(stats)
                state["done"] = True
                _log_iteration(stats)
                self._save(parts, checkpoint, state)
                callback(stats)
                log.info(
                    "k-means %s after %d iterations: inertia %.6g",
                    "converged" if converged else "stopped at max_iter",
                    state["iteration"],
                    inertia,
                )
                return
            centroids, empty = update(state["centroids"], sums, counts)
            self._next(parts, state, stats, centroids, empty, started, checkpoint)
            callback(stats)

    def _price_swaps(self, state: dict) -> bool:
        """Whether the next Lloyd pass also prices a split-merge step (each row's second
        nearest centroid, which costs about half a pass more): once the last change was
        within :data:`_PRICE_AHEAD` times of the point where the step is taken, or after
        a pass that converged without the prices."""
        if state.get("swaps_left", 0) <= 0:
            return False
        if state.get("price_next", False):
            return True
        last = state["history"][-1]["relative_change"] if state["history"] else math.nan
        # By its size, as in _lloyd: a large rise (after a trial kept on the sample) is far
        # from the step, where its sign alone priced the next pass.
        return bool(abs(last) < _PRICE_AHEAD * self.tol * _SWAP_TOL_FACTOR)  # False for NaN.

    def _trial(self, parts, centroids: np.ndarray, inertia: float) -> dict:
        """A split-merge trial's start: where its passes run and the inertia to beat.

        With a refinement sample (:meth:`_refine_sample`), the trial's Lloyd passes run on
        that sample, a few percent of the rows, against the sample's inertia at the
        centroids before the step: the moved centroids settle for a fraction of a full
        pass each, and full passes go on from where they end if the step is kept. Without
        one (the sample would be most of the rows), the passes run on all rows.
        """
        trial = {"before": inertia, "previous": math.inf, "passes": 0, "sample": None}
        sample = self._refine_sample(parts)
        if sample is not None:
            before = kmeans_parts.reduce(parts, parts.map(Part.sample_stats, centroids, *sample))
            trial.update(before=before[2], sample=sample)
        return trial

    def _trial_pass(self, parts, state, trial, started, checkpoint, callback):
        """One Lloyd pass of a split-merge trial. Returns its stats and slowest part's seconds
        when the trial ends kept after a pass over all rows (the pass is then the next
        iteration's), else None."""
        # No pricing: a trial's passes decide no step (one that converges after a kept
        # trial leaves it to the next pass).
        sample = trial.get("sample")
        if sample is None:
            results = parts.map(Part.stats, state["trial_centroids"], False)
            reduced = kmeans_parts.reduce(parts, [nodes for nodes, _ in results])
        else:
            mapped = parts.map(Part.sample_stats, state["trial_centroids"], *sample)
            reduced = kmeans_parts.reduce(parts, mapped)
        sums, counts, inertia = reduced[:3]
        trial["passes"] += 1
        change = (trial["previous"] - inertia) / inertia if inertia > 0 else 0.0
        # The trial's passes count against max_iter too, as the iterations they stand for.
        ended = change < self.tol * _SWAP_TOL_FACTOR
        ended = ended or state["iteration"] + trial["passes"] >= self.max_iter
        stats = state["trial_stats"]
        pass_seconds = time.perf_counter() - started
        stats["seconds"] += pass_seconds
        if not ended:
            trial["previous"] = inertia
            state["trial_centroids"] = update(state["trial_centroids"], sums, counts)[0]
            self._save(parts, checkpoint, state)
            return None
        centroids, undo = state.pop("trial_centroids"), state.pop("trial_update")
        del state["trial"], state["trial_stats"]
        kept = inertia < trial["before"]
        if kept and sample is None:  # This pass is the next iteration's: counted there.
            stats["seconds"] -= pass_seconds
        elif kept:  # The sample's last Lloyd step; full passes go on from there.
            centroids = update(centroids, sums, counts)[0]
        log.info(
            "k-means split-merge %s after %d passes", "kept" if kept else "undone", trial["passes"]
        )
        if not kept:  # The iteration before the trial gets its plain Lloyd update.
            state["swaps_left"] = 0
            centroids = undo
        # The iteration before the trial ends with the centroids that follow it.
        state["history"].append(stats)
        state.update(centroids=centroids, iteration=state["iteration"] + 1)
        _log_iteration(stats)
        self._save(parts, checkpoint, state)
        callback(stats)
        return (reduced, max(s for _, s in results)) if kept and sample is None else None

    def _next(self, parts, state, stats, centroids, empty, started, checkpoint) -> None:
        """Ends a Lloyd iteration that updated the centroids: history, state, checkpoint."""
        stats.update(empty_clusters=empty, seconds=time.perf_counter() - started)
        state["history"].append(stats)
        state.update(centroids=centroids, iteration=state["iteration"] + 1)
        _log_iteration(stats)
        self._save(parts, checkpoint, state)

    # ------------------------------------------------------------------ mini-batch
    def _minibatch(self, parts, state: dict, checkpoint: str | None, callback) -> None:
        rate = min(1.0, self.batch_size / parts.rows)
        steps = self.max_steps(parts.rows)
        history = state["history"]
        totals = state.setdefault("totals", np.zeros(self.n_clusters, np.float64))
        alpha = min(1.0, 2.0 * rate)  # sklearn's smoothing of the batch inertia.
        while state["iteration"] < steps and state.get("stale", 0) < self.max_no_improvement:
            started = time.perf_counter()
            step = state["iteration"]
            sums, counts, inertia = kmeans_parts.reduce(
                parts, parts.map(Part.sample_stats, state["centroids"], [self.seed, 2, step], rate)
            )
            per_point = inertia / max(1, counts.sum())
            ewa = state.get("ewa")
            ewa = per_point if ewa is None else ewa * (1 - alpha) + per_point * alpha
            if ewa < state.get("best", math.inf) * (1 - self.tol):
                state.update(best=ewa, stale=0)
            else:
                state["stale"] = state.get("stale", 0) + 1
            c64 = state["centroids"].astype(np.float64)
            totals += counts
            hit = counts > 0
            c64[hit] += (sums[hit] - counts[hit, None] * c64[hit]) / totals[hit, None]
            history.append(
                {
                    "iteration": step + 1,
                    "inertia": inertia,
                    "relative_change": math.nan if ewa is None else ewa,
                    "seconds": time.perf_counter() - started,
                    "worker_seconds": math.nan,
                    "empty_clusters": int((~hit).sum()),
                    "imbalance": imbalance(counts),
                }
            )
            state.update(centroids=c64.astype(np.float32), iteration=step + 1, ewa=ewa)
            _log_iteration(history[-1])
            self._save(parts, checkpoint, state)
            callback(history[-1])
        centroids, counts, inertia = self._minibatch_swaps(parts, state["centroids"])
        state.update(centroids=centroids, inertia=inertia, counts=counts, done=True)
        self._save(parts, checkpoint, state)

    def _minibatch_swaps(self, parts, centroids: np.ndarray):
        """The split-merge rounds after mini-batch steps, each a trial of full Lloyd passes
        (to ``10 * tol``, at most :data:`_TRIAL_PASSES`) kept only if the inertia fell; then
        the centroids, counts and inertia of all rows. Deterministic: a killed fit redoes
        them from the last step's centroids to the same result."""
        rounds = self.swap_rounds if self._seeded() else 0

        def full(c: np.ndarray):
            results = parts.map(Part.stats, c, rounds > 0)
            return kmeans_parts.reduce(parts, [nodes for nodes, _ in results])

        reduced = full(centroids)
        for _ in range(rounds):
            trial, _, moved = split_merge(centroids, *reduced[:2], *reduced[3:], self._moves())
            if not moved:
                break
            previous = math.inf
            for _ in range(_TRIAL_PASSES):
                tried = full(trial)
                if (previous - tried[2]) / max(tried[2], 1e-300) < self.tol * _SWAP_TOL_FACTOR:
                    break
                previous = tried[2]
                trial = update(trial, *tried[:2])[0]
            if tried[2] >= reduced[2]:
                log.info("k-means split-merge after mini-batch undone")
                break
            centroids, reduced = trial, tried
        return centroids, reduced[1], reduced[2]

    # ------------------------------------------------------------------ checkpoints
    def _fingerprint(self, parts) -> str:
        return hashlib.sha256(
            json.dumps([self.config(), parts.fingerprint()], sort_keys=True).encode()
        ).hexdigest()

    def _save(self, parts, directory: str | None, state: dict) -> None:
        if directory is None:
            return
        from shards.core.atomic import write_atomic

        storage.makedirs(directory)
        arrays = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
        scalars = {k: v for k, v in state.items() if not isinstance(v, np.ndarray)}
        scalars["fingerprint"] = self._fingerprint(parts)
        buffer = io.BytesIO()
        np.savez(buffer, state=np.array(json.dumps(scalars)), **arrays)
        write_atomic(os.path.join(directory, "checkpoint.npz"), buffer.getvalue())

    def _resume(self, parts, directory: str | None) -> dict | None:
        if directory is None:
            return None
        path = os.path.join(directory, "checkpoint.npz")
        if not storage.exists(path):
            return None
        with storage.load_npy(path) as saved:
            state = json.loads(str(saved["state"]))
            state.update({k: saved[k] for k in saved.files if k != "state"})
        if state.pop("fingerprint") != self._fingerprint(parts):
            raise CheckpointMismatchError(
                f"{path} was written by a k-means with another config or other data; "
                "remove it or use another output"
            )
        log.info("resuming k-means from iteration %d", state["iteration"])
        return state

    # ------------------------------------------------------------------ use
    def _fitted(self) -> np.ndarray:
        if not hasattr(self, "cluster_centers_"):
            raise RuntimeError("this KMeans is not fitted yet: call fit() first")
        return self.cluster_centers_

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Index of the nearest centroid for each row of ``x``."""
        x = _as_rows(x, self._fitted().shape[1])
        return kmeans_parts.Assigner(self.cluster_centers_)(x, distances=False)[0]

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Euclidean distances (n, k) from each row to every centroid (as scikit-learn)."""
        c = self._fitted().astype(np.float64)
        x = _as_rows(x, c.shape[1]).astype(np.float64)
        d2 = (x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)
        return np.sqrt(np.maximum(d2, 0))

    def fit_predict(self, x: np.ndarray) -> np.ndarray:
        return self.fit(x).labels_

    def score(self, x: np.ndarray) -> float:
        """Minus the k-means objective on ``x`` (the sum of squared distances to the nearest
        centroid, in float64), as scikit-learn's ``score``: higher is better."""
        return -float(np.sum(np.min(self.transform(x), axis=1) ** 2))


def _ignore(stats: dict) -> None:
    """The callback of a fit that reports nothing."""


def _log_iteration(stats: dict) -> None:
    # DEBUG: one line per iteration would break a driver's progress bar at INFO; the bar
    # (the fit's callback) shows the iterations, and iterations.parquet keeps every one.
    log.debug(
        "k-means iteration %d: inertia %.6g (relative change %.2e), %d empty, %.2fs",
        stats["iteration"],
        stats["inertia"],
        stats["relative_change"],
        stats["empty_clusters"],
        stats["seconds"],
    )


def _as_rows(x, dim: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != dim:
        raise DataError(f"expected rows of dimension {dim}, got shape {x.shape}")
    return x


# ---------------------------------------------------------------------- pieces
def check_finite(parts) -> None:
    """Raises :class:`DataError` naming where the first NaN/Inf rows are."""
    reports = parts.map(Part.check)
    dims = {r["dim"] for r in reports}
    if len(dims) != 1:
        raise DataError(f"parts disagree on the dimension: {sorted(dims)}")
    bad_rows = sum(r["bad_rows"] for r in reports)
    if bad_rows:
        where = [w for r in reports for w in r["bad"]][:5]
        raise DataError(f"{bad_rows} row(s) hold NaN or Inf, first at: " + "; ".join(where))


def gather_rows(parts, indices: np.ndarray) -> np.ndarray:
    """The rows with these global indices (sorted), fetched from the parts that hold them."""
    return np.concatenate(parts.map(Part.rows, np.asarray(indices, np.int64)))


def imbalance(counts: np.ndarray) -> float:
    """faiss's imbalance factor: ``k * sum(n_i^2) / n^2`` (1 when perfectly balanced)."""
    n = counts.sum()
    return float(len(counts) * (counts.astype(np.float64) ** 2).sum() / n**2) if n else math.nan


def update(centroids: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, int]:
    """New centroids (float32) from the sums; empty clusters split the largest, as faiss.

    An empty cluster takes a copy of the currently largest cluster's centroid, and the two
    are pushed apart by a relative ``1/1024`` in alternating directions per dimension; the
    split cluster's count is halved for the next choice. Deterministic: ties go to the lower
    index.
    """
    counts = counts.astype(np.float64).copy()
    new = centroids.astype(np.float64).copy()
    full = counts > 0
    new[full] = sums[full] / counts[full, None]
    empty = np.flatnonzero(~full)
    sign = np.where(np.arange(new.shape[1]) % 2 == 0, 1.0, -1.0)
    for e in empty:
        big = int(np.argmax(counts))
        base = new[big].copy()
        new[e] = base * (1 + sign * _SPLIT_EPS)
        new[big] = base * (1 - sign * _SPLIT_EPS)
        counts[big] /= 2
        counts[e] = counts[big]
    return new.astype(np.float32), len(empty)


def split_merge(
    centroids: np.ndarray,
    sums: np.ndarray,
    counts: np.ndarray,
    sse: np.ndarray,
    removal: np.ndarray,
    moves: int,
) -> tuple[np.ndarray, int, int]:
    """A Lloyd update that also moves the ``moves`` cheapest centroids to split the clusters
    that hold the most inertia: a step out of a local minimum of k-means.

    Lloyd never moves a centroid across the data, so a run keeps, for example, two centroids
    in one dense cluster and one centroid for two clusters elsewhere. The centroids whose
    removal costs least (``removal``: the inertia their rows would add at their second
    nearest centroid) are taken off, and each splits one of the clusters with the largest
    share of the inertia (``sse``), the two copies pushed apart as :func:`update` splits for
    an empty cluster; Lloyd then separates them. Ties go to the lower index; clusters that
    are empty (re-seeded by :func:`update`) neither move nor split.

    Returns:
        The centroids (float32), the empty clusters, and how many centroids moved.
    """
    new, empty = update(centroids, sums, counts)
    live = counts > 0
    split = [int(j) for j in np.argsort(-sse, kind="stable") if live[j]][:moves]
    taken = set(split)
    remove = [int(j) for j in np.argsort(removal, kind="stable") if live[j] and j not in taken]
    pairs = list(zip(remove[:moves], split, strict=False))
    if not pairs:
        return new, empty, 0
    out = new.astype(np.float64)
    sign = np.where(np.arange(out.shape[1]) % 2 == 0, 1.0, -1.0)
    for r, s in pairs:
        base = out[s].copy()
        out[r] = base * (1 + sign * _SPLIT_EPS)
        out[s] = base * (1 - sign * _SPLIT_EPS)
    return out.astype(np.float32), empty, len(pairs)


def kmeans_plusplus(
    points: np.ndarray,
    k: int,
    rng: np.random.Generator,
    *,
    weights: np.ndarray | None = None,
    trials: int | None = None,
) -> np.ndarray:
    """Greedy (weighted) k-means++ as scikit-learn does it: ``2 + log k`` trials per pick.

    Returns ``(k, d)`` float32; when fewer than ``k`` points have weight, repeats are taken
    (Lloyd's split then separates them).
    """
    x = np.asarray(points, dtype=np.float64)
    n = len(x)
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    trials = trials or 2 + int(math.log(k))
    sq = (x * x).sum(1)

    def dist_to(c_idx):
        return np.maximum(sq[None, c_idx].T - 2 * x[c_idx] @ x.T + sq[None, :], 0)

    first = int(rng.choice(n, p=w / w.sum())) if w.sum() > 0 else 0
    chosen = [first]
    closest = dist_to(np.array([first]))[0]
    for _ in range(1, k):
        potential = w * closest
        total = potential.sum()
        if total <= 0:  # Every point is already a centroid: repeat the heaviest.
            chosen.append(int(np.argmax(w)))
            continue
        cands = np.searchsorted(np.cumsum(potential), rng.random(trials) * total)
        cands = np.minimum(cands, n - 1)
        d = np.minimum(closest, dist_to(cands))
        best = int(np.argmin(d @ w))
        chosen.append(int(cands[best]))
        closest = d[best]
    return x[chosen].astype(np.float32)
