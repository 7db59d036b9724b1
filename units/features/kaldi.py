"""Kaldi-compatible MFCC (with deltas) and log-mel fbank, batched over utterances, in torch.

The MFCC is what fairseq's HuBERT recipe (``examples/hubert/simple_kmeans/
dump_mfcc_feature.py``) computes for the first k-means iteration::

    mfcc = torchaudio.compliance.kaldi.mfcc(wav, sample_frequency=16000, use_energy=False)
    delta = torchaudio.functional.compute_deltas(mfcc.T)   # win_length 5, replicate
    ddelta = torchaudio.functional.compute_deltas(delta)
    features = cat([mfcc, delta.T, ddelta.T], dim=1)      # (T, 39)

on float waveforms in [-1, 1] (as soundfile reads them, not scaled by 32768). Kaldi's
options are fixed: 25 ms povey windows every 10 ms with ``snip_edges``, DC removal,
pre-emphasis 0.97, no dither, a 512-point FFT, 23 mel bins (80 for fbank) from 20 Hz to
Nyquist on Kaldi's mel scale ``1127 ln(1 + f / 700)``, log floored at float32 epsilon,
13 cepstra from Kaldi's DCT, cepstral lifter 22, no energy term.

Instead of one torchaudio call per utterance, the batch is laid out as one flat signal in
which every utterance starts on a multiple of the 160-sample hop, so one strided view frames
the whole batch: per batch of frames, one ``rfft``, the mel filters and a matmul give every
frame's cepstra (on CPU the filters are a compiled loop over each filter's own bins,
:mod:`units.features.mel_sums`; on GPU, banded matmuls). The frames that straddle two
utterances (a handful per utterance) are computed and never returned. Deltas use replicate
padding at each utterance's own first and last frame, so an utterance gets the same features
whatever it is batched with.

Everything is float32 torch, on CPU or CUDA. The rounding differs from torchaudio's only in
the order of operations: both are about 1e-4 from a float64 computation on cepstra of
magnitude up to ~50 (the bench checks ours against a step-for-step port of torchaudio).
Against kaldi-native-fbank (float32 C++, its own FFT) the static cepstra and the log-mel
energies agree to 2e-3 absolute (6e-4 seen; see the tests), except for mel energies near
the float32 floor: bins some 90 dB below their frame's loudest, as at the edges of digital
silence, carry float32 FFT rounding of the loud bins, and there every float32
implementation, torchaudio's included, is up to ~1e-2 from float64. Frames of digital
silence are exactly ``log(eps)`` in all of them.

Batching changes no formula, but it sets the shapes of the ``rfft`` and DCT matmul calls,
and MKL picks kernels (so orders of summation) by shape, CPU and alignment: with MKL's AVX2
kernels an utterance batched with others comes out up to 8 float32 ulps from the same
utterance alone (1.9e-5 on a cepstrum of 34), while its AVX-512 kernels give the same bits.
The CPU mel energies themselves are summed in a fixed order, the same bits in any batch.
Between CPUs the cepstra of real speech move by up to 6e-3 where a frame's mel bins span
90 dB (sibilants), since float32 cannot resolve the quiet ones. All of it stays far inside
the float32 error bound of the computation (``tests/numerics.py``, ``bench/determinism.py``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import torch

from units.features.extractor import FBANK_SPEC, MFCC_SPEC, FeatureSpec
from units.features.frames import MFCC, SAMPLE_RATE
from units.features.mel_sums import MelSums

#: Padded FFT size: the 400-sample window rounded up to a power of two, as Kaldi does.
FFT_SIZE = 512
PREEMPHASIS = 0.97
#: ``1 - 0.97`` with 0.97 rounded to float32, as torch applies it (exact in float32).
_PREEMPHASIS_REST = 1.0 - float(np.float32(PREEMPHASIS))
LOW_FREQ = 20.0
CEPSTRAL_LIFTER = 22.0
NUM_CEPS = 13
MFCC_MEL_BINS = 23
FBANK_MEL_BINS = 80
#: Delta window: ``(DELTA_WINDOW - 1) // 2`` frames on each side.
DELTA_WINDOW = 5
#: Floor of the mel energies before the log: float32 epsilon, like Kaldi and torchaudio.
LOG_FLOOR = float(torch.finfo(torch.float32).eps)


def povey_window(length: int = MFCC.window) -> torch.Tensor:
    """Kaldi's povey window: a symmetric Hann window raised to the power 0.85.

    Computed the way torchaudio computes it (float32), so the two agree bit for bit.
    """
    return torch.hann_window(length, periodic=False, dtype=torch.float32).pow(0.85)


def mel_scale(freq: torch.Tensor | float) -> torch.Tensor | float:
    """Kaldi's mel scale, ``1127 ln(1 + f / 700)``."""
    if isinstance(freq, torch.Tensor):
        return 1127.0 * (1.0 + freq / 700.0).log()
    return 1127.0 * math.log(1.0 + freq / 700.0)


