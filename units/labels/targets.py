"""What a label pass can label with: a finished k-means, or a BEST-RQ quantizer.

Both are *targets*: they name the features they read (``spec``, which the label pass
rebuilds), their own framing (``contract``: a k-means's is its features', a quantizer's the
stacked one), how many labels they have (``k``), and :meth:`Target.units_of`, the labels of a
batch of utterances' features. The label stage, its exports and its checks see nothing else,
so every target gets the same exactly-once commits, frame checks and fairseq export.

A target is named by a reference ``KIND:NAME``: ``kmeans:NAME`` (``ROOT/kmeans/NAME``; a
bare ``NAME`` means the same) or ``bestrq:NAME`` (``ROOT/bestrq/NAME``).
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

from shards.core.outputs import StageError
from units.features.extractor import FeatureSpec
from units.features.frames import FrameContract

KINDS = ("kmeans", "bestrq")


class Target(Protocol):
    """A labelling target (see the module docstring)."""

    name: str
    spec: FeatureSpec

    @property
    def contract(self) -> FrameContract: ...

    @property
    def k(self) -> int: ...

    def units_of(self, features: list[np.ndarray], device: str = "cpu") -> list[np.ndarray]:
        """Labels per utterance: uint16 ``(T,)``, or ``(T, codebooks)`` for a target with
        several codebooks (the first is the label set's ``units``)."""
        ...


def parse(reference: str) -> tuple[str, str]:
    """``"bestrq:q1"`` -> ``("bestrq", "q1")``; a bare name is a k-means.

    Raises:
        StageError: An unknown kind or an empty name.
    """
    kind, colon, name = reference.partition(":")
    if not colon:
        kind, name = "kmeans", reference
    if kind not in KINDS or not name:
        raise StageError(f"target {reference!r}: use NAME, kmeans:NAME or bestrq:NAME")
    return kind, name


def load(root: str, reference: str) -> Target:
    """The finished target ``reference`` names under ``root``.

    Raises:
        StageError: No such finished target.
    """
    kind, name = parse(reference)
    if kind == "kmeans":
        from units.labels.model import KMeansModel

        return KMeansModel.load(root, name)
    from units.bestrq.quantizer import RandomProjectionQuantizer

    try:
        return RandomProjectionQuantizer.load(os.path.join(root, "bestrq", name), name)
    except FileNotFoundError:
        raise StageError(
            f"no finished BEST-RQ quantizer {name!r} under {root}: run `python -m "
            f"pipelines.bestrq --root {root} --name {name}` first"
        ) from None
