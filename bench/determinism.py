"""How far features and units move across math-library settings, on real speech.

The determinism contract (README, "Determinism") promises the same bits only on one machine
type; across CPU types and BLAS/FFT builds, features within the float32 error bound of
their computation and units on at least 99.99% of frames. This measures both on the
LibriSpeech sample (``../shared/data/librispeech-sample``, 52 minutes, 251 speakers): the
MFCC features, in the label pass's batches, and their k = 100 units, computed in one
worker process per setting (the settings ``make test-numerics`` uses, which change results
on an AVX-512 Intel CPU, plus one thread), compared with the default process's.

The baseline, in the same run: an independent float32 implementation of the same
features, kaldi-native-fbank (its cepstra, with torchaudio's deltas), labelled by the same
centroids. It shows what "agree" means for two implementations of one formula, which the
settings should beat.

Usage::

    .venv/bin/python bench/determinism.py                 # the whole sample
    .venv/bin/python bench/determinism.py --files 40      # quick

Output: one ``RESULT`` line per setting and one for the baseline, with the largest
difference on cepstra, the largest difference as a share of the float32 bound
(``tests/numerics.py``), the share of frames whose unit agrees, and whether every frame
count is equal.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile
import time

from _common import REPO, prepare

prepare()

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402

DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "librispeech-sample")

K = 100

SETTINGS = {
    "default": {},
    "one_thread": {"OMP_NUM_THREADS": "1"},
    "avx2": {
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
    },
    "generic_one_thread": {
        "MKL_CBWR": "COMPATIBLE",
        "ATEN_CPU_CAPABILITY": "default",
        "OMP_NUM_THREADS": "1",
    },
}


def _has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " avx2 " in f.read()
    except OSError:
        return False


if _has_avx2():  # OpenBLAS's Haswell kernels need AVX2, as in the Makefile.
    SETTINGS["avx2"]["OPENBLAS_CORETYPE"] = "Haswell"


def load(files: int) -> tuple[list[str], list[np.ndarray]]:
    paths = sorted(glob.glob(os.path.join(DATA, "*", "*", "*.flac")))[:files]
    if not paths:
        sys.exit(f"no FLAC files under {DATA}")
    return paths, [sf.read(p, dtype="float32")[0] for p in paths]


def features(wavs: list[np.ndarray]) -> list[np.ndarray]:
    """MFCC in the label pass's batches: its own batching rule and default batch size."""
    from units.features.extractors import ExtractorOptions
    from units.features.kaldi import KaldiMFCC
    from units.stage import batches

    def never(row: dict, error: str) -> None:
        raise AssertionError(f"{row}: {error}")  # Every waveform here is decoded.

    rows = [{"key": str(i)} for i in range(len(wavs))]
    decoded = [(wav, None) for wav in wavs]
    mfcc, out = KaldiMFCC(), []
    for batch in batches(rows, decoded, ExtractorOptions("mfcc").batch_seconds, never):
        out += mfcc([wav for _, wav in batch])
    return out


def units_of(feats: list[np.ndarray], centroids: np.ndarray) -> list[np.ndarray]:
    """The nearest centroid of every frame, as the label pass's CPU workers assign it."""
    from units.kmeans.parts import Assigner

    assign = Assigner(centroids)
    return [assign(np.ascontiguousarray(f), distances=False)[0] for f in feats]


def worker(files: int, centroids_path: str, out_path: str) -> None:
    """One setting: features and units, written for the parent to compare."""
    _, wavs = load(files)
    feats = features(wavs)
    np.savez(out_path, *feats, *units_of(feats, np.load(centroids_path)))


def knf_mfcc(wavs: list[np.ndarray]) -> list[np.ndarray]:
    """kaldi-native-fbank's cepstra with torchaudio's deltas: the same 39 dimensions."""
    from tests.kaldi_reference import knf_features, torchaudio_deltas

    out = []
    for wav in wavs:
        c = knf_features(wav, mfcc=True)
        d = torchaudio_deltas(c)
        out.append(np.concatenate([c, d, torchaudio_deltas(d)], axis=1).astype(np.float32))
    return out


def compare(name: str, seconds: float, ref, got, ref_units, got_units, bounds) -> str:
    cepstra = [np.abs(a[:, :13] - b[:, :13]).max(1) for a, b in zip(ref, got, strict=True)]
    static = max(float(c.max()) for c in cepstra)
    moved = sum(int((c > 1e-4).sum()) for c in cepstra)
    share = max(
        float((np.abs(a - b) / bd).max()) for a, b, bd in zip(ref, got, bounds, strict=True)
    )
    frames = sum(len(u) for u in ref_units)
    differ = sum(int((a != b).sum()) for a, b in zip(ref_units, got_units, strict=True))
    counts = all(len(a) == len(b) for a, b in zip(ref, got, strict=True))
    same_bits = all(np.array_equal(a, b) for a, b in zip(ref, got, strict=True))
    return (
        f"RESULT bench=determinism contender={name} frames={frames} seconds={seconds:.1f} "
        f"same_bits={same_bits} max_cepstrum_diff={static:.3g} max_share_of_bound={share:.3g} "
        f"frames_cepstra_moved_over_1e-4={moved / frames:.4f} "
        f"units_differ={differ} units_agree={1 - differ / frames:.6f} "
        f"frame_counts_equal={counts} target_agree=0.9999"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=251)
    parser.add_argument("--worker", nargs=2, metavar=("CENTROIDS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.files, *args.worker)
        return

    from tests.numerics import kaldi_bound
    from units.kmeans.estimator import KMeans

    paths, wavs = load(args.files)
    hours = sum(len(w) for w in wavs) / 16_000 / 3600
    print(f"{len(paths)} files, {hours:.2f} audio hours of LibriSpeech")
    with tempfile.TemporaryDirectory() as tmp:
        centroids = os.path.join(tmp, "centroids.npy")
        fitted = KMeans(K, seed=0).fit(np.concatenate(features(wavs)))
        np.save(centroids, fitted.cluster_centers_)
        runs = {}
        for name, setting in SETTINGS.items():
            out = os.path.join(tmp, f"{name}.npz")
            env = {**os.environ, **setting}
            start = time.perf_counter()
            cmd = [sys.executable, __file__, "--files", str(args.files), "--worker", centroids, out]
            subprocess.run(cmd, check=True, env=env)
            arrays = np.load(out)
            n = len(wavs)
            runs[name] = (
                time.perf_counter() - start,
                [arrays[f"arr_{i}"] for i in range(n)],
                [arrays[f"arr_{n + i}"] for i in range(n)],
            )
        bounds = [kaldi_bound(w, mfcc=True) for w in wavs]
        _, ref, ref_units = runs["default"]
        for name, (seconds, feats, units) in runs.items():
            if name != "default":
                print(compare(name, seconds, ref, feats, ref_units, units, bounds))
        start = time.perf_counter()
        knf = knf_mfcc(wavs)
        seconds = time.perf_counter() - start
        knf_units = units_of(knf, fitted.cluster_centers_)
        print(compare("kaldi_native_fbank", seconds, ref, knf, ref_units, knf_units, bounds))


if __name__ == "__main__":
    main()
