"""BEST-RQ's random-projection quantizer (Chiu et al., ICML 2022), as a labelling target.

Nothing is trained. Per utterance, feature frames (log-mel filterbanks by default) are
stacked ``stack`` at a time, normalised with statistics measured once on a seeded sample,
projected by a fixed random matrix to ``dim`` dimensions, l2-normalised, and labelled by
the nearest entry of each fixed random codebook, whose entries are l2-normalised too::

    x_i = concat(f_{s i}, ..., f_{s i + s - 1})               stacked frames, i < T // s
    y_i = ((x_i - mean) / std) @ A                             A: (s * D, dim), Xavier normal
    unit_i[c] = argmin_j || y_i / |y_i| - C_c[j] ||            C_c[j]: unit-norm, normal

Frame contract of stacked frames: an utterance of ``T`` feature frames has ``T // stack``
labels (the last ``T % stack`` frames have none), and stacked frame ``i`` covers feature
frames ``s i .. s i + s - 1``. For a Kaldi-style framing ``(window, hop)`` that is exactly the
framing ``(window + (s - 1) hop, s hop)``: with fbank (400, 160) and ``s = 4``, ``(880, 640)``,
25 Hz, ``T' = floor((N - 880) / 640) + 1`` for ``N >= 880`` samples, else 0
(:func:`stacked_contract`; the label pass checks every utterance against it).

Determinism: ``A`` and the codebooks come from :func:`units.bestrq.gaussian.standard_normal`,
the same bits for a seed on any machine. The statistics are float64 sums of the sample's
features, reduced in shard order (:func:`statistics`), so on one machine type they are the
same bits for any number of workers. Labels, like k-means units, may move across CPU types
only where two codebook entries are within float32 rounding of each other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np

from shards.core import storage
from shards.core.atomic import read_json, write_atomic, write_npy_atomic
from units.bestrq.gaussian import standard_normal
from units.features.extractor import FeatureSpec
from units.features.frames import FrameContract
from units.kmeans.parts import Assigner

#: Streams of :func:`standard_normal` per matrix: the projection, then one per codebook.
_PROJECTION_STREAM = 0
_CODEBOOK_STREAM = 1

#: Standard deviations below this are taken as 1: a constant feature dimension (digital
#: silence in every sampled frame) is centred but not blown up.
_MIN_STD = 1e-5


@dataclasses.dataclass(frozen=True)
class QuantizerConfig:
    """What decides a quantizer besides the statistics.

    Attributes:
        stack: Feature frames per label (4: 10 ms fbank frames to 40 ms labels, 25 Hz).
        dim: Projection dimension (16 in the paper).
        codebook_size: Entries per codebook (8,192 in the paper); labels are uint16.
        codebooks: Codebooks, each labelling every frame (1 in the paper; more in its
            multi-codebook variants).
        seed: Seed of the projection and codebooks.
    """

    stack: int = 4
    dim: int = 16
    codebook_size: int = 8192
    codebooks: int = 1
    seed: int = 0

    def check(self) -> None:
        """Raises ``ValueError`` for values the quantizer cannot have."""
        if self.stack < 1 or self.dim < 1 or self.codebooks < 1 or self.seed < 0:
            raise ValueError(f"stack, dim and codebooks must be >= 1 and seed >= 0, got {self}")
        if not 1 <= self.codebook_size <= 65536:
            raise ValueError(
                f"codebook_size={self.codebook_size}: use 1 to 65536 (labels are uint16)"
            )


def stacked_contract(features: FrameContract, stack: int) -> FrameContract:
    """The framing of ``stack`` feature frames at a time (see the module docstring)."""
    return FrameContract(features.window + (stack - 1) * features.hop, stack * features.hop)


def stack_frames(features: np.ndarray, stack: int) -> np.ndarray:
    """``(T, D)`` frames as ``(T // stack, stack * D)``: consecutive frames side by side, in
    time order; the last ``T % stack`` frames are dropped."""
    frames = len(features) // stack
    return np.ascontiguousarray(features[: frames * stack]).reshape(
        frames, stack * features.shape[1]
    )


def random_matrices(config: QuantizerConfig, input_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The projection ``(input_dim, dim)`` and codebooks ``(codebooks, size, dim)``, float32.

    The projection is Xavier normal (std ``sqrt(2 / (input_dim + dim))``), each codebook
    entry a standard normal vector scaled to unit length, as in the paper. The same bits
    for a config on any machine: the normals are portable, the scale and the norms are
    correctly rounded operations in a fixed order (a sequential sum over the ``dim``
    columns, not NumPy's pairwise reduction), and the cast to float32 rounds to nearest.
    """
    std = np.sqrt(2.0 / (input_dim + config.dim))
    projection = standard_normal(config.seed, _PROJECTION_STREAM, input_dim * config.dim)
    projection = (projection * std).reshape(input_dim, config.dim).astype(np.float32)
    books = []
    for c in range(config.codebooks):
        entries = standard_normal(
            config.seed, _CODEBOOK_STREAM + c, config.codebook_size * config.dim
        ).reshape(config.codebook_size, config.dim)
        squares = np.zeros(config.codebook_size, np.float64)
        for j in range(config.dim):
            squares += entries[:, j] * entries[:, j]
        books.append((entries / np.sqrt(squares)[:, None]).astype(np.float32))
    return projection, np.stack(books)


class Statistics:
    """Float64 sums of stacked feature frames: count, sum and sum of squares per dimension.

    Partial statistics (one per feature shard, say) are combined with :meth:`add` in a
    fixed order, so the mean and standard deviation are the same bits for any number of
    workers.
    """

    def __init__(self, dim: int):
        self.count = 0
        self.sum = np.zeros(dim, np.float64)
        self.squares = np.zeros(dim, np.float64)

    def update(self, stacked: np.ndarray) -> None:
        """Adds the rows of ``stacked`` (float16 or float32), summed in row order."""
        x = np.asarray(stacked, dtype=np.float64)
        self.count += len(x)
        self.sum += x.sum(axis=0)
        self.squares += (x * x).sum(axis=0)

    def add(self, other: Statistics) -> None:
        self.count += other.count
        self.sum += other.sum
        self.squares += other.squares

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        """float32 mean and standard deviation (population); small deviations become 1."""
        if self.count == 0:
            raise ValueError("no feature frames to measure the statistics on")
        mean = self.sum / self.count
        var = np.maximum(self.squares / self.count - mean * mean, 0.0)
        std = np.sqrt(var)
        std[std < _MIN_STD] = 1.0
        return mean.astype(np.float32), std.astype(np.float32)

    def to_arrays(self) -> dict:
        return {"count": self.count, "sum": self.sum, "squares": self.squares}

    @classmethod
    def from_arrays(cls, arrays: dict) -> Statistics:
        stats = cls(len(arrays["sum"]))
        stats.count = int(arrays["count"])
        stats.sum = np.array(arrays["sum"], np.float64)
        stats.squares = np.array(arrays["squares"], np.float64)
        return stats


@dataclasses.dataclass
class RandomProjectionQuantizer:
    """A BEST-RQ quantizer over the features ``spec`` names.

    It is a labelling target like a k-means (:class:`units.labels.model.KMeansModel`): it
    has the ``spec`` of the features it reads, its own frame ``contract``, ``k`` labels, and
    :meth:`units_of` for a batch of utterances' features.

    Attributes:
        name: Its name (``ROOT/bestrq/NAME``).
        spec: The input features.
        config: Stacking, projection and codebooks.
        mean: Per stacked dimension, float32.
        std: Per stacked dimension, float32.
        projection: ``(stack * spec.dim, dim)`` float32.
        codebooks: ``(codebooks, codebook_size, dim)`` float32, unit-norm entries.
    """

    name: str
    spec: FeatureSpec
    config: QuantizerConfig
    mean: np.ndarray
    std: np.ndarray
    projection: np.ndarray
    codebooks: np.ndarray
    _assigners: list = dataclasses.field(default_factory=list, repr=False, compare=False)

    @classmethod
    def create(
        cls, name: str, spec: FeatureSpec, config: QuantizerConfig, stats: Statistics
    ) -> RandomProjectionQuantizer:
        """The quantizer of ``config`` over ``spec``'s features, normalised by ``stats``."""
        config.check()
        input_dim = config.stack * spec.dim
        if len(stats.sum) != input_dim:
            raise ValueError(f"statistics of {len(stats.sum)} dims for {input_dim} stacked dims")
        mean, std = stats.mean_std()
        projection, codebooks = random_matrices(config, input_dim)
        return cls(name, spec, config, mean, std, projection, codebooks)

    @property
    def contract(self) -> FrameContract:
        """The labels' framing (see the module docstring)."""
        return stacked_contract(self.spec.contract, self.config.stack)

    @property
    def frame_rate(self) -> float:
        return self.contract.rate

    @property
    def k(self) -> int:
        return self.config.codebook_size

    def project(self, features: np.ndarray) -> np.ndarray:
        """Unit-length projections ``(T // stack, dim)`` of one utterance's features."""
        x = stack_frames(np.asarray(features, np.float32), self.config.stack)
        y = ((x - self.mean) / self.std) @ self.projection
        norms = np.sqrt(np.einsum("ij,ij->i", y, y))[:, None]
        # An all-zero projection (possible only by construction) has no direction: it keeps
        # zeros and goes to the entry nearest the origin, which every entry is equally.
        return y / np.where(norms > 0, norms, 1.0).astype(np.float32)

    def codes(self, features: np.ndarray) -> np.ndarray:
        """``(T // stack, codebooks)`` uint16 labels of one utterance's features."""
        return self.codes_of([features])[0]

    def codes_of(self, features: list[np.ndarray]) -> list[np.ndarray]:
        """:meth:`codes` of each utterance's features, with one search per codebook for the
        whole batch."""
        projected = [self.project(f) for f in features]
        bounds = np.cumsum([0] + [len(p) for p in projected])
        y = np.concatenate(projected) if projected else np.empty((0, self.config.dim), np.float32)
        if not self._assigners:
            self._assigners.extend(Assigner(book) for book in self.codebooks)
        codes = np.empty((len(y), self.config.codebooks), np.uint16)
        if len(y):
            for c, assign in enumerate(self._assigners):
                codes[:, c] = assign(y, distances=False)[0]
        return [codes[bounds[i] : bounds[i + 1]] for i in range(len(features))]

    def units_of(self, features: list[np.ndarray], device: str = "cpu") -> list[np.ndarray]:
        """Labels per utterance as a label set stores them: ``(T,)`` with one codebook,
        ``(T, codebooks)`` with several (the first is the set's ``units``)."""
        codes = self.codes_of(features)
        return [c[:, 0] for c in codes] if self.config.codebooks == 1 else codes

    # -- files ---------------------------------------------------------------------------

    _ARRAYS = ("mean", "std", "projection", "codebooks")

    def fingerprint(self) -> str:
        """sha256 over the config, the spec and the arrays' bytes: two quantizers label
        alike exactly when their fingerprints are equal."""
        digest = hashlib.sha256(json.dumps(self._description(), sort_keys=True).encode())
        for name in self._ARRAYS:
            digest.update(np.ascontiguousarray(getattr(self, name)).tobytes())
        return digest.hexdigest()

    def _description(self) -> dict:
        return {
            "spec": self.spec.to_json(),
            "config": dataclasses.asdict(self.config),
            "frame_rate": self.frame_rate,
            "window": self.contract.window,
            "hop": self.contract.hop,
        }

    def save(self, directory: str, lineage: dict) -> dict:
        """Writes the arrays (``.npy``), then ``quantizer.json`` last (the quantizer is
        complete once it exists); returns its content."""
        storage.makedirs(directory)
        for name in self._ARRAYS:
            write_npy_atomic(os.path.join(directory, f"{name}.npy"), getattr(self, name))
        meta = dict(self._description(), name=self.name, lineage=lineage)
        meta["fingerprint"] = self.fingerprint()
        text = json.dumps(meta, indent=1, sort_keys=True).encode()
        write_atomic(os.path.join(directory, "quantizer.json"), text)
        return meta

    @classmethod
    def load(cls, directory: str, name: str) -> RandomProjectionQuantizer:
        """A quantizer written by :meth:`save`; ``FileNotFoundError`` when there is none."""
        meta = read_json(os.path.join(directory, "quantizer.json"))
        if meta is None:
            raise FileNotFoundError(f"no finished quantizer {name!r} at {directory}")
        arrays = {n: storage.load_npy(os.path.join(directory, f"{n}.npy")) for n in cls._ARRAYS}
        quantizer = cls(
            name,
            FeatureSpec.from_json(meta["spec"]),
            QuantizerConfig(**meta["config"]),
            **arrays,
        )
        if quantizer.fingerprint() != meta["fingerprint"]:
            raise ValueError(
                f"quantizer {name!r} at {directory}: its arrays do not match "
                "quantizer.json's fingerprint (a partial or altered copy)"
            )
        return quantizer
