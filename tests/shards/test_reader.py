"""Reading shards never leaves the archive: odd member names and links are refused."""

import io
import tarfile

import pytest

from shards.reader import UnsafeMemberError, iter_shard


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "link":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = 4
                tar.addfile(info, io.BytesIO(b"data"))


@pytest.mark.parametrize(
    "members",
    [
        [("../evil.flac", "file")],
        [("/abs.flac", "file")],
        [("dir/key.flac", "file")],
        [("key.flac", "link")],
        [(".hidden.flac", "file")],
    ],
)
def test_members_that_could_reach_outside_the_archive_are_refused(tmp_path, members):
    _tar(tmp_path / "bad.tar", members)
    with pytest.raises(UnsafeMemberError):
        list(iter_shard(str(tmp_path / "bad.tar")))


def test_a_sample_missing_its_json_is_an_error_not_a_silent_skip(tmp_path):
    _tar(tmp_path / "half.tar", [("key.flac", "file")])
    with pytest.raises(ValueError, match="without both"):
        list(iter_shard(str(tmp_path / "half.tar")))
