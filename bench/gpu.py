"""GPU throughput of the label pass's two halves, against the same code on the node's CPUs.

Runs where a CUDA GPU is (the device machine; never in CI). With a wav2vec 2.0 large-shaped
model (24 blocks, 1024 wide, random weights: speed does not depend on the values):

- ``ssl``: layer-14 features, float32 and bf16 autocast, in audio hours per second;
  the CPU baseline runs a few utterances on all of the node's cores.
- ``mfcc``: our Kaldi MFCC on the GPU and on the CPU.
- ``assign``: nearest of 500 centroids for 768-d frames (HuBERT iteration 2's shape) with
  the GPU search and with the CPU GEMM argmin.

Prints ``RESULT`` lines with the GPU/CPU ratios.

Example:
    python bench/gpu.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from units.features.kaldi import KaldiMFCC
from units.features.ssl import SSLExtractor, load_hf
from units.kmeans.parts import Assigner


def _timed(fn, repeat=1):
    fn()  # Warm-up: CUDA context, kernels, allocator.
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


def _audio(seconds, count, seed=0):
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)] * count


def _large(directory):
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(0)
    config = Wav2Vec2Config(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        conv_bias=True,
    )
    Wav2Vec2Model(config).save_pretrained(directory)


def bench_ssl(quick):
    with tempfile.TemporaryDirectory() as directory:
        _large(directory)
        gpu_wavs = _audio(15, 8 if quick else 48)
        hours = sum(map(len, gpu_wavs)) / 16000 / 3600
        rates = {}
        for dtype in (None, "bf16"):
            extract = SSLExtractor(
                load_hf(directory, device="cuda"), 14, device="cuda", dtype=dtype
            )
            seconds = _timed(lambda e=extract: e(gpu_wavs))
            rates[dtype or "fp32"] = hours / seconds
            print(
                f"RESULT bench=gpu case=ssl_large_layer14 contender=gpu_{dtype or 'fp32'} "
                f"hours_per_second={hours / seconds:.4f} seconds={seconds:.2f} hours={hours:.3f}"
            )
        cpu_wavs = _audio(15, 2)
        cpu_hours = sum(map(len, cpu_wavs)) / 16000 / 3600
        extract = SSLExtractor(load_hf(directory), 14, threads=os.cpu_count())
        seconds = _timed(lambda: extract(cpu_wavs))
        cpu_rate = cpu_hours / seconds
        print(
            f"RESULT bench=gpu case=ssl_large_layer14 contender=cpu_{os.cpu_count()}cores "
            f"hours_per_second={cpu_rate:.5f} seconds={seconds:.2f}"
        )
        for name, rate in rates.items():
            print(f"RESULT bench=gpu case=ssl_large_layer14 {name}_vs_cpu={rate / cpu_rate:.1f}")


def bench_mfcc(quick):
    wavs = _audio(20, 90 if quick else 360)
    hours = sum(map(len, wavs)) / 16000 / 3600
    gpu = _timed(lambda: KaldiMFCC(device="cuda")(wavs))
    cpu = _timed(lambda: KaldiMFCC()(wavs))
    print(
        f"RESULT bench=gpu case=mfcc hours={hours:.2f} gpu_hours_per_second={hours / gpu:.2f} "
        f"cpu_hours_per_second={hours / cpu:.2f} gpu_vs_cpu={cpu / gpu:.1f}"
    )


def bench_assign(quick):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200_000 if quick else 1_000_000, 768)).astype(np.float32)
    c = rng.standard_normal((500, 768)).astype(np.float32)
    gpu_assigner, cpu_assigner = Assigner(c, device="cuda"), Assigner(c)
    gpu = _timed(lambda: gpu_assigner(x, distances=False))
    cpu = _timed(lambda: cpu_assigner(x, distances=False))
    same = float((gpu_assigner(x[:50_000])[0] == cpu_assigner(x[:50_000])[0]).mean())
    print(
        f"RESULT bench=gpu case=assign_768d_k500 frames={len(x)} "
        f"gpu_frames_per_second={len(x) / gpu:.0f} cpu_frames_per_second={len(x) / cpu:.0f} "
        f"gpu_vs_cpu={cpu / gpu:.1f} label_agreement={same:.5f}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} cpus {os.cpu_count()}")
    bench_assign(args.quick)
    bench_mfcc(args.quick)
    bench_ssl(args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
