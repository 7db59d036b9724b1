"""How far two float32 evaluations of one computation may drift apart, derived, not observed.

The determinism contract (README, "Determinism") promises bit identity only for the same
inputs, config and machine type. Across CPU types, BLAS/FFT builds and batch compositions
the same formula is evaluated with other kernels, which add in other orders, and the tests
compare such results within the float32 error bounds below. Each bound is first order in
the unit roundoff ``u = 2**-24``, covers *two* evaluations (each may be off, in opposite
directions), and scales with the magnitudes a value is computed from, never with the value
itself: a cepstrum near zero is the sum of terms near 40 and carries their rounding.

Worst-case bounds (``n u`` for an ``n``-term sum) assume every rounding error has the same
sign and its largest size; for the FFTs and GEMMs here they are three orders of magnitude
above any difference float32 produces, loose enough to pass a real bug. The bounds below
are the probabilistic ones of Higham and Mary ("A new approach to probabilistic rounding
error analysis", SIAM J. Sci. Comput. 41(5), 2019, Theorem 2.4): with rounding errors
independent and of mean zero, an ``n``-term sum or dot product is off by at most

    gamma(n) = lam * sqrt(n) * u   (times the sum of the terms' magnitudes)

with probability at least ``1 - 2 exp(-lam**2 / 2)``; ``lam = 6`` makes that 1 - 3e-8 per
value. An FFT of length ``N`` is a pairwise sum in ``log2(N)`` stages whose every
operation is a complex multiply-add: at most ``ETA = 1 + 2 sqrt(2)`` units of roundoff
(a complex product is off by at most ``sqrt(2) * 2u``, Higham's Lemma 3.5, and the add by
``u``). Every input sample reaches a bin through ``log2(N)`` such roundings with unit-modulus
twiddles, so each bin is off by at most ``lam * sqrt(log2(N)) * ETA * u * ||x||_2``. This
assumes accurately computed twiddles, as MKL, pocketfft, FFTW and cuFFT have.

A real bug (a wrong window, a missing delta, another mel scale) moves audible frames'
features by 0.01 to 100, at least an order of magnitude above these bounds (the tests that
use them also check a planted bug fails).
"""

from __future__ import annotations

import numpy as np

from units.features.frames import MFCC
from units.features.kaldi import (
    DELTA_WINDOW,
    FFT_SIZE,
    LOG_FLOOR,
    PREEMPHASIS,
    kaldi_dct,
    kaldi_mel_banks,
    lifter_coefficients,
)

#: Unit roundoff of float32 (half its machine epsilon).
U = 2.0**-24
#: Confidence parameter of the probabilistic bounds: each holds with probability 1 - 3e-8.
LAMBDA = 6.0
#: Roundoff units of one complex multiply-add in an FFT butterfly.
ETA = 1.0 + 2.0 * np.sqrt(2.0)


def gamma(n: int) -> float:
    """The probabilistic error factor of an ``n``-term sum: ``lam sqrt(n) u``."""
    return LAMBDA * np.sqrt(n) * U


def _frames64(wav: np.ndarray) -> np.ndarray:
    """Frames of ``wav`` in float64: ``(T, 400)`` with snip_edges."""
    x = np.asarray(wav, dtype=np.float64)
    n = MFCC.frames(x.size)
    if n == 0:
        return np.zeros((0, MFCC.window))
    return np.lib.stride_tricks.as_strided(
        x, (n, MFCC.window), (MFCC.hop * x.itemsize, x.itemsize), writeable=False
    ).copy()


