"""FLAC decoders side by side on the shards' own members and on real LibriSpeech FLAC.

Every stage reads audio through ``shards.reader.decode_member``: FLAC members of the shard
tars to float32 waveforms. This script times the decoders it could use, one core, on the same bytes
in memory, and checks that each gives libsndfile's float32 samples bit for bit (shape,
dtype, rate and every sample, ``np.array_equal``):

* ``libsndfile``: ``soundfile.read(BytesIO(data), dtype="float32")``, what the reader used
  alone before, and still its fallback.
* ``unitpipe``: ``shards.reader.decode_member`` as the stages run it: dr_flac (miniaudio's build)
  straight into a numpy array after the checks that send anything unusual to libsndfile
  (plain metadata, frames back to back and numbered, CRC-16s, STREAMINFO's length).
* ``drflac_raw``: the same dr_flac calls without those checks: what the checks cost.
* ``miniaudio_flac_read_s16``: miniaudio's public ``flac_read_s16`` (an ``array.array`` copy),
  then ``int16 / 32768`` in float32.
* ``miniaudio_decode``: miniaudio's generic ``decode(data, SIGNED16, nchannels=1,
  sample_rate=<the file's>)`` (its ``ma_decoder``), then the same conversion.
* ``pyav``: FFmpeg's FLAC decoder through PyAV (``av``), frames to int16/int32, concatenated,
  scaled like libsndfile. A baseline only, never a dependency: skipped, with a line saying
  so, where ``av`` is not importable (install it by hand: ``pip install av``).

Corpora:

* ``shards``: the members of a root the shard stage made (on local Ray, two cores) from a
  synthetic corpus: 16 kHz FLAC in the LibriSpeech layout (stored as they are) and the same
  kind of speech as 48 kHz 16-bit WAV (resampled and encoded by the stage). Made once, kept
  under ``--workdir`` (``bench-output/decode/``).
* ``librispeech-sample``: every ``*.flac`` under ``--librispeech`` (default
  ``/work/shared/data/librispeech-sample``); skipped with a note where it does not exist.

Prints, per corpus and decoder::

    RESULT bench=decode corpus=shards members=... audio_s=... decoder=unitpipe
        x_realtime=... ratio_vs_libsndfile=... identical=True MBps=... fast_share=1.000

``x_realtime``: audio seconds decoded per wall second (median of ``--repeats`` rounds,
contenders taking turns, one thread). ``ratio_vs_libsndfile``: its rate over libsndfile's.
``fast_share`` (``unitpipe`` only): the share of members dr_flac decoded (the rest went to
libsndfile).

Usage:
    python bench/decode.py                # about a minute once the corpus is made
    python bench/decode.py --repeats 3 --files 60
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import shutil
import statistics
import sys
import tarfile
import time
from collections.abc import Callable

import numpy as np
from _common import REPO, busy_cores, prepare

prepare()

CORES = 2  # For making the corpus only: the decoders run on one core in this process.


def build_shards(workdir: str, files: int, seed: int) -> str:
    """A shard root made by the shard stage (reused when an earlier run made it)."""
    base = os.path.join(workdir, "decode", f"corpus-{files}files-seed{seed}")
    root, ready = os.path.join(base, "root"), os.path.join(base, "ready.json")
    if os.path.exists(ready):
        return root
    import ray
    import soundfile as sf

    from shards.plan import ShardingOptions
    from shards.ray_sharding import run as shard
    from shards.synthetic import speechlike, write_librispeech

    shutil.rmtree(base, ignore_errors=True)
    started = time.perf_counter()
    flac_dir, wav_dir = os.path.join(base, "flac"), os.path.join(base, "wav48k")
    speakers = max(1, files * 3 // 4 // 10)
    write_librispeech(flac_dir, speakers=speakers, chapters=2, utterances=5, seconds=(2, 16))
    rng = np.random.default_rng(seed)
    os.makedirs(wav_dir)
    for i in range(max(1, files // 4)):
        wav, _ = speechlike(rng.uniform(2, 16), rate=48_000, seed=int(rng.integers(1 << 31)))
        sf.write(os.path.join(wav_dir, f"w48k_{i:04d}.wav"), wav, 48_000, subtype="PCM_16")
    ray.init(num_cpus=CORES, include_dashboard=False, log_to_driver=False)
    try:
        shard([flac_dir, wav_dir], root, ShardingOptions(layout="dir", max_samples=64))
    finally:
        ray.shutdown()
    with open(ready, "w") as f:
        json.dump({"files": files, "seed": seed}, f)
    print(f"  made {root} in {time.perf_counter() - started:.0f} s", flush=True)
    return root


def shard_members(root: str) -> list[bytes]:
    members = []
    for path in sorted(glob.glob(os.path.join(root, "shards", "*.tar"))):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".flac"):
                    members.append(tar.extractfile(member).read())
    return members


def _scaled(samples: np.ndarray, bits: int) -> np.ndarray:
    """libsndfile's float32 of integer samples: exact (a power-of-two scale)."""
    return np.multiply(samples, np.float32(2.0 ** -(bits - 1)), dtype=np.float32)


