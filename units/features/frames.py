"""Frame contracts: how many feature frames a waveform of N samples at 16 kHz gives.

Both front ends frame audio the way Kaldi does with ``snip_edges=True``: a frame exists for
every full window, so ``T = floor((N - window) / hop) + 1`` when ``N >= window``, else 0.

- MFCC and fbank: 25 ms windows every 10 ms, ``T = floor((N - 400) / 160) + 1`` (100 Hz).
- HuBERT / wav2vec 2.0 / WavLM / data2vec conv front end: receptive field 400 samples,
  stride 320, ``T = floor((N - 400) / 320) + 1`` (50 Hz).
"""

from __future__ import annotations

import dataclasses

SAMPLE_RATE = 16_000


@dataclasses.dataclass(frozen=True)
class FrameContract:
    """A framing of 16 kHz audio.

    Example:
        >>> MFCC.frames(16000), SSL.frames(16000)
        (98, 49)
    """

    window: int
    hop: int

    @property
    def rate(self) -> float:
        """Frames per second."""
        return SAMPLE_RATE / self.hop

    def frames(self, num_samples: int) -> int:
        """Frames for ``num_samples`` samples (0 below one window)."""
        if num_samples < self.window:
            return 0
        return (num_samples - self.window) // self.hop + 1

    def samples_for(self, frames: int) -> int:
        """The fewest samples that give ``frames`` frames."""
        return 0 if frames <= 0 else self.window + (frames - 1) * self.hop


MFCC = FrameContract(window=400, hop=160)
SSL = FrameContract(window=400, hop=320)
