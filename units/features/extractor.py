"""What every feature extractor is: a spec that later stages record, and a batched call.

The spec is what the k-means records with its centroids and what the label pass reuses, so
labels are always computed with the features the k-means was fitted on (the mismatch behind
fairseq#4464).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from units.features.frames import MFCC, SSL, FrameContract


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """Everything that decides a feature vector: the one description of an extractor.

    :func:`units.features.extractors.describe` gives it from a name and a layer without
    loading a model; every built extractor carries it as ``spec`` (the same value); the
    feature store, the k-means and the labels record its :meth:`to_json`; and
    :meth:`units.features.extractors.ExtractorOptions.from_spec` rebuilds the extractor
    from it.

    Attributes:
        extractor: ``mfcc``, ``fbank``, ``hf`` (a local Hugging Face model directory) or
            ``fairseq`` (a local fairseq checkpoint).
        dim: Feature dimension.
        window: Frame contract window, samples.
        hop: Frame contract hop, samples.
        checkpoint: Model path (``hf``/``fairseq``), else ``None``.
        checkpoint_sha256: sha256 of the checkpoint file (or of the directory's weight files).
        layer: Transformer block whose output is taken, counted from 1 (``None`` for MFCC).
        normalize_waveform: Whether the waveform is layer-normalised before the model.
        architecture: Model family (``hubert``, ``wav2vec2``, ``wavlm``, ``data2vec-audio``).
    """

    extractor: str
    dim: int
    window: int
    hop: int
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    layer: int | None = None
    normalize_waveform: bool = False
    architecture: str | None = None

    @property
    def contract(self) -> FrameContract:
        return FrameContract(self.window, self.hop)

    @property
    def frame_rate(self) -> float:
        return self.contract.rate

    def to_json(self) -> dict:
        return dict(dataclasses.asdict(self), frame_rate=self.frame_rate)

    @classmethod
    def from_json(cls, data: dict) -> FeatureSpec:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})

    def fingerprint(self) -> str:
        """A stable string identifying the spec (for comparisons and file names)."""
        return json.dumps(self.to_json(), sort_keys=True)


MFCC_SPEC = FeatureSpec("mfcc", 39, MFCC.window, MFCC.hop)
FBANK_SPEC = FeatureSpec("fbank", 80, MFCC.window, MFCC.hop)
SSL_CONTRACT = SSL


class Extractor(Protocol):
    """A batched feature extractor.

    ``__call__`` takes 16 kHz mono float32 waveforms of any lengths and returns one float32
    array ``(T_i, spec.dim)`` per waveform with ``T_i == spec.contract.frames(len(w_i))``.
    """

    spec: FeatureSpec

    def __call__(self, waveforms: Sequence[np.ndarray]) -> list[np.ndarray]: ...