def decoders() -> tuple[dict[str, Callable], list[str]]:
    """The contenders that can run here, and a line for each one that cannot."""
    import soundfile as sf

    from shards import reader

    found: dict[str, Callable] = {
        "libsndfile": lambda data: sf.read(io.BytesIO(data), dtype="float32"),
        "unitpipe": reader.decode_member,
    }
    skipped = []
    try:
        import miniaudio
    except ImportError as e:
        skipped.append(f"miniaudio is not importable ({e})")
    else:
        lib, ffi = miniaudio.lib, miniaudio.ffi

        def drflac_raw(data: bytes):
            handle = lib.ma_dr_flac_open_memory(data, len(data), ffi.NULL)
            try:
                total, rate = handle.totalPCMFrameCount, handle.sampleRate
                out = np.empty(total, np.float32)
                n = lib.ma_dr_flac_read_pcm_frames_f32(
                    handle, total, ffi.from_buffer("float *", out)
                )
            finally:
                lib.ma_dr_flac_close(handle)
            return out[:n], rate

        def flac_read_s16(data: bytes):
            decoded = miniaudio.flac_read_s16(data)
            return _scaled(np.frombuffer(decoded.samples, np.int16), 16), decoded.sample_rate

        def decode(data: bytes):
            rate = miniaudio.flac_get_info(data).sample_rate
            decoded = miniaudio.decode(
                data, miniaudio.SampleFormat.SIGNED16, nchannels=1, sample_rate=rate
            )
            return _scaled(np.frombuffer(decoded.samples, np.int16), 16), decoded.sample_rate

        found.update(
            drflac_raw=drflac_raw, miniaudio_flac_read_s16=flac_read_s16, miniaudio_decode=decode
        )
    try:
        import av
    except ImportError as e:
        skipped.append(f"pyav: av is not importable ({e}); install it by hand to compare")
    else:

        def pyav(data: bytes):
            with av.open(io.BytesIO(data), format="flac") as container:
                stream = container.streams.audio[0]
                parts = [frame.to_ndarray() for frame in container.decode(stream)]
                bits = 16 if stream.format.name.startswith("s16") else 32
                return _scaled(np.concatenate(parts, axis=1)[0], bits), stream.rate

        found["pyav"] = pyav
    return found, skipped


def same(a: tuple[np.ndarray, int], b: tuple[np.ndarray, int]) -> bool:
    return (
        a[1] == b[1]
        and a[0].dtype == b[0].dtype
        and a[0].shape == b[0].shape
        and np.array_equal(a[0], b[0])
    )


def bench_corpus(name: str, members: list[bytes], contenders: dict, repeats: int) -> list[str]:
    from shards import reader

    reference = [contenders["libsndfile"](data) for data in members]
    audio_s = sum(len(wav) / rate for wav, rate in reference)
    identical = {}
    for decoder, fn in contenders.items():
        try:
            identical[decoder] = all(
                same(fn(data), ref) for data, ref in zip(members, reference, strict=True)
            )
        except Exception as e:  # A contender that cannot decode these: reported, not timed.
            identical[decoder] = f"error:{type(e).__name__}"
    fast_share = sum(reader._decode_flac(data) is not None for data in members) / len(members)
    times: dict[str, list[float]] = {d: [] for d in contenders if identical[d] is True}
    busy = busy_cores()
    if busy > 0.3:
        print(f"warning: {busy:.1f} cores busy before timing {name}; noisy numbers", flush=True)
    for _ in range(repeats):
        for decoder in times:
            fn = contenders[decoder]
            started = time.perf_counter()
            for data in members:
                fn(data)
            times[decoder].append(time.perf_counter() - started)
    base = audio_s / statistics.median(times["libsndfile"])
    lines = []
    total_mb = sum(len(m) for m in members) / 1e6
    for decoder in contenders:
        head = f"RESULT bench=decode corpus={name} members={len(members)} audio_s={audio_s:.1f}"
        if decoder not in times:
            lines.append(f"{head} decoder={decoder} identical={identical[decoder]}")
            continue
        rate = audio_s / statistics.median(times[decoder])
        line = (
            f"{head} decoder={decoder} x_realtime={rate:.0f} ratio_vs_libsndfile={rate / base:.2f}"
            f" identical={identical[decoder]} MBps={total_mb * rate / audio_s:.1f}"
        )
        if decoder == "unitpipe":
            line += f" fast_share={fast_share:.3f}"
        lines.append(line)
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=os.path.join(REPO, "bench-output"))
    parser.add_argument("--files", type=int, default=200, help="inputs of the shard corpus")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--librispeech", default="/work/shared/data/librispeech-sample")
    parser.add_argument("--only", choices=["shards", "librispeech-sample"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.chdir(REPO)  # Ray puts the current directory on its workers' sys.path (_common).
    contenders, skipped = decoders()
    corpora: list[tuple[str, list[bytes]]] = []
    if args.only in (None, "shards"):
        root = build_shards(os.path.abspath(args.workdir), args.files, args.seed)
        corpora.append(("shards", shard_members(root)))
    if args.only in (None, "librispeech-sample"):
        paths = sorted(glob.glob(os.path.join(args.librispeech, "**", "*.flac"), recursive=True))
        if paths:
            corpora.append(("librispeech-sample", [open(p, "rb").read() for p in paths]))
        else:
            print(f"SKIP bench=decode corpus=librispeech-sample: no FLAC under {args.librispeech}")
    for line in skipped:
        print(f"SKIP bench=decode {line}", flush=True)
    for name, members in corpora:
        print(f"timing {len(members)} members of {name} ...", flush=True)
        for line in bench_corpus(name, members, contenders, args.repeats):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
