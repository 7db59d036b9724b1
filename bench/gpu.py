"""GPU throughput of the label pass's two halves, against the same code on the node's CPUs.

Runs where a CUDA GPU is (the device machine; never in CI). With a wav2vec 2.0 large-shaped
model (24 blocks, 1024 wide, random weights: speed does not depend on the values):

- ``ssl``: layer-14 features, float32 and bf16 autocast, in audio hours per second;
  the CPU baseline runs a few utterances on all of the node's cores.
- ``mfcc``: our Kaldi MFCC on the GPU and on the CPU.
- ``assign``: nearest of 500 centroids for 768-d frames (HuBERT iteration 2's shape) with
  the GPU search and with the CPU GEMM argmin.
- ``label``: the label worker's loop end to end, as ``units.stage`` runs it on a GPU actor:
  FLAC members decoded by ``GPU_DECODE_THREADS`` threads ahead of the batches
  (``units.stage.read_ahead``), cut at the stage's batch seconds, layer features (bf16
  autocast) and the nearest of k centroids on the GPU (units come back). HuBERT-base-shaped
  layer 9 with k = 500, and wav2vec 2.0-large-shaped layer 14, on ``--hours`` of 2-20 s
  utterances (default 2). Reports audio hours per GPU hour (= times real time), model FLOPs
  utilisation (:mod:`units.features.flops`: the conv front end and the blocks run, real
  audio only, over the GPU's dense bf16 peak), the padding share of the samples run, and
  the CPU cores that decoding at that rate takes (decode rate of one core measured on the
  same members).

Prints ``RESULT`` lines with the GPU/CPU ratios.

Example:
    python bench/gpu.py [--quick]
    python bench/gpu.py --only label --device cpu --hours 0.02   # the label path on a CPU
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

from shards.core.placement import GPU_DECODE_THREADS
from shards.reader import decode_member
from shards.synthetic import speechlike
from units.features.extractors import ExtractorOptions
from units.features.flops import ssl_flops
from units.features.kaldi import KaldiMFCC
from units.features.ssl import SSLExtractor, load_hf
from units.kmeans.parts import Assigner
from units.labels.model import KMeansModel
from units.labels.stage import Labeller
from units.stage import READ_AHEAD_ROWS_PER_THREAD, batches, read_ahead

#: Dense bf16 peak, TFLOP/s, of the GPUs the device machines have (vendor data sheets,
#: SXM parts, without sparsity); other GPUs: --peak-tflops.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}


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


def _base(directory):
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(0)
    HubertModel(HubertConfig()).save_pretrained(directory)  # The defaults are HuBERT base.


def _flac_corpus(hours, seed=0, distinct=48):
    """FLAC members of 2-20 s speech-like audio adding up to ``hours``: ``distinct`` clips
    encoded once and repeated (decoding costs the same every time)."""
    import io

    import soundfile as sf

    rng = np.random.default_rng(seed)
    clips = []
    for i in range(distinct):
        audio, _ = speechlike(float(rng.uniform(2, 20)), seed=seed + i)
        buffer = io.BytesIO()
        sf.write(buffer, audio, 16000, subtype="PCM_16", format="FLAC")
        clips.append((buffer.getvalue(), len(audio)))
    members, samples = [], 0
    while samples < hours * 3600 * 16000:
        data, n = clips[len(members) % distinct]
        members.append((data, n))
        samples += n
    return members, samples


def _peak_tflops(device, given):
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def bench_label(hours, device, peak_tflops, k=500):
    """The GPU actor's loop of the label pass: decode ahead, bucket, features, units."""
    members, samples = _flac_corpus(hours)
    audio_seconds = samples / 16000
    started = time.perf_counter()  # One core decoding each distinct clip once.
    decoded = sum(decode_member(data)[0].size for data, _ in members[:48]) / 16000
    decode_x_per_core = decoded / (time.perf_counter() - started)
    dtype = "bf16" if device.type == "cuda" else None
    options = ExtractorOptions("hf", layer=1, device=device.type, dtype=dtype)
    peak = _peak_tflops(device, peak_tflops)
    rng = np.random.default_rng(0)
    for case, make, layer in (("hubert_base_layer9", _base, 9), ("w2v2_large_layer14", _large, 14)):
        with tempfile.TemporaryDirectory() as directory:
            make(directory)
            bundle = load_hf(directory, device=device)
            extract = SSLExtractor(
                bundle, layer, device=device, dtype=dtype, batch_seconds=options.batch_seconds
            )
            centroids = rng.standard_normal((k, extract.spec.dim)).astype(np.float32)
            model = KMeansModel("bench", extract.spec, centroids, None, None, {})
            loop = LabelLoop(extract, model, bundle.model, layer, options.bucket, device)
            loop(members[:8])  # Warm-up: kernels, allocator, autotuning.
            extract.samples_run = extract.samples_audio = 0
            started = time.perf_counter()
            frames, flops = loop(members)
            seconds = time.perf_counter() - started
            x_real = audio_seconds / seconds
            mfu = f"{flops / seconds / (peak * 1e12):.3f}" if peak else "n/a"
            print(
                f"RESULT bench=gpu case=label_{case} device={device.type} dtype={dtype or 'fp32'}"
                f" k={k} hours={audio_seconds / 3600:.2f} seconds={seconds:.2f}"
                f" audio_hours_per_gpu_hour={x_real:.0f} frames={frames}"
                f" model_tflops={flops / seconds / 1e12:.2f} mfu_bf16={mfu}"
                f" bucket_seconds={options.bucket:g}"
                f" padding_fraction={extract.padding_fraction:.3f}"
                f" decode_threads={GPU_DECODE_THREADS}"
                f" decode_x_real_per_core={decode_x_per_core:.0f}"
                f" cores_to_decode={x_real / decode_x_per_core:.2f} target_x_real=20000",
                flush=True,
            )


