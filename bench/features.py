"""Benchmarks of the feature extractors, one function per benchmark.

``features.mfcc``: the project's batched Kaldi MFCC (:class:`units.kaldi_features.KaldiMFCC`)
against two baselines on the same speech-like audio, on one CPU core
(``torch.set_num_threads(1)``):

* per-utterance: what fairseq's ``examples/hubert/simple_kmeans/dump_mfcc_feature.py``
  does, one ``torchaudio.compliance.kaldi.mfcc`` and two ``compute_deltas`` calls per
  utterance. torchaudio is not installed here, so :func:`per_utterance_mfcc` re-implements
  those calls in plain torch, step for step as torchaudio's source does them (mel banks,
  window and DCT rebuilt on every call, as torchaudio does).
* kaldi-native-fbank: its ``OnlineMfcc`` (C++), 13 cepstra, feeding each utterance at once
  (as a list, its quickest input) and reading every frame back into one numpy array
  (``knf``); ``knf_compute_only`` leaves out the read-back. No deltas for it: they are
  not part of it, so it does less work than the other two (39 dims).

Ours takes all the audio in one call (it batches internally); the other two take one
utterance per call, as fairseq does. Prints one line per benchmark, for example::

    RESULT bench=features.mfcc audio_s_per_s_per_core_ours=... per_utterance=... knf=...
    ratio_vs_per_utterance=... target_vs_per_utterance=3.0 ratio_vs_knf=... target_vs_knf=0.5

then each contender's best time. Rates are seconds of audio per wall second on one core,
from the best of ``--repeats`` rounds in which the contenders take turns. The run first
checks that ours and the per-utterance path agree (max |diff| over all 39 dims, also
printed, with ours against kaldi-native-fbank on the static cepstra).

Usage:
    python bench/features.py                          # 200 utterances of 2-20 s
    python bench/features.py --seconds-of-audio 300   # a quick run
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
# Import the project from the checkout, not this script's directory.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != BENCH_DIR]
sys.path.insert(0, REPO)

from shards.synthetic import speechlike  # noqa: E402 - after the sys.path fix above.
from units.kaldi_features import KaldiMFCC  # noqa: E402

SAMPLE_RATE = 16_000

#: Targets from the issue: ours / per-utterance path, ours / kaldi-native-fbank.
TARGET_VS_PER_UTTERANCE = 3.0
TARGET_VS_KNF = 0.5

#: Largest difference allowed between ours and the per-utterance path (39-dim features).
AGREEMENT_ATOL = 1e-3


# ---------------------------------------------------------------------------------------------
# Audio


def make_corpus(
    seconds_of_audio: float | None = None, utterances: int = 200, seed: int = 0
) -> list[np.ndarray]:
    """Speech-like utterances of 2-20 s: ``utterances`` of them, or ``seconds_of_audio``."""
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    total = 0.0
    while (len(out) < utterances) if seconds_of_audio is None else (total < seconds_of_audio):
        seconds = float(rng.uniform(2.0, 20.0))
        if seconds_of_audio is not None:
            seconds = min(seconds, max(2.0, seconds_of_audio - total))
        wav, _ = speechlike(seconds, seed=int(rng.integers(1 << 31)), pitch=rng.uniform(90, 220))
        out.append(wav)
        total += len(wav) / SAMPLE_RATE
    return out


# ---------------------------------------------------------------------------------------------
# Baseline: torchaudio's Kaldi MFCC and compute_deltas, one utterance at a time


def _strided(waveform: torch.Tensor, window_size: int, window_shift: int) -> torch.Tensor:
    # snip_edges=True: only frames that fit completely.
    m = 1 + (waveform.size(0) - window_size) // window_shift
    stride = waveform.stride(0)
    return waveform.as_strided((m, window_size), (window_shift * stride, stride))


def _povey(window_size: int) -> torch.Tensor:
    return torch.hann_window(window_size, periodic=False, dtype=torch.float32).pow(0.85)


def _framed(waveform: torch.Tensor) -> torch.Tensor:
    """torchaudio ``_get_window`` with Kaldi's defaults: frames ready for the FFT."""
    window_size, window_shift, padded = 400, 160, 512
    epsilon = torch.tensor(torch.finfo(torch.float).eps)
    frames = _strided(waveform, window_size, window_shift)
    frames = frames - torch.mean(frames, dim=1).unsqueeze(1)  # remove_dc_offset
    # raw_energy: torchaudio computes the log energy (floored at log(energy_floor=1.0)),
    # which use_energy=False then drops.
    _energy = torch.max(torch.max(frames.pow(2).sum(1), epsilon).log(), torch.tensor(0.0))
    shifted = torch.nn.functional.pad(frames.unsqueeze(0), (1, 0), mode="replicate").squeeze(0)
    frames = frames - 0.97 * shifted[:, :-1]
    frames = frames * _povey(window_size).unsqueeze(0)
    return torch.nn.functional.pad(frames.unsqueeze(0), (0, padded - window_size)).squeeze(0)


