import os
import pwd

import pytest
import soundfile as sf

from shards.discover import Source
from shards.probe import OpenAhead, ProbeError, check_whole, probe, probe_many
from tests.conftest import tone
from tests.corpora import write_bad_corpus

# Files whose problem shows in the header; the others fail later, while decoding.
PROBE_REASONS = {
    "empty.flac": "empty_file",
    "header_only.wav": "no_samples",
    "text_named.flac": "not_audio",
    "broken_link.flac": "broken_symlink",
    "tiny_300_samples.wav": "too_short",
    "bad_sidecar.flac": "bad_sidecar",
}


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    write_bad_corpus(str(root))
    return root


def _source(path, sidecar=None):
    return Source(str(path), "k", sidecar=sidecar)


@pytest.mark.parametrize("name,reason", sorted(PROBE_REASONS.items()))
def test_bad_headers_are_rejected_with_a_reason(bad_dir, name, reason):
    sidecar = str(bad_dir / "bad_sidecar.json") if name == "bad_sidecar.flac" else None
    with pytest.raises(ProbeError) as err:
        probe(_source(bad_dir / name, sidecar))
    assert err.value.reason.value == reason
    assert str(err.value)  # Every reject says what is wrong in words.


def test_a_truncated_pass_through_flac_is_caught_before_it_is_copied(bad_dir):
    p = probe(_source(bad_dir / "truncated.flac"))  # The header alone looks fine.
    assert p.passthrough
    with open(bad_dir / "truncated.flac", "rb") as f, pytest.raises(ProbeError) as err:
        check_whole(f, p.file_bytes)
    assert err.value.reason.value == "truncated"
    with open(bad_dir / "good_16k.flac", "rb") as f:
        check_whole(f, os.path.getsize(bad_dir / "good_16k.flac"))


def test_a_flac_with_a_trailing_tag_is_vouched_for_by_libsndfile(tmp_path):
    sf.write(tmp_path / "a.flac", tone(1.0, 16000), 16000)
    tagged = (tmp_path / "a.flac").read_bytes() + b"TAG" + bytes(125)  # An ID3v1 tag.
    (tmp_path / "a.flac").write_bytes(tagged)
    with open(tmp_path / "a.flac", "rb") as f:
        check_whole(f, len(tagged))


def test_a_missing_file_is_rejected_as_missing(tmp_path):
    with pytest.raises(ProbeError) as err:
        probe(_source(tmp_path / "nope.flac"))
    assert err.value.reason.value == "missing"


def test_16k_mono_16bit_flac_passes_through_and_other_audio_does_not(bad_dir):
    assert probe(_source(bad_dir / "good_16k.flac")).passthrough
    assert not probe(_source(bad_dir / "good_16k.flac"), segment="vad").passthrough
    assert not probe(_source(bad_dir / "rate_44k1.flac")).passthrough
    assert not probe(_source(bad_dir / "eight_channels.wav")).passthrough


def test_probe_reports_header_facts_without_decoding(bad_dir):
    p = probe(_source(bad_dir / "rate_44k1.flac"))
    assert (p.sample_rate, p.channels, p.format, p.frames) == (44100, 1, "FLAC", 22050)
    assert p.output_samples == 8000
    assert probe(_source(bad_dir / "exactly_400_samples.wav")).output_samples == 400


def test_24bit_16k_mono_flac_is_transcoded_to_16bit(tmp_path):
    sf.write(tmp_path / "a.flac", tone(0.5, 16000), 16000, subtype="PCM_24")
    assert not probe(_source(tmp_path / "a.flac")).passthrough


def test_unreadable_permissions_are_rejected(tmp_path):
    """Root reads anything, so when run as root the probe runs in a forked child that has
    dropped to an unprivileged user (the code is already loaded, nothing is executed anew)."""
    folder = tmp_path / "perm"
    folder.mkdir()
    path = folder / "locked.flac"
    sf.write(path, tone(0.5, 16000), 16000)
    os.chmod(path, 0o000)
    for parent in path.parents:  # Let an unprivileged user reach the file (not read it).
        if str(parent) in ("/", "/tmp"):
            break
        os.chmod(parent, os.stat(parent).st_mode | 0o011)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # The child: drop root, probe, report the reason, exit at once.
        try:
            if os.geteuid() == 0:
                nobody = pwd.getpwnam("nobody")
                os.setgroups([])
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
            try:
                probe(Source(str(path), "k"))
                answer = b"accepted"
            except ProbeError as e:
                answer = e.reason.value.encode()
            os.write(write_end, answer)
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    answer = os.read(read_end, 100).decode()
    os.close(read_end)
    assert answer == "permission_denied"


def test_a_truncated_wav_is_found_from_its_header_promising_more_data(tmp_path):
    sf.write(tmp_path / "x.wav", tone(1.0, 16000), 16000)
    data = (tmp_path / "x.wav").read_bytes()
    (tmp_path / "x.wav").write_bytes(data[: len(data) - 8000])
    with pytest.raises(ProbeError, match="header declares 32000") as err:
        probe(_source(tmp_path / "x.wav"))
    assert err.value.reason.value == "truncated"


def test_an_absurd_sample_rate_is_not_audio(tmp_path):
    sf.write(tmp_path / "slow.wav", tone(1.0, 1000), 1000)
    with pytest.raises(ProbeError, match="1000 Hz") as err:
        probe(_source(tmp_path / "slow.wav"))
    assert err.value.reason.value == "not_audio"


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else set()


def test_probing_from_a_descriptor_opened_ahead_answers_as_probing_by_path(bad_dir, tmp_path):
    (tmp_path / "folder.flac").mkdir()  # A descriptor of a directory: the path decides.
    paths = sorted(str(p) for p in bad_dir.iterdir()) + [str(tmp_path / "folder.flac")]
    sources = [_source(p) for p in paths]
    before = _open_fds()

    def answer(source, fd):
        try:
            return probe(source, fd=fd)
        except ProbeError as e:
            return (e.reason, str(e))

    ahead = OpenAhead(paths, 4, head_only=True)
    for i, source in enumerate(sources):
        ahead.advance(i)
        assert answer(source, ahead.take(i)) == answer(source, None), source.path
    ahead.close()
    assert _open_fds() == before  # Every descriptor was closed by its probe.


def test_probe_many_leaves_no_descriptor_open(bad_dir):
    before = _open_fds()
    probes, rejects = probe_many([_source(p) for p in sorted(bad_dir.iterdir())])
    assert probes and rejects
    assert _open_fds() == before
