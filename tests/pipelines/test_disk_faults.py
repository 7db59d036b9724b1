"""A full disk or a read-only output, for real, as a user meets them.

Each scenario runs a stage's command inside unprivileged user and mount namespaces
(``unshare --user --map-root-user --mount``), where a small tmpfs is a real full disk (ENOSPC)
and a read-only bind mount a real read-only file system (EROFS); running as root, chmod would
stop nothing. The command must end with exit status 1 and one clear line on stderr, leave no
partial unit visible and no temporary file behind, and, once there is space again, a rerun
must finish with the bytes of a run that never failed.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from shards.plan import ShardingOptions
from tests.processes import kill_ray_of

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UNSHARE = ["unshare", "--user", "--map-root-user", "--mount"]


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    try:
        done = subprocess.run(
            [*UNSHARE, "sh", "-c", "mount -t tmpfs tmpfs /tmp"], capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


needs_namespaces = pytest.mark.skipif(
    not _namespaces_work(),
    reason="needs `unshare --user --map-root-user --mount` (unprivileged user and mount "
    "namespaces) to make a real full disk and a real read-only file system",
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tiny LibriSpeech-like corpus: 8 utterances of 16 kHz FLAC, 4 shards of 2."""
    from shards import synthetic

    corpus = tmp_path_factory.mktemp("corpus")
    synthetic.write_librispeech(
        str(corpus), speakers=2, chapters=1, utterances=4, seconds=(1.0, 2.0)
    )
    return corpus


@pytest.fixture(scope="module")
def built(tmp_path_factory, corpus):
    """A root sharded from the corpus, with an MFCC store: the outputs of runs that never
    failed, which the faulty runs must end up equal to."""
    import ray

    from shards.ray_sharding import run as shard
    from units.features.extractors import ExtractorOptions
    from units.features.sampling import SampleRequest
    from units.features.stage import run as extract

    root = tmp_path_factory.mktemp("root")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        shard([str(corpus)], str(root), ShardingOptions(max_samples=2))
        extract(str(root), "mfcc", ExtractorOptions("mfcc"), SampleRequest(percent=50, seed=0))
    finally:
        ray.shutdown()  # The commands below start their own.
    return root