def _mel_scalar(freq: float) -> float:
    return 1127.0 * math.log(1.0 + freq / 700.0)


def _mel(freq: torch.Tensor) -> torch.Tensor:
    return 1127.0 * (1.0 + freq / 700.0).log()


def _mel_banks(num_bins: int, padded: int = 512, sample_freq: float = 16000.0) -> torch.Tensor:
    """torchaudio ``get_mel_banks`` (no VTLN): ``(num_bins, padded // 2)``."""
    low, high = _mel_scalar(20.0), _mel_scalar(0.5 * sample_freq)
    delta = (high - low) / (num_bins + 1)
    b = torch.arange(num_bins).unsqueeze(1)
    left, centre, right = low + b * delta, low + (b + 1.0) * delta, low + (b + 2.0) * delta
    fft_mel = _mel(sample_freq / padded * torch.arange(padded / 2)).unsqueeze(0)
    up = (fft_mel - left) / (centre - left)
    down = (right - fft_mel) / (right - centre)
    return torch.max(torch.zeros(1), torch.min(up, down))


def _fbank(waveform: torch.Tensor, num_mel_bins: int = 23) -> torch.Tensor:
    """torchaudio ``compliance.kaldi.fbank`` with Kaldi's defaults, dither 0."""
    frames = _framed(waveform[0])
    spectrum = torch.fft.rfft(frames).abs().pow(2.0)
    banks = torch.nn.functional.pad(_mel_banks(num_mel_bins), (0, 1))
    energies = torch.mm(spectrum, banks.T)
    return torch.max(energies, torch.tensor(torch.finfo(torch.float).eps)).log()


def _dct(num_ceps: int, num_bins: int) -> torch.Tensor:
    """torchaudio ``create_dct(num_bins, num_bins, "ortho")`` with Kaldi's C0 column."""
    n = torch.arange(float(num_bins))
    k = torch.arange(float(num_bins)).unsqueeze(1)
    dct = torch.cos(math.pi / float(num_bins) * (n + 0.5) * k)
    dct[0] *= 1.0 / math.sqrt(2.0)
    dct *= math.sqrt(2.0 / float(num_bins))
    dct = dct.t()
    dct[:, 0] = math.sqrt(1 / float(num_bins))
    return dct[:, :num_ceps]


def _kaldi_mfcc(waveform: torch.Tensor) -> torch.Tensor:
    """torchaudio ``compliance.kaldi.mfcc(waveform, use_energy=False)``: ``(T, 13)``."""
    feature = _fbank(waveform, 23)
    feature = feature.matmul(_dct(13, 23))
    i = torch.arange(13)
    feature *= 1.0 + 0.5 * 22.0 * torch.sin(math.pi * i / 22.0)
    return feature


def _compute_deltas(specgram: torch.Tensor, win_length: int = 5) -> torch.Tensor:
    """torchaudio ``functional.compute_deltas`` (replicate): ``(freq, time)`` in and out."""
    shape = specgram.size()
    specgram = specgram.reshape(1, -1, shape[-1])
    n = (win_length - 1) // 2
    denom = n * (n + 1) * (2 * n + 1) / 3
    specgram = torch.nn.functional.pad(specgram, (n, n), mode="replicate")
    kernel = torch.arange(-n, n + 1, 1, dtype=specgram.dtype).repeat(specgram.shape[1], 1, 1)
    out = torch.nn.functional.conv1d(specgram, kernel, groups=specgram.shape[1]) / denom
    return out.reshape(shape)


def per_utterance_mfcc(wav: np.ndarray) -> np.ndarray:
    """fairseq's ``MfccFeatureReader.get_feats`` on one waveform: ``(T, 39)`` float32."""
    with torch.no_grad():
        x = torch.from_numpy(wav).float().view(1, -1)
        mfccs = _kaldi_mfcc(x).transpose(0, 1)
        d = _compute_deltas(mfccs)
        dd = _compute_deltas(d)
        return torch.cat([mfccs, d, dd], dim=0).transpose(0, 1).contiguous().numpy()