def kaldi_mel_banks(
    num_bins: int,
    fft_size: int = FFT_SIZE,
    sample_rate: int = SAMPLE_RATE,
    low_freq: float = LOW_FREQ,
    high_freq: float = 0.0,
) -> torch.Tensor:
    """Kaldi's triangular mel filters as a ``(fft_size // 2 + 1, num_bins)`` matrix.

    Triangles are equally spaced on the mel scale between ``low_freq`` and ``high_freq``
    (``<= 0`` counts back from Nyquist). The Nyquist row is zero, as in Kaldi, whose
    filters cover the first ``fft_size // 2`` FFT bins only. The arithmetic follows
    torchaudio's ``get_mel_banks`` in float32, so the weights are the same bits.
    """
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if not (0.0 <= low_freq < high_freq <= nyquist):
        raise ValueError(f"need 0 <= low_freq={low_freq} < high_freq={high_freq} <= {nyquist}")
    mel_low, mel_high = mel_scale(low_freq), mel_scale(high_freq)
    # num_bins + 1 steps: the outer triangles reach one step past the first and last centre.
    step = (mel_high - mel_low) / (num_bins + 1)
    index = torch.arange(num_bins, dtype=torch.float32).unsqueeze(1)
    left = mel_low + index * step
    centre = mel_low + (index + 1.0) * step
    right = mel_low + (index + 2.0) * step
    bins = torch.arange(fft_size // 2, dtype=torch.float32)
    fft_mel = mel_scale(sample_rate / fft_size * bins).unsqueeze(0)
    up = (fft_mel - left) / (centre - left)
    down = (right - fft_mel) / (right - centre)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)  # (num_bins, fft_size // 2)
    return torch.nn.functional.pad(banks, (0, 1)).T.contiguous()


def kaldi_dct(num_ceps: int = NUM_CEPS, num_bins: int = MFCC_MEL_BINS) -> torch.Tensor:
    """Kaldi's DCT-II as a ``(num_bins, num_ceps)`` matrix to right-multiply log energies.

    Orthonormal DCT-II, except that C0 is the plain sum times ``sqrt(1 / num_bins)``.
    """
    n = torch.arange(num_bins, dtype=torch.float32)
    k = torch.arange(num_bins, dtype=torch.float32).unsqueeze(1)
    dct = torch.cos(math.pi / float(num_bins) * (n + 0.5) * k)  # (k, n)
    dct[0] *= 1.0 / math.sqrt(2.0)
    dct *= math.sqrt(2.0 / float(num_bins))
    dct = dct.T.contiguous()
    dct[:, 0] = math.sqrt(1.0 / float(num_bins))
    return dct[:, :num_ceps].contiguous()


def lifter_coefficients(
    num_ceps: int = NUM_CEPS, cepstral_lifter: float = CEPSTRAL_LIFTER
) -> torch.Tensor:
    """Kaldi's cepstral liftering weights ``1 + L / 2 sin(pi i / L)`` (C0 is unchanged)."""
    i = torch.arange(num_ceps, dtype=torch.float32)
    return 1.0 + 0.5 * cepstral_lifter * torch.sin(math.pi * i / cepstral_lifter)