def log_mel_bound(wav: np.ndarray, num_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Kaldi's log-mel energies in float64, and how far two float32 evaluations may differ.

    The float32 computation, step by step, and the error each step can add (two
    evaluations, so every term counts twice):

    1. DC removal, pre-emphasis and window: the frame mean is a 400-term sum, off by at
       most ``gamma(400) mean|x|``; it enters scaled by ``1 - 0.97``. Each windowed sample
       then carries four roundings (subtract, add, subtract, multiply) of magnitudes at
       most ``w_n (|x_n| + |x_{n-1}| + |m|)``.
    2. The 512-point FFT: each bin ``lam sqrt(9) ETA u ||x||_2`` (see the module doc), plus
       the input's errors carried through, a sum of them with unit weights: ``lam
       ||dx||_2``.
    3. Power and mel filters: ``|d|X|^2| <= 2 |X| dX + dX^2`` per bin, weighted by the
       filter; the filter sum adds ``gamma(taps) E`` (its terms are all positive).
    4. Log: ``log(E +- dE)``, both sides floored at float32 epsilon as the extractor does,
       plus the log's own rounding. A bin whose energy is within ``dE`` of zero is not
       resolved by float32 at all: its bound is the distance to the floor, as it must be.

    Returns:
        ``(log_mel, bound)``, both ``(T, num_bins)``.
    """
    frames = _frames64(wav)
    banks = kaldi_mel_banks(num_bins).double().numpy()  # (257, num_bins)
    # Kaldi's povey window: a symmetric Hann window to the power 0.85.
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(MFCC.window) / (MFCC.window - 1))) ** 0.85
    if len(frames) == 0:
        empty = np.zeros((0, num_bins))
        return empty, empty
    mean = frames.mean(axis=1, keepdims=True)
    centred = frames - mean
    emphasised = centred.copy()
    emphasised[:, 1:] -= PREEMPHASIS * centred[:, :-1]
    emphasised[:, 0] -= PREEMPHASIS * centred[:, 0]
    windowed = emphasised * window
    spectrum = np.fft.rfft(windowed, n=FFT_SIZE, axis=1)
    power = np.abs(spectrum) ** 2
    energy = power @ banks

    magnitude = np.abs(frames)
    previous = np.concatenate([magnitude[:, :1], magnitude[:, :-1]], axis=1)
    mean_error = gamma(MFCC.window) * magnitude.mean(axis=1, keepdims=True)
    sample_error = window * (
        4 * U * (magnitude + previous + np.abs(mean)) + (1 - PREEMPHASIS) * mean_error
    )
    norm_x = np.linalg.norm(windowed, axis=1, keepdims=True)
    input_error = LAMBDA * np.linalg.norm(sample_error, axis=1, keepdims=True)
    fft_error = LAMBDA * np.sqrt(np.log2(FFT_SIZE)) * ETA * U * norm_x
    bin_error = 2 * (fft_error + input_error)  # (T, 1): two evaluations.
    power_error = 2 * np.abs(spectrum) * bin_error + bin_error**2
    taps = 2 * np.count_nonzero(banks, axis=0)  # Real and imaginary squares, interleaved.
    energy_error = power_error @ banks + 2 * np.array([gamma(t) for t in taps]) * energy

    log_mel = np.log(np.maximum(energy, LOG_FLOOR))
    high = np.log(np.maximum(energy + energy_error, LOG_FLOOR))
    low = np.log(np.maximum(energy - energy_error, LOG_FLOOR))
    bound = np.maximum(high - log_mel, log_mel - low) + 2 * 2 * U * np.abs(log_mel)
    return log_mel, bound


def _replicate(x: np.ndarray, width: int) -> np.ndarray:
    return np.concatenate([np.repeat(x[:1], width, 0), x, np.repeat(x[-1:], width, 0)])


def _deltas_with_bound(
    x: np.ndarray, error: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """torchaudio's deltas of ``x`` and their bound, from ``x``'s own bound ``error``.

    ``d_t = sum_n n (x_{t+n} - x_{t-n}) / (2 sum_n n^2)``: linear, so ``x``'s errors carry
    through with the absolute weights; its ``2 width`` terms add ``gamma(2 width)`` of their
    magnitudes, and the division one rounding.
    """
    norm = 2 * sum(n * n for n in range(1, width + 1))
    xp, ep = _replicate(x, width), _replicate(error, width)
    rows = len(x)
    delta = np.zeros_like(x)
    carried = np.zeros_like(x)
    magnitude = np.zeros_like(x)
    for n in range(1, width + 1):
        ahead, behind = xp[width + n : width + n + rows], xp[width - n : width - n + rows]
        delta += n * (ahead - behind)
        magnitude += n * (np.abs(ahead) + np.abs(behind))
        carried += n * (ep[width + n : width + n + rows] + ep[width - n : width - n + rows])
    delta /= norm
    rounding = 2 * (gamma(2 * width) * magnitude / norm + U * np.abs(delta))
    return delta, carried / norm + rounding


def kaldi_bound(wav: np.ndarray, mfcc: bool) -> np.ndarray:
    """How far two float32 evaluations of ``wav``'s MFCC (39) or fbank (80) may differ.

    For fbank that is :func:`log_mel_bound`. For MFCC, the lifted DCT sums 23 log-mel
    energies: their bounds carried with the absolute weights, plus ``gamma(23)`` of the
    terms' magnitudes; the deltas as :func:`_deltas_with_bound` says.

    Returns:
        ``(T, dim)``, ``T = MFCC.frames(len(wav))``.
    """
    if not mfcc:
        return log_mel_bound(wav, 80)[1]
    log_mel, error = log_mel_bound(wav, 23)
    if len(log_mel) == 0:
        return np.zeros((0, 39))
    lifted = (kaldi_dct() * lifter_coefficients().unsqueeze(0)).double().numpy()
    static, weights = log_mel @ lifted, np.abs(lifted)
    static_error = error @ weights + 2 * gamma(len(lifted)) * (np.abs(log_mel) @ weights)
    width = (DELTA_WINDOW - 1) // 2
    delta, delta_error = _deltas_with_bound(static, static_error, width)
    _, delta_delta_error = _deltas_with_bound(delta, delta_error, width)
    return np.concatenate([static_error, delta_error, delta_delta_error], axis=1)


def assert_within(got: np.ndarray, want: np.ndarray, bound: np.ndarray, what: str = "") -> None:
    """``|got - want| <= bound`` everywhere, naming the worst element when not."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape == bound.shape, (what, got.shape, want.shape, bound.shape)
    excess = np.abs(got - want) - bound
    if excess.size and excess.max() > 0:
        i = np.unravel_index(np.argmax(excess), excess.shape)
        raise AssertionError(
            f"{what}: |{got[i]!r} - {want[i]!r}| = {abs(got[i] - want[i]):.3g} exceeds the "
            f"float32 bound {bound[i]:.3g} at {i} ({int((excess > 0).sum())} of {excess.size})"
        )


def float16_bound(values: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """The bound after rounding to float16: rounding to nearest adds half an ulp of float16
    at the value's magnitude (a float32 difference of any size can straddle a float16
    rounding boundary)."""
    top = np.abs(np.asarray(values, np.float64)) + bound
    return bound + 0.5 * np.spacing(top.astype(np.float16)).astype(np.float64)


def clear_frames(
    features: np.ndarray,
    centroids: np.ndarray,
    feature_bound: np.ndarray | float,
    pca: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Frames whose nearest centroid no float32 evaluation can change.

    The assignment compares squared distances computed by a float32 GEMM, ``|c|^2 - 2 x.c``:
    each is off by at most ``gamma(d + 2)`` of ``(|x| + |c|)^2``. Features that may be off
    by ``feature_bound`` (elementwise; after the PCA, if any, carried through ``|A|``)
    move a distance ``|x - c|^2`` by at most ``2 |x - c| |dx| + |dx|^2``. A frame is clear
    when the second-nearest centroid is further than the sum of both errors for both
    centroids, from each of two evaluations: there the units are the same bits anywhere.

    Args:
        features: ``(T, dim)`` features as computed once.
        centroids: ``(k, d)``.
        feature_bound: Elementwise bound on the features (scalar or ``(T, dim)``).
        pca: ``(mean, matrix)`` applied before the assignment, as ``KMeansModel`` does.
    """
    x = np.asarray(features, np.float64)
    dx = np.broadcast_to(np.asarray(feature_bound, np.float64), x.shape)
    if pca is not None:
        mean, matrix = (np.asarray(a, np.float64) for a in pca)
        centred = x - mean
        dx = dx @ np.abs(matrix) + 2 * gamma(x.shape[1]) * (np.abs(centred) @ np.abs(matrix))
        dx += 2 * U * np.abs(mean) @ np.abs(matrix)
        x = centred @ matrix
    c = np.asarray(centroids, np.float64)
    dist = ((x[:, None, :] - c[None]) ** 2).sum(-1)
    order = np.argsort(dist, axis=1)[:, :2]
    rows = np.arange(len(x))
    shift = np.linalg.norm(dx, axis=1)
    margin = np.zeros(len(x))
    for j in (0, 1):
        nearest = c[order[:, j]]
        reach = np.sqrt(dist[rows, order[:, j]])
        size = np.linalg.norm(x, axis=1) + np.linalg.norm(nearest, axis=1)
        gemm = gamma(x.shape[1] + 2) * size**2
        margin += 2 * (2 * reach * shift + shift**2 + gemm)
    return dist[rows, order[:, 1]] - dist[rows, order[:, 0]] > margin


#: Elementwise bound on the tiny test models' layer features (``tests/models.py``, values up
#: to about 3.4) between two float32 evaluations. A transformer has no closed-form bound
#: (layer norm and softmax amplify by their inputs), so it is measured: the float32 forward
#: is within 2.7e-6 of a float64 forward of the same model, so two evaluations are within
#: 5.5e-6 (other kernels seen: 4.8e-6 with MKL's AVX2 or generic kernels, 9.5e-7 with one
#: thread); four times that covers inputs and layers the measurement did not see. It only
#: decides which frames are near ties in :func:`assert_units_agree`.
SSL_FEATURE_BOUND = 2.5e-5


def assert_units_agree(
    units, features, model, feature_bound, what: str = ""
) -> tuple[int, int, int]:
    """Units equal ``model.units(features)`` on every frame that is not a float32 near tie.

    ``units`` came from features computed elsewhere (a worker, in batches, on other
    kernels); ``features`` are this process's. Frames where :func:`clear_frames` says
    rounding could pick another centroid may differ: the contract allows them.

    Returns:
        ``(clear, equal, total)`` frames, for the caller to check that the comparison
        covered most frames and that nearly all agree.
    """
    pca = None if model.pca_mean is None else (model.pca_mean, model.pca_matrix)
    clear = clear_frames(features, model.centroids, feature_bound, pca)
    want = model.units(features)
    got = np.asarray(units)
    assert got.shape == want.shape, what
    np.testing.assert_array_equal(got[clear], want[clear], err_msg=what)
    return int(clear.sum()), int((got == want).sum()), len(clear)


class UnitAgreement:
    """Adds up :func:`assert_units_agree` over utterances and checks the totals."""

    def __init__(self) -> None:
        self.clear = self.equal = self.total = 0

    def add(self, counts: tuple[int, int, int]) -> None:
        self.clear += counts[0]
        self.equal += counts[1]
        self.total += counts[2]

    def check(self) -> None:
        """Most frames are clear of float32 near ties (so the exact comparison has teeth),
        and at least 99.9% of all frames agree (the contract says 99.99% of a corpus; a
        test corpus of about a thousand frames allows one near tie to flip)."""
        assert self.total > 0
        assert self.clear >= 0.9 * self.total, (self.clear, self.total)
        assert self.equal >= 0.999 * self.total, (self.equal, self.total)