def _kib(*paths) -> int:
    """What ``paths`` take on a tmpfs, in KiB (whole 4 KiB pages)."""
    return sum(-(-os.path.getsize(p) // 4096) * 4 for p in paths)


def _in_namespaces(script: str, **env) -> None:
    """Runs ``script`` (bash) in fresh user and mount namespaces; Ray's files stay outside
    the mounts (``RAY_TMPDIR``), and every Ray process it started is stopped after."""
    ray_tmp = tempfile.mkdtemp(prefix="up-ray-", dir="/tmp")  # Short: Ray's socket paths.
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, PYTHONPATH=REPO, PY=sys.executable, **env)
    env.pop("RAY_ADDRESS", None)
    try:
        done = subprocess.run(
            [*UNSHARE, "bash", "-c", script],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    finally:
        kill_ray_of(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)


#: Fills a 64 MiB tmpfs at $MNT (seeded with a copy of $SEED as $MNT/root, if given) up to
#: $HEADROOM_KIB free, runs $COMMAND, keeps a copy of the root, frees the space, runs the
#: command again and keeps a copy of that root too.
_FULL_DISK = """
set -eu
mount -t tmpfs -o size=64m tmpfs "$MNT"
if [ -n "$SEED" ]; then cp -a "$SEED" "$MNT/root"; fi
avail=$(df --output=avail -k "$MNT" | tail -1)
fallocate -l $(( (avail - HEADROOM_KIB) * 1024 )) "$MNT/filler"
set +e
eval "$COMMAND" > "$OUT/fail.out" 2> "$OUT/fail.err"; echo $? > "$OUT/fail.rc"
set -e
cp -a "$MNT/root" "$OUT/after_failure"
rm "$MNT/filler"
set +e
eval "$COMMAND" > "$OUT/rerun.out" 2> "$OUT/rerun.err"; echo $? > "$OUT/rerun.rc"
set -e
cp -a "$MNT/root" "$OUT/after_rerun"
"""


def _full_disk(tmp_path, argv: list[str], headroom_kib: int, seed=None):
    """Runs ``argv`` (``ROOT`` in it stands for the root on the tmpfs) on a full disk, then
    with space freed; returns the directory holding what each run printed and left."""
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    command = shlex.join(
        ["$PY", "-m", *[str(mnt / "root") if a == "ROOT" else a for a in argv]]
    ).replace("'$PY'", '"$PY"')
    _in_namespaces(
        _FULL_DISK,
        MNT=str(mnt),
        OUT=str(out),
        SEED=str(seed or ""),
        HEADROOM_KIB=str(headroom_kib),
        COMMAND=command,
    )
    return out


def _one_clear_line(out, root: str, errno_name: str) -> str:
    """The failed run exited 1 with exactly one ``unitpipe:`` line, and no traceback."""
    err = (out / "fail.err").read_text()
    assert (out / "fail.rc").read_text().strip() == "1", err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("unitpipe: ")]
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err and "RayTaskError" not in err, err[-3000:]
    assert f"cannot write {root}/" in lines[0] and f"({errno_name})" in lines[0], lines[0]
    assert lines[0].endswith("committed units are kept and a rerun resumes"), lines[0]
    return lines[0]


def _check_units(directory, data_glob: str, commit_of, companions_of=lambda p: ()) -> int:
    """Every visible data file has a commit record whose ``bytes`` is its size, and its
    companion files; no temporary file is left. Returns the number of units."""
    temps = [p for p in directory.rglob("*") if ".tmp-" in p.name]
    assert not temps, temps
    units = sorted(directory.glob(data_glob))
    for path in units:
        commit = commit_of(path)
        assert commit.exists(), f"{path} is visible without its commit record"
        assert json.loads(commit.read_text())["bytes"] == path.stat().st_size, path
        for companion in companions_of(path):
            assert companion.exists(), companion
    return len(units)


def _same_bytes(a, b, pattern: str) -> None:
    names = sorted(p.name for p in a.glob(pattern))
    assert names and names == sorted(p.name for p in b.glob(pattern)), pattern
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@needs_namespaces
@pytest.mark.slow
def test_a_full_disk_while_sharding_is_one_line_and_a_rerun_finishes_the_same_shards(
    corpus, built, tmp_path
):
    clean = built
    argv = ["pipelines.shard", "--input", str(corpus), "--output", "ROOT", "--max-samples", "2"]
    argv += ["--num-cpus", "1", "--no-progress"]  # One shard at a time, in order.
    # Room for the plan, the first shard whole and half of the second's tar: the second
    # finds the disk full.
    parts = clean / "manifest" / "parts"
    headroom = _kib(*(clean / "plan").iterdir(), clean / "shards" / "000000.tar")
    headroom += _kib(*parts.glob("000000.*")) + _kib(clean / "shards" / "000001.tar") // 2
    out = _full_disk(tmp_path, argv, headroom_kib=headroom)
    root = str(tmp_path / "mnt" / "root")
    line = _one_clear_line(out, root, "ENOSPC")
    assert f"{root}/shards/0000" in line and ".tar:" in line and ".tmp-" not in line

    failed = out / "after_failure"
    parts = failed / "manifest" / "parts"
    committed = _check_units(
        failed / "shards",
        "*.tar",
        lambda tar: parts / f"{tar.stem}.commit.json",
        lambda tar: [parts / f"{tar.stem}.{kind}.parquet" for kind in ("utterances", "rejects")],
    )
    assert 1 <= committed < 4  # The first shard fitted; the disk was full before the last.
    for record in parts.glob("*.commit.json"):  # No record without its shard.
        assert (failed / "shards" / f"{record.name.split('.')[0]}.tar").exists(), record
    assert len(list(parts.glob("*.parquet"))) == 2 * committed
    assert not (failed / "manifest" / "summary.json").exists()

    rerun = (out / "rerun.err").read_text()
    assert (out / "rerun.rc").read_text().strip() == "0", rerun[-3000:]
    assert f"resuming: {committed} shards already committed, {4 - committed} to write" in rerun
    done = out / "after_rerun"
    _same_bytes(done / "shards", clean / "shards", "*.tar")
    _same_bytes(done / "manifest", clean / "manifest", "*.parquet")


@needs_namespaces
@pytest.mark.slow
def test_a_full_disk_while_extracting_is_one_line_and_a_rerun_gives_the_clean_store(
    built, tmp_path
):
    clean = built
    seed = tmp_path / "seed"  # The sharded root without its store.
    shutil.copytree(clean, seed, symlinks=True, ignore=shutil.ignore_patterns("features"))
    store = clean / "features" / "mfcc"
    shards = sorted(p.name.split(".")[0] for p in (store / "shards").glob("*.npy"))
    assert len(shards) >= 2
    # Room for the plan, the first feature shard whole and half of the second's array (one
    # worker writes them in order): the second finds the disk full.
    first = [p for p in (store / "shards").iterdir() if p.name.startswith(shards[0])]
    headroom = _kib(store / "plan.json", store / "sample.parquet", *first)
    headroom += _kib(store / "shards" / f"{shards[1]}.npy") // 2
    argv = ["pipelines.features", "--root", "ROOT", "--name", "mfcc", "--extractor", "mfcc"]
    argv += ["--percent", "50", "--seed", "0", "--num-cpus", "1", "--no-progress"]
    out = _full_disk(tmp_path, argv, headroom_kib=headroom, seed=seed)
    root = str(tmp_path / "mnt" / "root")
    line = _one_clear_line(out, root, "ENOSPC")
    assert f"{root}/features/mfcc/" in line and ".tmp-" not in line

    failed = out / "after_failure" / "features" / "mfcc" / "shards"
    committed = _check_units(
        failed,
        "*.npy",
        lambda array: failed / f"{array.stem}.commit.json",
        lambda array: [failed / f"{array.stem}.{kind}.parquet" for kind in ("index", "rejects")],
    )
    assert 1 <= committed < len(shards)
    assert len(list(failed.glob("*.commit.json"))) == committed
    assert len(list(failed.glob("*.parquet"))) == 2 * committed
    assert not (failed.parent / "meta.json").exists()

    assert (out / "rerun.rc").read_text().strip() == "0", (out / "rerun.err").read_text()[-3000:]
    record = json.loads((out / "after_rerun" / "runs" / "features-mfcc.json").read_text())
    assert record["shards_written"] == len(shards) - committed
    assert "features: wrote" in (out / "rerun.out").read_text()
    done = out / "after_rerun" / "features" / "mfcc"
    _same_bytes(done / "shards", store / "shards", "*.npy")
    _same_bytes(done / "shards", store / "shards", "*.parquet")
    _same_bytes(done, store, "*.parquet")


#: Makes $ROOT read-only (a read-only bind mount of itself), then runs every stage's command
#: on it at once, each printing into $OUT/NAME.{out,err,rc}.
_READ_ONLY = """
set -eu
mount --bind "$ROOT" "$ROOT"
mount -o remount,bind,ro "$ROOT"
set +e
while read -r name command; do
  ( eval "$command" > "$OUT/$name.out" 2> "$OUT/$name.err"; echo $? > "$OUT/$name.rc" ) &
done <<EOF
$COMMANDS
EOF
wait
"""


@needs_namespaces
def test_a_read_only_root_is_one_line_from_every_stage_before_any_work(corpus, tmp_path):
    root = tmp_path / "root"  # A root with a committed shard in it, say.
    (root / "shards").mkdir(parents=True)
    (root / "shards" / "000000.tar").write_bytes(bytes(10240))
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    ray = ["--num-cpus", "1"]
    commands = {
        "shard": ["pipelines.shard", "--input", str(corpus), "--output", str(root / "new")],
        "features": ["pipelines.features", "--root", str(root), "--name", "f", "--extractor"]
        + ["mfcc", "--percent", "50"],
        "kmeans": ["pipelines.kmeans", "--root", str(root), "--features", "mfcc", "--k", "4"]
        + ["--name", "k"],
        "label": ["pipelines.label", "--root", str(root), "--kmeans", "k", "--name", "l"],
        "w2vu": ["pipelines.w2vu", "--root", str(root), "--name", "w", "--features", "mfcc"],
    }
    out = tmp_path / "out"
    out.mkdir()
    lines = "\n".join(
        f"{name} {shlex.join(['$PY', '-m', *argv, *ray])}".replace("'$PY'", '"$PY"')
        for name, argv in commands.items()
    )
    _in_namespaces(_READ_ONLY, ROOT=str(root), OUT=str(out), COMMANDS=lines)
    for name in commands:
        err = (out / f"{name}.err").read_text()
        assert (out / f"{name}.rc").read_text().strip() == "1", (name, err[-3000:])
        assert "started in-process local Ray" not in err, (name, err[-3000:])  # No work.
        assert "Traceback" not in err, (name, err[-3000:])
        [line] = [x for x in err.splitlines() if x.startswith("unitpipe: ")]
        where = root / "new" if name == "shard" else root
        assert line.startswith(
            f"unitpipe: cannot write {where}: Read-only file system (EROFS) — remount it "
            "read-write or choose another ROOT"
        ), (name, line)
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before


# ------------------------------------------------------------------ the parts, in-process
class _FullFile:
    """A file on a disk that fills up after ``room`` bytes: writes past it, and the flush
    when it is closed, fail with ENOSPC (as a buffered file on a full disk does)."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def close(self) -> None:
        self.f.close()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)


class _FullDisk:
    """The system calls of a disk that fills up after ``room`` bytes, for the shard writer,
    which writes its descriptor with ``os.writev``: a write past it fails with ENOSPC, and
    so does closing (as on a network file system that writes back at close)."""

    def __init__(self, monkeypatch, room: int):
        self.room, self._writev, self._close = room, os.writev, os.close
        monkeypatch.setattr(os, "writev", self.writev)
        monkeypatch.setattr(os, "close", self.close)

    def writev(self, fd: int, buffers) -> int:
        size = sum(memoryview(b).nbytes for b in buffers)
        if size > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= size
        return self._writev(fd, buffers)

    def close(self, fd: int) -> None:
        self._close(fd)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_fails_the_shard_and_never_rejects_its_inputs(corpus, tmp_path, monkeypatch):
    from shards import discover, shard_job, tar_writer
    from shards import plan as planning
    from shards.probe import probe_many
    from shards.root import RootLayout

    class FillingWriter(tar_writer.ShardWriter):
        def __init__(self, final_path):
            super().__init__(final_path)
            _FullDisk(monkeypatch, room=20_000)  # Inside the first member.

    opts = ShardingOptions(max_samples=2)
    probes, rejects = probe_many(discover.discover(str(corpus)).sources)
    made = planning.make_plan(planning.probed_rows(probes, opts), rejects, opts, {})
    assert (
        made.shards[0].column("passthrough")[0].as_py()
    )  # Copied as it is: the path that reads a file.
    layout = RootLayout(str(tmp_path / "root"))
    layout.make_dirs()
    monkeypatch.setattr(shard_job, "ShardWriter", FillingWriter)
    with pytest.raises(tar_writer.WriteError) as failed:
        shard_job.write_shard(layout.root, 0, made.shards[0], opts)
    assert failed.value.errno == errno.ENOSPC and not isinstance(
        failed.value, tar_writer.SourceReadError
    )
    assert failed.value.filename.startswith(f"{layout.shards_dir}/.000000.tar.tmp-")
    assert os.listdir(layout.shards_dir) == [] and os.listdir(layout.parts_dir) == []


def test_writers_remove_their_temporary_file_when_closing_it_fails_too(tmp_path):
    from shards.core.outputs import ShardOutput
    from shards.tar_writer import ShardWriter
    from units.features.store import FeatureShardWriter, store_layout

    writer = ShardWriter(str(tmp_path / "000000.tar"))
    writer.add_bytes("a", b"data", {})  # Queued, not written yet.
    with pytest.MonkeyPatch.context() as patch:
        _FullDisk(patch, room=0)
        writer.abort()  # Closing fails; the file goes all the same, and no error.
    assert os.listdir(tmp_path) == []

    layout = store_layout(str(tmp_path), "f")
    layout.make_dirs()
    features = FeatureShardWriter(ShardOutput(layout, "000000"), dim=2)
    pending = features._array._pending  # The streamed .npy's temporary file.
    pending.file = _FullFile(pending.file, room=0)
    with pytest.raises(OSError) as failed:
        features.add("utt", np.zeros((3, 2), np.float32))
    assert failed.value.errno == errno.ENOSPC
    assert failed.value.filename.startswith(f"{layout.path('shards')}/.000000.npy.tmp-")
    features.abort()
    assert os.listdir(layout.path("shards")) == []


def test_an_error_from_a_ray_worker_is_one_line_naming_the_final_file(tmp_path, capsys):
    from ray.exceptions import RayTaskError

    from pipelines import _cli

    temp = "/data/root/shards/.000003.tar.tmp-123-abcdef01"
    cause = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), temp)
    wrapped = RayTaskError("_shard_task", "Traceback ...", cause).as_instanceof_cause()
    try:  # As the shard driver raises it: a summary, with the task's error as its cause.
        raise RuntimeError("1 shard(s) failed") from wrapped
    except RuntimeError as e:
        error = e
    assert _cli.output_error(error) is cause
    assert _cli.describe_output_error(cause) == (
        "unitpipe: cannot write /data/root/shards/000003.tar: No space left on device "
        "(ENOSPC) — free space or choose another ROOT; committed units are kept and a rerun "
        "resumes"
    )
    assert _cli.output_error(RuntimeError("a bug")) is None
    assert _cli.output_error(FileNotFoundError(errno.ENOENT, "gone", "/x")) is None

    @_cli.reports_output_errors
    def main(argv=None):
        raise error

    assert main([]) == 1
    assert capsys.readouterr().err.splitlines() == [_cli.describe_output_error(cause)]

    @_cli.reports_output_errors
    def buggy(argv=None):
        raise KeyError("not a disk error")

    with pytest.raises(KeyError):
        buggy([])

    _cli.check_writable(str(tmp_path))  # Writable: the probe leaves nothing behind.
    assert os.listdir(tmp_path) == []
    _cli.check_writable(str(tmp_path / "missing"))  # The stage says what is missing.
    (tmp_path / "file").write_text("")
    with pytest.raises(_cli.UnwritableOutput) as unwritable:
        _cli.check_writable(str(tmp_path / "file" / "root"), create=True)
    assert unwritable.value.filename == str(tmp_path / "file" / "root")
    assert _cli.output_error(unwritable.value) is unwritable.value


_SPLIT_ON_A_FULL_DISK = """
import errno, os
import numpy as np
from units.labels.w2vu_stage import _write_split_npy, w2vu_layout

layout = w2vu_layout(os.environ["MNT"], "w")
layout.make_dirs()
np.save(layout.shard_path("features", "000000"), np.ones((10, 8), np.float32))
chosen = [{"key": f"k{i}"} for i in range(10_000)]  # 3.2 MB of split on a 256 KiB disk.
placed = {r["key"]: {"shard": "000000", "row": 0, "length": 10} for r in chosen}
try:
    _write_split_npy(layout, "train", chosen, placed, 100_000, 8)
except OSError as e:
    assert e.errno == errno.ENOSPC, e
    print("ENOSPC", sorted(os.listdir(layout.directory)))
"""


@needs_namespaces
def test_a_split_file_on_a_full_disk_is_an_error_and_leaves_nothing(tmp_path):
    """wav2vec-U writes a split through a memory map: without its blocks reserved first, a
    full disk would kill the process with SIGBUS instead of raising."""
    mnt, out = tmp_path / "mnt", tmp_path / "out.txt"
    mnt.mkdir()
    script = 'mount -t tmpfs -o size=256k tmpfs "$MNT" && "$PY" -c "$CODE" > "$OUT"'
    _in_namespaces(script, MNT=str(mnt), OUT=str(out), CODE=_SPLIT_ON_A_FULL_DISK)
    assert out.read_text().split("\n")[0] == (
        "ENOSPC ['commits', 'features', 'rejects', 'rows']"  # No temporary split left.
    )