# ---------------------------------------------------------------------------------------------
# Baseline: kaldi-native-fbank


def _knf_computer(wav: np.ndarray):
    import kaldi_native_fbank as knf

    opts = knf.MfccOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.snip_edges = True
    opts.mel_opts.num_bins = 23
    opts.num_ceps = 13
    opts.use_energy = False
    computer = knf.OnlineMfcc(opts)
    # A list is its quickest input: a numpy array is converted element by element, slower.
    computer.accept_waveform(SAMPLE_RATE, wav.tolist())
    computer.input_finished()
    return computer


def knf_mfcc(wav: np.ndarray) -> np.ndarray:
    """kaldi-native-fbank's MFCC with the same options: ``(T, 13)`` float32."""
    computer = _knf_computer(wav)
    return np.stack([computer.get_frame(i) for i in range(computer.num_frames_ready)])


# ---------------------------------------------------------------------------------------------
# Timing


def best_seconds(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """The shortest wall time of each of ``runs``, over ``repeats`` rounds.

    Contenders take turns within a round, so a load that comes and goes on the machine
    falls on all of them alike.
    """
    best = dict.fromkeys(runs, math.inf)
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def bench_mfcc(audio: Sequence[np.ndarray], repeats: int = 3) -> dict[str, float]:
    """``features.mfcc``: ours, the per-utterance path and kaldi-native-fbank on one core.

    Returns:
        Audio seconds per wall second for each contender.
    """
    seconds = sum(len(w) for w in audio) / SAMPLE_RATE
    ours = KaldiMFCC()

    got = ours(audio)
    expected = [per_utterance_mfcc(w) for w in audio]
    if any(a.shape != b.shape for a, b in zip(got, expected, strict=True)):
        raise SystemExit("ours and the per-utterance path give different frame counts")
    worst = max(float(np.abs(a - b).max()) for a, b in zip(got, expected, strict=True))
    if worst > AGREEMENT_ATOL:
        raise SystemExit(f"ours and the per-utterance path disagree: max |diff| {worst:.2e}")
    knf_worst = max(
        float(np.abs(a[:, :13] - knf_mfcc(w)).max())
        for a, w in zip(got[:10], audio[:10], strict=True)
    )

    runs = {
        "ours": lambda: ours(audio),
        "per_utterance": lambda: [per_utterance_mfcc(w) for w in audio],
        "knf": lambda: [knf_mfcc(w) for w in audio],
        # Without reading the frames back: the C++ work alone, for reference.
        "knf_compute_only": lambda: [_knf_computer(w) for w in audio],
    }
    best = best_seconds(runs, repeats)
    rate = {name: seconds / t for name, t in best.items()}
    print(
        f"RESULT bench=features.mfcc audio_s={seconds:.0f} utterances={len(audio)} threads=1"
        f" audio_s_per_s_per_core_ours={rate['ours']:.0f}"
        f" per_utterance={rate['per_utterance']:.0f} knf={rate['knf']:.0f}"
        f" ratio_vs_per_utterance={rate['ours'] / rate['per_utterance']:.2f}"
        f" target_vs_per_utterance={TARGET_VS_PER_UTTERANCE}"
        f" ratio_vs_knf={rate['ours'] / rate['knf']:.2f} target_vs_knf={TARGET_VS_KNF}"
        f" knf_compute_only={rate['knf_compute_only']:.0f}"
        f" max_abs_diff_vs_per_utterance={worst:.1e} max_abs_diff_vs_knf_static={knf_worst:.1e}",
        flush=True,
    )
    for name, t in best.items():
        print(f"  {name:18s} best of {repeats}: {t:8.3f} s  ({rate[name]:7.0f} audio s/s)")
    return rate


#: Every benchmark, by name; ``main`` runs them in this order.
BENCHMARKS: dict[str, Callable[[Sequence[np.ndarray], int], dict[str, float]]] = {
    "mfcc": bench_mfcc,
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds-of-audio",
        type=float,
        default=None,
        help="audio to generate (utterances of 2-20 s); default: 200 utterances",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the best counts")
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    audio = make_corpus(args.seconds_of_audio)
    for name in args.only or list(BENCHMARKS):
        BENCHMARKS[name](audio, args.repeats)


if __name__ == "__main__":
    main()
