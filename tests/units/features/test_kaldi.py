"""Kaldi MFCC and fbank: against kaldi-native-fbank, the delta formula, the frame contract
and batching."""

import numpy as np
import pytest
import torch

from shards.synthetic import speechlike
from tests.conftest import tone
from tests.kaldi_reference import knf_features, torchaudio_deltas
from tests.numerics import assert_within, kaldi_bound
from units.features.extractor import FBANK_SPEC, MFCC_SPEC
from units.features.frames import MFCC
from units.features.kaldi import LOG_FLOOR, KaldiFbank, KaldiMFCC

#: Largest |ours - kaldi-native-fbank| on cepstra (up to ~100) and log-mel energies: both
#: are float32 with their own FFTs; seen up to 6e-4 on these signals.
KNF_ATOL = 2e-3
#: The same near the float32 floor of the mel energies (see the silence test): seen 1.2e-2.
FLOOR_ATOL = 3e-2


def _chirp(seconds: float, silence: tuple[int, int] | None = None) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    x = (0.5 * np.sin(2 * np.pi * (100 * t + 2500 * t**2))).astype(np.float32)
    if silence:
        x[silence[0] : silence[1]] = 0.0
    return x


def _signals() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "speech": speechlike(1.5, seed=3)[0],
        "white_noise": (0.3 * rng.standard_normal(20_000)).astype(np.float32),
        "quiet_noise": (1e-3 * rng.standard_normal(20_000)).astype(np.float32),
        "tone_with_dc_offset": tone(1.2, 16000, freq=440.0) + np.float32(0.2),
        "chirp_in_noise": _chirp(1.0) + (0.05 * rng.standard_normal(16_000)).astype(np.float32),
        "clipped_noise": np.clip(rng.standard_normal(9_001), -1, 1).astype(np.float32),
    }


SIGNALS = _signals()


@pytest.fixture(scope="module")
def ours() -> dict[str, dict[str, np.ndarray]]:
    """Both extractors on every signal, all signals in one batch."""
    names = list(SIGNALS)
    mfcc = KaldiMFCC()(list(SIGNALS.values()))
    fbank = KaldiFbank()(list(SIGNALS.values()))
    return {
        "mfcc": dict(zip(names, mfcc, strict=True)),
        "fbank": dict(zip(names, fbank, strict=True)),
    }


@pytest.mark.parametrize("name", list(SIGNALS))
def test_static_cepstra_match_kaldi_native_fbank(ours, name):
    expected = knf_features(SIGNALS[name], mfcc=True)
    got = ours["mfcc"][name]
    assert got.shape == (len(expected), 39) and got.dtype == np.float32
    np.testing.assert_allclose(got[:, :13], expected, rtol=0, atol=KNF_ATOL)


@pytest.mark.parametrize("name", list(SIGNALS))
def test_log_mel_fbank_matches_kaldi_native_fbank(ours, name):
    expected = knf_features(SIGNALS[name], mfcc=False)
    got = ours["fbank"][name]
    assert got.shape == (len(expected), 80) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=KNF_ATOL)


def test_digital_silence_is_the_log_floor_and_precision_ends_near_it():
    wav = _chirp(1.5, silence=(8000, 12000))
    got, expected = KaldiFbank()([wav])[0], knf_features(wav, mfcc=False)
    silent = [t for t in range(len(got)) if t * 160 >= 8000 and t * 160 + 400 <= 12000]
    assert len(silent) == 23
    np.testing.assert_array_equal(got[silent], np.float32(np.log(LOG_FLOOR)))
    np.testing.assert_array_equal(expected[silent], got[silent])
    # Frames that only graze the silence have mel energies down near the float32 floor
    # (1.2e-7), where float32 FFT rounding, relative to the frame's loudest bins, is all
    # that is left: both sides are about 1e-2 apart there, and KNF_ATOL apart above 1e-5.
    audible = expected > np.log(1e-5)
    np.testing.assert_allclose(got[audible], expected[audible], rtol=0, atol=KNF_ATOL)
    np.testing.assert_allclose(got, expected, rtol=0, atol=FLOOR_ATOL)


