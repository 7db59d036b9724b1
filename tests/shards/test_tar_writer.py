import hashlib
import io
import os
import tarfile

import pytest
import webdataset as wds

from shards import tar_writer
from shards.tar_writer import ShardWriter, SourceReadError


def _write(path, samples):
    w = ShardWriter(str(path))
    members = [w.add(k, io.BytesIO(data), len(data), {"key": k}) for k, data in samples]
    size, sha = w.commit()
    return members, size, sha


SAMPLES = [
    ("a", b"fLaC" + bytes(range(256)) * 3),
    ("b" * 120, b"fLaC" + b"x" * 1000),
    ("ünï", b"fLaC-3"),
]


def test_nothing_appears_under_the_final_name_before_commit(tmp_path):
    final = tmp_path / "000000.tar"
    w = ShardWriter(str(final))
    w.add("a", io.BytesIO(b"data"), 4, {})
    assert not final.exists()
    assert os.path.basename(w.temp_path).startswith(".000000.tar.tmp-")
    w.commit()
    assert final.exists() and not os.path.exists(w.temp_path)


def test_abort_leaves_nothing_behind(tmp_path):
    w = ShardWriter(str(tmp_path / "000000.tar"))
    w.add("a", io.BytesIO(b"data"), 4, {})
    w.abort()
    assert os.listdir(tmp_path) == []


def test_same_samples_give_byte_identical_tars(tmp_path):
    _, _, sha1 = _write(tmp_path / "1.tar", SAMPLES)
    _, _, sha2 = _write(tmp_path / "2.tar", SAMPLES)
    assert sha1 == sha2
    assert (tmp_path / "1.tar").read_bytes() == (tmp_path / "2.tar").read_bytes()
    assert hashlib.sha256((tmp_path / "1.tar").read_bytes()).hexdigest() == sha1


def test_member_offsets_point_at_the_data_even_with_long_and_unicode_names(tmp_path):
    members, size, _ = _write(tmp_path / "s.tar", SAMPLES)
    blob = (tmp_path / "s.tar").read_bytes()
    assert len(blob) == size
    for (_, data), m in zip(SAMPLES, members, strict=True):
        assert blob[m.offset : m.offset + m.size] == data
        assert m.sha256 == hashlib.sha256(data).hexdigest()


def test_headers_carry_no_time_or_owner(tmp_path):
    _write(tmp_path / "s.tar", SAMPLES)
    with tarfile.open(tmp_path / "s.tar") as tar:
        for m in tar.getmembers():
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "")


def test_webdataset_reads_the_samples_by_key(tmp_path):
    _write(tmp_path / "s.tar", SAMPLES)
    got = {
        s["__key__"]: s["flac"] for s in wds.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False)
    }
    assert got == dict(SAMPLES)


@pytest.mark.parametrize("key", ["a.b", "../escape", "/abs", ""])
def test_invalid_keys_are_refused_before_anything_is_written(tmp_path, key):
    w = ShardWriter(str(tmp_path / "s.tar"))
    with pytest.raises(ValueError):
        w.add(key, io.BytesIO(b"x"), 1, {})
    w.abort()


def test_a_repeated_key_is_refused(tmp_path):
    w = ShardWriter(str(tmp_path / "s.tar"))
    w.add("a", io.BytesIO(b"x"), 1, {})
    with pytest.raises(ValueError, match="already"):
        w.add("a", io.BytesIO(b"y"), 1, {})
    w.abort()


def test_output_is_byte_for_byte_what_tarfile_writes_for_the_same_members(tmp_path):
    _write(tmp_path / "ours.tar", SAMPLES)
    with tarfile.open(
        tmp_path / "ref.tar", "w", format=tarfile.PAX_FORMAT, encoding="utf-8"
    ) as ref:
        for key, data in SAMPLES:
            body = ('{"key":"' + key + '"}').encode()
            for name, payload in ((f"{key}.flac", data), (f"{key}.json", body)):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode, info.uid, info.gid = len(payload), 0, 0o444, 0, 0
                info.uname = info.gname = ""
                ref.addfile(info, io.BytesIO(payload))
    assert (tmp_path / "ours.tar").read_bytes() == (tmp_path / "ref.tar").read_bytes()


class _Failing(io.RawIOBase):
    """A source that yields some bytes and then fails, like a file on a lost mount: ``good``
    reads of 40 bytes (of all that is asked with ``whole``), then an error."""

    def __init__(self, good=1, whole=False):
        self.calls, self.good, self.whole = 0, good, whole

    def readable(self):
        return True

    def read(self, size=-1):
        self.calls += 1
        if self.calls <= self.good:
            return b"x" * size if self.whole else b"fLaC" * 10
        raise OSError("Input/output error")