def deltas_into(source: torch.Tensor, out: torch.Tensor, width: int) -> None:
    """Deltas ``d_t = sum_n n (c_{t+n} - c_{t-n}) / (2 sum_n n^2)``, ``n = 1 .. width``.

    torchaudio's ``compute_deltas`` without its padding: the caller lays each utterance out
    with ``width`` copies of its first and last frame on either side (replicate padding).

    Args:
        source: ``(rows, dim)``.
        out: ``(rows - 2 * width, dim)``; row ``i`` gets the delta at ``source`` row
            ``i + width``. May be a view of the same storage, if it does not overlap
            ``source``.
    """
    rows = source.shape[0] - 2 * width
    torch.sub(source[width + 1 : width + 1 + rows], source[width - 1 : width - 1 + rows], out=out)
    for n in range(2, width + 1):
        out.add_(
            source[width + n : width + n + rows] - source[width - n : width - n + rows], alpha=n
        )
    out.div_(width * (width + 1) * (2 * width + 1) / 3)


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where each utterance lies in one flat signal that frames the whole batch.

    Each utterance starts on a multiple of the hop, so the grid frames that start inside
    it are its own frames, then two or three that run into its zero-padded tail, then
    ``margin`` more; ``2 * margin`` spare frames lead the signal and end it. The signal is
    never built whole: :meth:`read` copies out the stretch one batch of frames needs.

    Attributes:
        arrays: The utterances that have at least one frame.
        first: Grid frame (hop slot) where each of them starts.
        samples: Length of the flat signal.
    """

    arrays: list[np.ndarray]
    first: np.ndarray
    samples: int

    @classmethod
    def of(cls, arrays: list[np.ndarray], margin: int) -> _Layout:
        hop = MFCC.hop
        slots = np.array([-(-len(a) // hop) + margin for a in arrays], dtype=np.int64)
        first = 2 * margin + np.cumsum(slots) - slots
        return cls(arrays, first, (int(slots.sum()) + 4 * margin) * hop)

    @property
    def frames(self) -> int:
        """Frames on the hop grid of the flat signal."""
        return MFCC.frames(self.samples)

    def read(self, begin: int, out: np.ndarray) -> None:
        """Fills ``out`` with the flat signal from sample ``begin`` on."""
        hop, end = MFCC.hop, begin + out.size
        out[:] = 0.0
        i = max(0, int(np.searchsorted(self.first * hop, begin, side="right")) - 1)
        while i < len(self.arrays) and self.first[i] * hop < end:
            start, a = int(self.first[i]) * hop, self.arrays[i]
            lo, hi = max(begin, start), min(end, start + a.size)
            if lo < hi:
                out[lo - begin : hi - begin] = a[lo - start : hi - start]
            i += 1


class _KaldiFrontEnd:
    """Shared machinery: layout, per-frame features of every grid frame, output rows.

    Subclasses set ``spec``, ``num_mel_bins`` and ``margin`` (spare grid frames that
    :meth:`_finish` needs around each utterance), and may override :meth:`_project` and
    :meth:`_finish`.
    """

    spec: FeatureSpec
    num_mel_bins: int
    margin: int = 0
    #: Filters per matmul: see :meth:`__init__`.
    filters_per_band: int = 12

    def __init__(self, device: str | torch.device = "cpu", max_batch_seconds: float | None = None):
        """Stores the options and builds the constant matrices on ``device``.

        Args:
            device: ``cpu``, ``cuda`` or ``cuda:N``.
            max_batch_seconds: Audio whose frames are transformed at once (default 10 s on
                CPU, where a small batch stays in cache, 600 s on GPU). It bounds the
                working memory, about 2.5 MB per second of audio, and never changes a result.
        """
        self.device = torch.device(device)
        if max_batch_seconds is None:
            max_batch_seconds = 10.0 if self.device.type == "cpu" else 600.0
        if max_batch_seconds <= 0:
            raise ValueError(f"max_batch_seconds={max_batch_seconds} should be > 0")
        self.max_batch_seconds = float(max_batch_seconds)
        self._window = povey_window().to(self.device)
        # The povey window is 0 at both ends, which the flat pre-emphasis relies on.
        assert self._window[0].item() == 0.0
        # On CPU a compiled loop sums each filter over its own bins (:mod:`units.features.
        # mel_sums`: 2.5x the matmuls' speed, the same bits on any CPU and in any batch).
        # On GPU the filters take the squared real and imaginary parts of each FFT bin,
        # interleaved (one pass cheaper than forming |X|^2 first), and come in bands of
        # neighbouring filters, each band a matmul over the few FFT bins its filters cover:
        # the weights left out are exact zeros, and the matmuls shrink about twofold.
        self._mel_sums, self._bands = None, []
        if self.device.type == "cpu":
            self._mel_sums = MelSums(kaldi_mel_banks(self.num_mel_bins))
            return
        banks = kaldi_mel_banks(self.num_mel_bins).repeat_interleave(2, dim=0)
        for lo in range(0, self.num_mel_bins, self.filters_per_band):
            band = banks[:, lo : lo + self.filters_per_band]
            used = band.ne(0).any(dim=1).nonzero()
            rows = slice(int(used[0]), int(used[-1]) + 1)
            self._bands.append((rows, band[rows].contiguous().to(self.device)))

    def __call__(self, waveforms: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Features of each waveform.

        Args:
            waveforms: 16 kHz mono float waveforms in [-1, 1], any lengths.

        Returns:
            One float32 array ``(T_i, spec.dim)`` per waveform, ``T_i ==
            MFCC.frames(len(w_i))`` (no frames below 400 samples).

        Raises:
            ValueError: A waveform that is not one-dimensional.
        """
        arrays = [np.asarray(w, dtype=np.float32) for w in waveforms]
        for i, a in enumerate(arrays):
            if a.ndim != 1:
                raise ValueError(f"waveform {i} has shape {a.shape}; expected mono (samples,)")
        counts = [MFCC.frames(a.size) for a in arrays]
        framed = [a for a, n in zip(arrays, counts, strict=True) if n]
        out = [np.zeros((0, self.spec.dim), np.float32) for _ in arrays]
        if not framed:
            return out
        layout = _Layout.of(framed, self.margin)
        with torch.inference_mode():
            grid = self._frame_features(layout)
            self._finish(grid, layout.first, np.array([n for n in counts if n]))
            grid = grid.cpu().numpy()
        # Each utterance's frames are consecutive rows of the grid: return views of them.
        firsts = iter(layout.first.tolist())
        for i, n in enumerate(counts):
            if n:
                first = next(firsts)
                out[i] = grid[first : first + n]
        return out

    def _frame_features(self, layout: _Layout) -> torch.Tensor:
        """Features ``(frames, spec.dim)`` of every grid frame; :meth:`_project` fills them.

        Kaldi per frame: subtract the frame's mean, pre-emphasise (the first sample against
        itself), window, zero-pad to 512, power spectrum, mel filters, log. Batches of
        ``max_batch_seconds`` reuse the same buffers, small enough on CPU to stay in cache
        from the copy of the samples to the last matmul.
        """
        window, hop, device = MFCC.window, MFCC.hop, self.device
        frames = layout.frames
        step = min(frames, max(1, int(self.max_batch_seconds * MFCC.rate)))
        host = np.empty((step - 1) * hop + window, np.float32)
        f32 = {"device": device, "dtype": torch.float32}
        emphasised = torch.zeros(host.size, **f32)  # [0] is never written: keep it finite
        padded = torch.zeros(step, FFT_SIZE, **f32)
        out = torch.empty(frames, self.spec.dim, **f32)
        for first in range(0, frames, step):
            n = min(step, frames - first)
            size = (n - 1) * hop + window
            layout.read(first * hop, host[:size])
            x = torch.from_numpy(host[:size]).to(device)
            mean = x.as_strided((n, window), (hop, 1)).mean(1)
            # Pre-emphasis of a frame's mean-removed samples, (x[j] - m) - 0.97 (x[j-1] - m),
            # is pre-emphasis of its raw samples less 0.03 m: so it runs once over the flat
            # signal, not over 2.5 overlapping copies. Written (x[j] - x[j-1]) + 0.03
            # x[j-1], a DC offset costs no precision: close floats subtract exactly, and
            # the offset is scaled by 0.03 before it is rounded. Sample 0 of a frame, which
            # Kaldi pre-emphasises against itself, meets the window's 0 and never counts.
            y = emphasised[:size]
            torch.sub(x[1:], x[:-1], out=y[1:])
            y[1:].add_(x[:-1], alpha=_PREEMPHASIS_REST)
            windowed = padded[:n, :window]
            dc = (mean * _PREEMPHASIS_REST).unsqueeze(1)
            torch.sub(y.as_strided((n, window), (hop, 1)), dc, out=windowed).mul_(self._window)
            spectrum = torch.fft.rfft(padded[:n])
            if self._mel_sums is not None:
                mel = self._mel_sums(spectrum)
            else:
                squares = torch.view_as_real(spectrum).square_().view(n, -1)
                mel = torch.cat([squares[:, rows] @ band for rows, band in self._bands], dim=1)
            self._project(mel.clamp_min_(LOG_FLOOR).log_(), out[first : first + n])
        return out

    def _project(self, log_mel: torch.Tensor, out: torch.Tensor) -> None:
        """Writes the features of a batch of frames into ``out``, from their log-mel energies."""
        out.copy_(log_mel)

    def _finish(self, grid: torch.Tensor, first: np.ndarray, lengths: np.ndarray) -> None:
        """Completes the features in ``grid`` once every frame has been through :meth:`_project`.

        Args:
            grid: ``(frames, spec.dim)``, every grid frame.
            first: Grid row of each utterance's first frame.
            lengths: Frames of each utterance.
        """


