"""What a bucket ROOT costs: the whole HuBERT pipeline with ROOT on local disk and on ``s3://``.

The same corpus (the demo's synthetic speech) goes through shard -> MFCC -> k-means ->
labels -> report twice per round, once per root, in alternating order; the bucket is a real
S3-compatible server (moto) on loopback, so the figure is the cost of our commit protocol
(build in scratch, upload under a temporary key, move, commit record) plus moto's own speed,
not a network's. Prints one RESULT line per contender and one with the ratio::

    RESULT bench=roots case=hubert_mfcc hours=0.17 contender=local seconds=... ...
    RESULT bench=roots case=hubert_mfcc hours=0.17 contender=s3 seconds=... objects=...
    RESULT bench=roots case=hubert_mfcc s3_over_local=... identical_units=True

Usage: ``python bench/roots.py [--minutes 10] [--rounds 1]``
"""

import argparse
import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from _common import REPO, busy_cores, prepare

prepare()


def _moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen(
        [server, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    return proc, endpoint


def _run(root: str, corpus: str) -> float:
    from pipelines import hubert

    argv = [
        "--config", os.path.join(REPO, "configs", "hubert-mfcc.yaml"), f"root={root}",
        f"inputs=[{corpus}]", "shard.max_samples=16", "features.percent=20",
        "label.fairseq_splits=null",
    ]  # fmt: skip
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        assert hubert.main(argv) == 0
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="audio in the corpus")
    parser.add_argument("--rounds", type=int, default=1, help="runs per root, alternating")
    args = parser.parse_args()

    proc, endpoint = _moto()
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    import pyarrow.fs as pafs
    import ray

    from pipelines.demo.corpus import write_demo_corpus
    from shards.core import storage

    work = tempfile.mkdtemp(prefix="bench-roots-")
    try:
        s3 = pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True)
        s3.create_dir("bench")
        corpus = os.path.join(work, "corpus")
        write_demo_corpus(corpus, minutes=args.minutes, speakers=4, seed=0)
        hours = args.minutes / 60
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        seconds = {"local": [], "s3": []}
        for i in range(args.rounds):
            order = ("local", "s3") if i % 2 == 0 else ("s3", "local")
            for contender in order:
                if contender == "local":
                    root = os.path.join(work, f"local{i}")
                else:
                    root = f"s3://bench/round{i}"
                busy = busy_cores()
                seconds[contender].append(_run(root, corpus))
                print(f"# {contender} round {i}: {seconds[contender][-1]:.1f} s, {busy:.1f} "
                      "cores busy before", flush=True)  # fmt: skip
        infos = s3.get_file_info(pafs.FileSelector("bench/round0", recursive=True))
        objects = [i for i in infos if i.type == pafs.FileType.File]
        units = "labels/it1/units"
        names = sorted(os.listdir(os.path.join(work, "local0", units)))
        same = all(
            storage.read_bytes(f"s3://bench/round0/{units}/{n}")
            == open(os.path.join(work, "local0", units, n), "rb").read()
            for n in names
        )
        best = {k: min(v) for k, v in seconds.items()}
        for contender, value in best.items():
            extra = ""
            if contender == "s3":
                extra = f" objects={len(objects)} bytes={sum(o.size for o in objects)}"
            print(
                f"RESULT bench=roots case=hubert_mfcc hours={hours:.2f} contender={contender} "
                f"seconds={value:.2f} audio_hours_per_second={hours / value:.4f}{extra}"
            )
        print(
            f"RESULT bench=roots case=hubert_mfcc s3_over_local={best['s3'] / best['local']:.2f} "
            f"identical_units={same}"
        )
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        proc.terminate()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
