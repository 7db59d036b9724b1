"""The compiled mel sums: each filter's weighted bin powers added in bin order, in float32 —
the same bits as that sum written out in numpy, for a frame alone or in any batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from units.features.kaldi import FBANK_MEL_BINS, MFCC_MEL_BINS, kaldi_mel_banks
from units.features.mel_sums import MelSums


def _spectra(frames: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.1, (frames, 512)).astype(np.float32)
    x[: frames // 4] *= 1e-4  # Quiet frames: energies near the float32 floor as well.
    return torch.fft.rfft(torch.from_numpy(x))


def _in_bin_order(spectrum: torch.Tensor, banks: torch.Tensor) -> np.ndarray:
    """The sums as the kernel defines them, one numpy float32 operation at a time."""
    s = torch.view_as_real(spectrum).numpy()
    power = s[..., 0] * s[..., 0] + s[..., 1] * s[..., 1]
    weights = banks.numpy()
    out = np.zeros((len(power), weights.shape[1]), np.float32)
    for j in range(weights.shape[1]):
        used = np.flatnonzero(weights[:, j])
        for k in range(used[0], used[-1] + 1):
            out[:, j] += weights[k, j] * power[:, k]
    return out


@pytest.mark.parametrize("bins", [MFCC_MEL_BINS, FBANK_MEL_BINS])
def test_the_sums_are_each_filter_over_its_bins_in_order_bit_for_bit(bins):
    banks = kaldi_mel_banks(bins)
    spectrum = _spectra(300)
    got = MelSums(banks)(spectrum).numpy()
    # Bit for bit on any CPU: both sides are the same sequence of float32 multiplies and adds,
    # each correctly rounded by IEEE 754 (numba compiles without fastmath, so nothing is
    # reordered or fused), on one spectrum; no BLAS or FFT between them.
    np.testing.assert_array_equal(got, _in_bin_order(spectrum, banks))
    # And they are the filterbank: float64's answer within float32 rounding (each sum has at
    # most a few dozen terms, all positive, so the relative error stays below ~50 ulps).
    exact = spectrum.to(torch.complex128).abs().square() @ banks.double()
    np.testing.assert_allclose(got, exact.numpy(), rtol=50 * np.finfo(np.float32).eps)


def test_a_frame_gets_the_same_energies_alone_and_in_any_batch():
    mel = MelSums(kaldi_mel_banks(MFCC_MEL_BINS))
    spectrum = _spectra(64, seed=1)
    batched = mel(spectrum).numpy()
    # Each frame's sums are its own loop, whatever else is in the batch: exact on any CPU.
    for i in (0, 17, 63):
        np.testing.assert_array_equal(mel(spectrum[i : i + 1]).numpy()[0], batched[i])
    np.testing.assert_array_equal(mel(spectrum[10:40]).numpy(), batched[10:40])


def test_a_filter_without_weights_is_refused():
    banks = kaldi_mel_banks(MFCC_MEL_BINS).clone()
    banks[:, 3] = 0
    with pytest.raises(ValueError, match="filter 3"):
        MelSums(banks)
