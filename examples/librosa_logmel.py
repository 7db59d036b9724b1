"""An extractor hook: librosa's log-mel spectrogram as unit features.

Any model can feed the pipeline through ``--extractor python:MODULE:CALLABLE``; this file is
the smallest complete one. Put it where every Ray worker can import it (``pip install`` your
package, or ``ray job submit --working-dir .``) and run, for example::

    unitpipe features --root /data/ls --name logmel --extractor python:librosa_logmel:build \\
        --percent 10

``build(options)`` returns an object with a ``spec`` (what it computes: dimension and frame
contract) and ``__call__(waveforms) -> [ (T, dim) float32 ]``. The frames keep the MFCC
contract, ``T = floor((N - 400) / 160) + 1`` at 100 Hz: 25 ms windows every 10 ms, no
centre padding (librosa's ``center=False``), so the labels line up with Kaldi-style features.
"""

from __future__ import annotations

import librosa
import numpy as np

from units.features.extractor import FeatureSpec

N_MELS = 40


class LogMel:
    """``N_MELS`` log-mel energies per 10 ms frame of 16 kHz audio."""

    spec = FeatureSpec("python", dim=N_MELS, window=400, hop=160)

    def __call__(self, waveforms):
        out = []
        for wav in waveforms:
            if len(wav) < self.spec.window:  # No whole window: no frame (the contract).
                out.append(np.zeros((0, N_MELS), np.float32))
                continue
            mel = librosa.feature.melspectrogram(
                y=np.asarray(wav, np.float32), sr=16_000, n_fft=400, hop_length=160,
                center=False, n_mels=N_MELS,
            )  # fmt: skip
            out.append(np.log(mel + 1e-6).T.astype(np.float32))
        return out


def build(options) -> LogMel:
    """The hook's factory: ``options`` is the run's
    :class:`~units.features.extractors.ExtractorOptions` (unused: this extractor has no layer
    and runs on the CPU)."""
    del options
    return LogMel()