class KaldiMFCC(_KaldiFrontEnd):
    """39-dim MFCC + delta + delta-delta, as fairseq's HuBERT k-means recipe computes it.

    Example:
        >>> import numpy as np
        >>> mfcc = KaldiMFCC()
        >>> [f.shape for f in mfcc([np.zeros(16000, np.float32), np.zeros(399, np.float32)])]
        [(98, 39), (0, 39)]
    """

    spec = MFCC_SPEC
    num_mel_bins = MFCC_MEL_BINS
    margin = (DELTA_WINDOW - 1) // 2

    def __init__(self, device: str | torch.device = "cpu", max_batch_seconds: float | None = None):
        super().__init__(device, max_batch_seconds)
        # Liftering scales each cepstrum, so it folds into the DCT's columns.
        self._dct = (kaldi_dct() * lifter_coefficients().unsqueeze(0)).to(self.device)

    def _project(self, log_mel: torch.Tensor, out: torch.Tensor) -> None:
        out[:, :NUM_CEPS] = log_mel @ self._dct

    def _finish(self, grid: torch.Tensor, first: np.ndarray, lengths: np.ndarray) -> None:
        # The spare grid frames around each utterance become copies of its first and last
        # frame (torchaudio's replicate padding), deltas run over the whole grid, the
        # deltas' spare frames are refilled the same way, and the same again for the
        # delta-deltas. No utterance sees another, and no row moves.
        width, frames = self.margin, grid.shape[0]
        last = first + lengths - 1
        spare = [first - n for n in range(1, width + 1)] + [last + n for n in range(1, width + 1)]
        edge = [first] * width + [last] * width
        spare = torch.from_numpy(np.concatenate(spare)).to(grid.device)
        edge = torch.from_numpy(np.concatenate(edge)).to(grid.device)
        static, delta, delta_delta = grid.split(NUM_CEPS, dim=1)
        static.index_copy_(0, spare, static.index_select(0, edge))
        deltas_into(static, delta[width : frames - width], width)
        delta.index_copy_(0, spare, delta.index_select(0, edge))
        deltas_into(
            delta[width : frames - width], delta_delta[2 * width : frames - 2 * width], width
        )


class KaldiFbank(_KaldiFrontEnd):
    """80-dim Kaldi log-mel filterbank (``torchaudio.compliance.kaldi.fbank``, 80 bins).

    Example:
        >>> import numpy as np
        >>> [f.shape for f in KaldiFbank()([np.zeros(560, np.float32)])]
        [(2, 80)]
    """

    spec = FBANK_SPEC
    num_mel_bins = FBANK_MEL_BINS