def test_a_source_failing_mid_copy_is_rolled_back_and_the_shard_stays_valid(tmp_path):
    w = ShardWriter(str(tmp_path / "s.tar"))
    w.add("a", io.BytesIO(b"first"), 5, {"key": "a"})
    with pytest.raises(SourceReadError, match="Input/output error"):
        w.add("b", _Failing(), 1000, {"key": "b"})
    with pytest.raises(SourceReadError, match="ended 5 bytes early"):
        w.add("c", io.BytesIO(b"short"), 10, {"key": "c"})
    w.add("d", io.BytesIO(b"last"), 4, {"key": "d"})
    size, sha = w.commit()
    with tarfile.open(tmp_path / "s.tar") as tar:
        assert tar.getnames() == ["a.flac", "a.json", "d.flac", "d.json"]
    assert hashlib.sha256((tmp_path / "s.tar").read_bytes()).hexdigest() == sha
    assert size == (tmp_path / "s.tar").stat().st_size


@pytest.mark.parametrize("name", ["a.flac", "x" * 95 + ".flac", "x" * 96 + ".flac", "ä.json"])
@pytest.mark.parametrize("size", [0, 1, 511, 512, 8**11 - 1, 8**11])
def test_fast_headers_equal_tarfiles_own(name, size):
    assert tar_writer._header(name, size) == tar_writer._tarfile_header(name, size)


def test_in_memory_members_make_the_same_tar_as_streamed_ones(tmp_path):
    _, _, streamed = _write(tmp_path / "streamed.tar", SAMPLES)
    w = ShardWriter(str(tmp_path / "bytes.tar"))
    members = [w.add_bytes(k, data, {"key": k}) for k, data in SAMPLES]
    _, sha = w.commit()
    assert sha == streamed
    assert (tmp_path / "bytes.tar").read_bytes() == (tmp_path / "streamed.tar").read_bytes()
    for (_, data), m in zip(SAMPLES, members, strict=True):
        assert m.sha256 == hashlib.sha256(data).hexdigest()


def test_digests_made_in_one_pass_equal_hashlib_over_the_files(tmp_path, monkeypatch):
    # Small limits, so that the queue is written many times, members span several writes
    # and a large member is streamed through the reused buffer in uneven chunks.
    monkeypatch.setattr(tar_writer, "_FLUSH_BYTES", 3000)
    monkeypatch.setattr(tar_writer, "_FLUSH_PIECES", 5)
    monkeypatch.setattr(tar_writer, "_WHOLE_READ", 4096)
    monkeypatch.setattr(tar_writer, "_COPY_BUFFER", 1000)
    monkeypatch.setattr(tar_writer, "_WRITEBACK_BYTES", 2048)
    rng = __import__("random").Random(0)
    samples = [(f"k{i}", rng.randbytes(rng.choice([0, 1, 700, 4096, 9999]))) for i in range(30)]
    w = ShardWriter(str(tmp_path / "s.tar"))
    members = [
        w.add_bytes(k, data, {"key": k}) if i % 2 else w.add(k, io.BytesIO(data), len(data), {})
        for i, (k, data) in enumerate(samples)
    ]
    size, sha = w.commit()
    blob = (tmp_path / "s.tar").read_bytes()
    assert (size, sha) == (len(blob), hashlib.sha256(blob).hexdigest())
    for (_, data), m in zip(samples, members, strict=True):
        assert blob[m.offset : m.offset + m.size] == data
        assert m.sha256 == hashlib.sha256(data).hexdigest()
    with tarfile.open(tmp_path / "s.tar") as tar:
        assert [tar.extractfile(f"{k}.flac").read() for k, _ in samples] == [d for _, d in samples]


def test_a_streamed_source_failing_after_some_chunks_were_written_is_rolled_back(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(tar_writer, "_WHOLE_READ", 16)
    monkeypatch.setattr(tar_writer, "_COPY_BUFFER", 8)

    w = ShardWriter(str(tmp_path / "s.tar"))
    w.add("a", io.BytesIO(b"first"), 5, {"key": "a"})
    with pytest.raises(SourceReadError, match="Input/output error"):
        # 40 bytes reach the file, then it fails.
        w.add("b", _Failing(good=5, whole=True), 1000, {"key": "b"})
    assert os.path.getsize(w.temp_path) == 4 * 512  # Only "a" (two headers, two blocks) is left.
    w.add("d", io.BytesIO(b"last"), 4, {"key": "d"})
    size, sha = w.commit()
    _write(tmp_path / "ref.tar", [("a", b"first"), ("d", b"last")])
    assert (tmp_path / "s.tar").read_bytes() == (tmp_path / "ref.tar").read_bytes()
    assert hashlib.sha256((tmp_path / "s.tar").read_bytes()).hexdigest() == sha


def test_finish_sync_publish_is_commit_in_steps(tmp_path):
    w = ShardWriter(str(tmp_path / "s.tar"))
    w.add_bytes("a", b"data", {})
    size, sha = w.finish()
    assert not (tmp_path / "s.tar").exists()
    w.sync()
    w.publish()
    blob = (tmp_path / "s.tar").read_bytes()
    assert (size, sha) == (len(blob), hashlib.sha256(blob).hexdigest())
    assert not os.path.exists(w.temp_path)