class LabelLoop:
    """What a GPU label actor does with a shard's members, less the Parquet: the stage's own
    code (:func:`units.stage.read_ahead` decoding ahead on ``GPU_DECODE_THREADS`` threads,
    :func:`units.stage.batches` cutting buckets of ``bucket`` seconds,
    :meth:`units.labels.stage.Labeller.units`: features left on the device and units found
    there) on in-memory members. Returns the frames labelled and the model FLOPs."""

    def __init__(self, extract, model, module, layer, bucket, device):
        self.labeller = Labeller.of(model, extract, device.type)
        self.module, self.layer, self.bucket, self.device = module, layer, bucket, device

    def __call__(self, members):
        rows = [{"key": str(i), "num_samples": n} for i, (_, n) in enumerate(members)]
        threads = GPU_DECODE_THREADS
        window = READ_AHEAD_ROWS_PER_THREAD * threads
        decoded = read_ahead([data for data, _ in members], _decoded, threads, window)
        frames = flops = 0
        for batch in batches(rows, decoded, self.bucket, _never_rejected):
            frames += sum(len(u) for u in self.labeller.units(batch))
            flops += sum(ssl_flops(self.module, wav.size, self.layer) for _, wav in batch)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return frames, flops


def _decoded(data: bytes):
    """``(waveform, None)`` as :func:`units.stage.decode_row` gives for a good member."""
    return decode_member(data)[0], None


def _never_rejected(row, error):
    raise RuntimeError(f"member {row['key']} did not decode: {error}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["assign", "mfcc", "ssl", "label"])
    parser.add_argument("--hours", type=float, default=2.0, help="label: audio hours")
    parser.add_argument("--device", default="cuda", help="label: cuda, or cpu to try the path")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (not a GPU figure)"
    print(f"# {name} torch {torch.__version__} cpus {os.cpu_count()}")
    cases = {
        "assign": lambda: bench_assign(args.quick),
        "mfcc": lambda: bench_mfcc(args.quick),
        "ssl": lambda: bench_ssl(args.quick),
        "label": lambda: bench_label(args.hours, device, args.peak_tflops),
    }
    for case, run in cases.items():
        if args.only in (None, case) and (device.type == "cuda" or case == "label"):
            run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