def test_deltas_follow_the_formula_with_each_utterance_its_own_edges():
    rng = np.random.default_rng(1)
    # 1 to 6 frames (shorter than the delta window, and the two windows in a row), then
    # longer ones, all in one batch so that the edges of neighbours are right next door.
    lengths = [MFCC.samples_for(t) for t in range(1, 7)] + [5_000, 16_017, 33_333]
    wavs = [speechlike(n / 16000, seed=int(rng.integers(1000)))[0][:n] for n in lengths]
    for features, n in zip(KaldiMFCC()(wavs), lengths, strict=True):
        assert len(features) == MFCC.frames(n)
        static = features[:, :13]
        delta = torchaudio_deltas(static)
        np.testing.assert_allclose(features[:, 13:26], delta, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(features[:, 26:], torchaudio_deltas(delta), rtol=1e-5, atol=2e-5)
        if len(static) == 1:
            assert not features[:, 13:].any()


BOUNDARY_LENGTHS = [0, 1, 399, 400, 401, 559, 560, 561, 719, 720, 721, 16_000, 16_001, 48_123]
BOUNDARY_FRAMES = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 98, 98, 299]


@pytest.mark.parametrize("cls", [KaldiMFCC, KaldiFbank])
def test_frame_counts_follow_the_contract_at_every_boundary(cls):
    assert [MFCC.frames(n) for n in BOUNDARY_LENGTHS] == BOUNDARY_FRAMES
    rng = np.random.default_rng(2)
    wavs = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in BOUNDARY_LENGTHS]
    extractor = cls()
    batched = extractor(wavs)
    assert len(batched) == len(wavs)
    for wav, frames, features in zip(wavs, BOUNDARY_FRAMES, batched, strict=True):
        assert features.shape == (frames, cls.spec.dim)
        assert features.dtype == np.float32
        assert extractor([wav])[0].shape == (frames, cls.spec.dim)
        assert np.isfinite(features).all()


@pytest.mark.parametrize("cls", [KaldiMFCC, KaldiFbank])
def test_batching_changes_a_result_only_within_float32_rounding(cls):
    rng = np.random.default_rng(3)
    lengths = [400, 48_017, 0, 401, 1_234, 399, 160_000, 560, 7_919, 721, 32_000]
    wavs = [
        speechlike(max(n, 1) / 16000, seed=i)[0][:n] + np.float32(0.01 * i)
        for i, n in enumerate(lengths)
    ]
    wavs[4] = (0.5 * rng.standard_normal(lengths[4])).astype(np.float32)
    alone = [cls()([w])[0] for w in wavs]
    # In exact arithmetic batching changes nothing: each utterance has its own frames and
    # edges. In float32 the batch decides the shapes of the FFT and GEMM calls, and MKL
    # picks kernels (so orders of summation) by shape and CPU: other bits on an AVX2 or AMD
    # CPU (up to 1.9e-5 on cepstra of magnitude 34). The bound is the float32 error of the
    # computation, value by value (tests/numerics.py).
    bounds = [kaldi_bound(w, mfcc=cls is KaldiMFCC) for w in wavs]
    runs = {
        "batched": cls()(wavs),
        "reversed": cls()(wavs[::-1])[::-1],
        # Batches of 5 frames: utterances split across batches, and float64 input.
        "small batches": cls(max_batch_seconds=0.05)([w.astype(np.float64) for w in wavs]),
    }
    for name, out in runs.items():
        for i, (a, b, bound) in enumerate(zip(out, alone, bounds, strict=True)):
            assert a.shape == b.shape == (MFCC.frames(lengths[i]), cls.spec.dim), name
            assert_within(a, b, bound, f"{name}, utterance {i}")
    # The bound is tight enough to catch a real bug: a Hamming window instead of povey's.
    wrong = cls()
    wrong._window = torch.hamming_window(MFCC.window, periodic=False)
    with pytest.raises(AssertionError, match="exceeds the float32 bound"):
        for i, (a, b) in enumerate(zip(wrong(wavs), alone, strict=True)):
            assert_within(a, b, bounds[i], f"hamming, utterance {i}")


def test_specs_and_inputs():
    assert KaldiMFCC.spec is MFCC_SPEC and MFCC_SPEC.dim == 39
    assert KaldiFbank.spec is FBANK_SPEC and FBANK_SPEC.dim == 80
    assert KaldiMFCC()([]) == []
    (short,) = KaldiMFCC()([np.zeros(10, np.float32)])
    assert short.shape == (0, 39) and short.dtype == np.float32
    with pytest.raises(ValueError, match="expected mono"):
        KaldiMFCC()([np.zeros((1000, 2), np.float32)])
    with pytest.raises(ValueError, match="max_batch_seconds"):
        KaldiFbank(max_batch_seconds=0)
