"""Mel filterbank energies of power spectra on CPU, as a compiled loop over each filter's bins.

Kaldi's triangular filters are sparse: each FFT bin feeds at most two neighbouring filters, so
a dense ``(bins, filters)`` matmul spends most of its work on exact zeros, and reading the
``rfft`` output again to square it costs one more pass. Here a compiled loop forms each
bin's power ``re^2 + im^2`` and adds it, weighted, into the filters whose triangle covers it
(23 filters: about 500 multiply-adds a frame instead of about 12,000).

One filter's sum is a chain of dependent adds, so a loop over one frame waits on the adder's
latency. The loop takes :data:`FRAMES_PER_BLOCK` frames at a time instead, their powers laid
out bin by bin, and runs each filter's chain for all of them at once: the frames are
independent lanes, which LLVM puts in SIMD registers without reordering any frame's own sum.
Measured on 1,000 frames of 512-point spectra, one core (AMD EPYC, AVX2): 0.26 ms, against
0.57 ms one frame at a time and 0.98 ms for the squaring and banded matmuls both replace.

Each filter's sum runs over its bins in ascending order in float32, every product rounded
before it is added (no ``fastmath``, so LLVM neither reorders nor fuses them): the energies
are a function of the frame alone, the same bits for a frame batched with others or alone,
in any lane of a block, on any CPU; a BLAS matmul picks its order by shape and CPU instead.
"""

from __future__ import annotations

import numpy as np
import torch

_compiled = None  # The numba kernel, compiled (or loaded from numba's cache) on first use.

#: Frames whose sums run side by side (one AVX2 register of float32; 16 was slower here).
FRAMES_PER_BLOCK = 8


def _sums(spectrum, first, count, offset, weights, out):  # pragma: no cover - compiled.
    frames, bins = spectrum.shape[0], spectrum.shape[1] // 2
    power = np.zeros((bins, FRAMES_PER_BLOCK), np.float32)  # A block's powers, bin by bin.
    acc = np.empty(FRAMES_PER_BLOCK, np.float32)
    for i0 in range(0, frames, FRAMES_PER_BLOCK):
        n = min(FRAMES_PER_BLOCK, frames - i0)
        for f in range(n):
            for k in range(bins):
                re = spectrum[i0 + f, 2 * k]
                im = spectrum[i0 + f, 2 * k + 1]
                power[k, f] = re * re + im * im
        for j in range(first.shape[0]):
            # Lanes past n (a short last block) sum an earlier block's powers (or zeros) and
            # are never written out.
            for f in range(FRAMES_PER_BLOCK):
                acc[f] = np.float32(0.0)
            lo, at = first[j], offset[j]
            for t in range(count[j]):
                w = weights[at + t]
                for f in range(FRAMES_PER_BLOCK):
                    acc[f] += w * power[lo + t, f]
            for f in range(n):
                out[i0 + f, j] = acc[f]


def _kernel():
    global _compiled
    if _compiled is None:
        import numba

        _compiled = numba.njit(cache=True, nogil=True)(_sums)
    return _compiled


class MelSums:
    """The mel energies of interleaved ``rfft`` output for fixed triangular filters.

    Args:
        banks: ``(bins, filters)`` filter weights (``kaldi_mel_banks``), each filter's nonzero
            weights on consecutive bins.

    Example:
        >>> import torch
        >>> from units.features.kaldi import kaldi_mel_banks
        >>> banks = kaldi_mel_banks(23)
        >>> mel = MelSums(banks)
        >>> spectrum = torch.fft.rfft(torch.ones(2, 512))
        >>> bool(torch.allclose(mel(spectrum), spectrum.abs().square() @ banks, rtol=1e-5))
        True
    """

    def __init__(self, banks: torch.Tensor):
        weights = banks.T.contiguous().numpy().astype(np.float32)  # (filters, bins)
        spans = []
        for j, w in enumerate(weights):
            used = np.flatnonzero(w)
            if len(used) == 0:
                raise ValueError(f"filter {j} has no nonzero weight")
            spans.append((int(used[0]), int(used[-1]) + 1))
        # Each filter's weights from its first nonzero bin to its last, back to back.
        self._first = np.array([lo for lo, _ in spans], np.int64)
        self._count = np.array([hi - lo for lo, hi in spans], np.int64)
        self._offset = np.concatenate([[0], np.cumsum(self._count)[:-1]]).astype(np.int64)
        self._weights = np.concatenate(
            [w[lo:hi] for w, (lo, hi) in zip(weights, spans, strict=True)]
        )
        self.filters = len(weights)

    def __call__(self, spectrum: torch.Tensor) -> torch.Tensor:
        """``(frames, filters)`` float32 energies of a ``(frames, bins)`` complex64 CPU tensor."""
        interleaved = torch.view_as_real(spectrum).reshape(spectrum.shape[0], -1).numpy()
        out = np.empty((spectrum.shape[0], self.filters), np.float32)
        _kernel()(interleaved, self._first, self._count, self._offset, self._weights, out)
        return torch.from_numpy(out)
