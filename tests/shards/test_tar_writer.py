import hashlib
import io
import os
import tarfile

import pytest
import webdataset as wds

from shards.tar_writer import ShardWriter


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
