"""Independent references for the Kaldi front end: kaldi-native-fbank and torchaudio's deltas.

Shared by the feature tests and ``bench/determinism.py``, so that both compare against the
same configuration of the same implementations.
"""

from __future__ import annotations

import kaldi_native_fbank as knf
import numpy as np


def knf_features(wav: np.ndarray, mfcc: bool) -> np.ndarray:
    """kaldi-native-fbank with the options torchaudio's Kaldi defaults amount to: 13 cepstra
    (no deltas) or 80 log-mel energies, ``(T, 13 | 80)`` float32."""
    if mfcc:
        opts = knf.MfccOptions()
        opts.num_ceps = 13
        opts.cepstral_lifter = 22.0
        opts.use_energy = False
        opts.mel_opts.num_bins = 23
    else:
        opts = knf.FbankOptions()
        opts.use_energy = False
        opts.mel_opts.num_bins = 80
    opts.frame_opts.samp_freq = 16000
    opts.frame_opts.dither = 0.0
    opts.frame_opts.snip_edges = True
    opts.frame_opts.window_type = "povey"
    opts.frame_opts.preemph_coeff = 0.97
    opts.frame_opts.remove_dc_offset = True
    opts.mel_opts.low_freq = 20.0
    opts.mel_opts.high_freq = 0.0
    computer = knf.OnlineMfcc(opts) if mfcc else knf.OnlineFbank(opts)
    computer.accept_waveform(16000, wav.tolist())
    computer.input_finished()
    frames = [computer.get_frame(i) for i in range(computer.num_frames_ready)]
    return np.stack(frames) if frames else np.zeros((0, 13 if mfcc else 80), np.float32)


def torchaudio_deltas(c: np.ndarray) -> np.ndarray:
    """torchaudio's compute_deltas (win_length 5, replicate padding), written out in float64."""
    c = c.astype(np.float64)
    t = np.arange(len(c))
    last = len(c) - 1
    out = np.zeros_like(c)
    for n in (1, 2):
        out += n * (c[np.minimum(t + n, last)] - c[np.maximum(t - n, 0)])
    return out / (2 * (1**2 + 2**2))
