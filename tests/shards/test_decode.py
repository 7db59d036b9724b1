"""The reader's fast FLAC decoder (dr_flac) gives libsndfile's samples bit for bit, or steps
aside: every damaged, odd or unknown stream goes to libsndfile, whose result or error
decides, exactly as before there was a fast decoder."""

from __future__ import annotations

import glob
import io
import os
import tarfile

import numpy as np
import pytest
import soundfile as sf

from shards import flac, reader
from shards.discover import discover
from shards.plan import ShardingOptions, make_plan, probed_rows
from shards.probe import probe_many
from shards.root import RootLayout
from shards.shard_job import write_shard
from shards.synthetic import speechlike, write_librilight, write_librispeech
from tests.conftest import tone
from tests.corpora import write_bad_corpus, write_vad_corpus

pytestmark = pytest.mark.skipif(reader._miniaudio is None, reason="miniaudio is not installed")


def _flac(x, rate=16000, subtype="PCM_16"):
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="FLAC", subtype=subtype)
    return buf.getvalue()


def _libsndfile(data):
    return sf.read(io.BytesIO(data), dtype="float32")


def _outcome(decode, data):
    """(samples, rate) or the error's type, so that outcomes compare with ==."""
    try:
        wav, rate = decode(data)
    except Exception as e:
        return type(e)
    return wav.dtype, wav.shape, wav.tobytes(), rate


def _assert_fast_and_exact(data):
    fast = reader._decode_flac(data)
    assert fast is not None, "the fast decoder stepped aside on a plain mono FLAC"
    wav, rate = fast
    ref, ref_rate = _libsndfile(data)
    assert wav.dtype == ref.dtype == np.float32 and wav.ndim == 1 and rate == ref_rate
    assert np.array_equal(wav, ref)


def _shard_locally(inputs: str, root: str, opts: ShardingOptions) -> list[bytes]:
    """The shard stage without Ray (discover, probe, plan, write_shard); the FLAC members."""
    found = discover(inputs, opts.layout, opts.extensions)
    probes, rejects = probe_many(found.sources, segment=opts.segment)
    plan = make_plan(probed_rows(probes, opts), rejects, opts, {"files": len(found.sources)})
    RootLayout(root).make_dirs()
    for index, rows in enumerate(plan.shards):
        write_shard(root, index, rows, opts)
    members = []
    for path in sorted(glob.glob(os.path.join(root, "shards", "*.tar"))):
        with tarfile.open(path) as tar:
            members += [
                tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".flac")
            ]
    return members


@pytest.fixture(scope="module")
def corpus_members(tmp_path_factory):
    """Every FLAC member the shard stage writes from the tests' corpora, and from odd inputs
    of its own: 24-bit sources (transcoded to 16 bits), silence, full scale, lengths around
    the 4096-sample block, a 16 kHz 16-bit FLAC stored as it is, VAD segments."""
    base = tmp_path_factory.mktemp("decode")
    bad, odd, ls, ll = (str(base / d) for d in ("bad", "odd", "ls", "ll"))
    write_bad_corpus(bad)
    write_vad_corpus(odd)
    write_librispeech(ls, speakers=2, chapters=1, utterances=3)
    write_librilight(ll, speakers=1, files=2, seconds=(8.0, 12.0))
    speech, _ = speechlike(2.3, seed=7)
    sf.write(os.path.join(odd, "speech_24bit.flac"), speech, 16000, subtype="PCM_24")
    sf.write(os.path.join(odd, "speech_24bit_48k.wav"), speech, 48000, subtype="PCM_24")
    sf.write(os.path.join(odd, "silence.flac"), np.zeros(20_000, np.float32), 16000)
    full = np.tile(np.array([-1.0, 1.0 - 2**-15, 0.0], np.float32), 3000)
    sf.write(os.path.join(odd, "full_scale.flac"), full, 16000, subtype="PCM_16")
    for n in (400, 401, 4095, 4096, 4097, 8192 + 17, 65_537):
        sf.write(os.path.join(odd, f"len_{n}.wav"), tone(n / 16000, 16000, seed=n), 16000)
    members = _shard_locally(bad, str(base / "root_bad"), ShardingOptions(layout="dir"))
    members += _shard_locally(odd, str(base / "root_odd"), ShardingOptions(layout="dir"))
    members += _shard_locally(ls, str(base / "root_ls"), ShardingOptions(layout="librispeech"))
    members += _shard_locally(
        ll, str(base / "root_ll"), ShardingOptions(layout="librilight", segment="vad")
    )
    return members


def test_every_member_of_the_test_corpora_decodes_fast_to_libsndfiles_samples(corpus_members):
    assert len(corpus_members) >= 25
    for data in corpus_members:
        _assert_fast_and_exact(data)
        assert _outcome(reader.decode_member, data) == _outcome(_libsndfile, data)


@pytest.mark.parametrize("frames", [1, 2, 255, 256, 4095, 4096, 4097, 12_345])
@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24"])
def test_16_and_24_bit_flac_decode_fast_and_exactly(frames, subtype):
    rng = np.random.default_rng(frames)
    x = rng.uniform(-1, 1, frames).astype(np.float32)
    x[: min(frames, 2)] = [-1.0, 1.0][: min(frames, 2)]  # Full scale: clipped by the writer.
    _assert_fast_and_exact(_flac(x, 16000, subtype))


def test_every_16_bit_value_and_24_bit_extremes_are_exact():
    every = np.random.default_rng(0).permutation(np.arange(-32768, 32768)).astype(np.int16)
    _assert_fast_and_exact(_flac(every, 16000, "PCM_16"))
    wide = np.random.default_rng(1).integers(-(2**23), 2**23, 50_000).astype(np.int32) << 8
    wide[:2] = [-(2**31), (2**23 - 1) << 8]
    _assert_fast_and_exact(_flac(wide, 16000, "PCM_24"))


@pytest.mark.parametrize(
    "data",
    [
        _flac(tone(0.5, 16000, channels=2)),  # Stereo: libsndfile's 2-D array, as before.
        _flac(tone(0.5, 16000), subtype="PCM_S8"),  # 8 bits: not one of the fast formats.
        b"RIFF" + b"\0" * 100,  # Not FLAC at all.
    ],
    ids=["stereo", "8bit", "not_flac"],
)
def test_other_streams_are_left_to_libsndfile(data):
    assert reader._decode_flac(data) is None
    assert _outcome(reader.decode_member, data) == _outcome(_libsndfile, data)


def test_truncated_flac_is_never_a_short_waveform():
    data = _flac(tone(2.0, 16000, seed=1))
    for cut in [*range(0, 200, 7), *range(200, len(data), 97), len(data) - 1]:
        part = data[:cut]
        assert reader._decode_flac(part) is None, cut
        with pytest.raises(sf.LibsndfileError):
            reader.decode_member(part)


def _mutations(data: bytes, rng: np.random.Generator):
    """Damage of the kinds storage does, and of the kinds that fool a decoder that skips
    bad frames or resynchronises: flipped bits and bytes, zeroed runs, cut and repeated
    pages, bytes inserted at a frame boundary, swapped frames, junk appended."""
    start = flac.plain_frames_start(data)
    syncs = [i for i in range(start, len(data) - 1) if data[i : i + 2] == b"\xff\xf8"]
    for k in range(240):
        d = bytearray(data)
        kind = k % 8
        p = int(rng.integers(0, len(d)))
        if kind == 0:
            d[p] ^= 1 << int(rng.integers(8))
        elif kind == 1:
            n = min(int(rng.integers(1, 600)), len(d) - p)
            d[p : p + n] = bytes(n)
        elif kind == 2:  # Any byte of the header and metadata.
            d[int(rng.integers(0, start + 4))] = int(rng.integers(256))
        elif kind == 3:  # A 512-byte block lost or repeated.
            block = p - p % 512
            if rng.integers(2):
                d[block:block] = d[block : block + 512]
            else:
                del d[block : block + 512]
        elif kind == 4:  # Bytes between two frames.
            q = syncs[int(rng.integers(len(syncs)))]
            d[q:q] = rng.bytes(int(rng.integers(1, 40)))
        elif kind == 5:  # Two frames swapped, or one repeated.
            i = int(rng.integers(len(syncs) - 2))
            a, b, c = syncs[i], syncs[i + 1], syncs[i + 2]
            d[a:c] = data[b:c] + data[a:b] if rng.integers(2) else data[a:b] + data[a:c]
        elif kind == 6:
            d += rng.bytes(int(rng.integers(1, 300)))
        else:  # A byte of a frame header.
            d[syncs[int(rng.integers(len(syncs)))] + int(rng.integers(2, 8))] = int(
                rng.integers(256)
            )
        yield kind, bytes(d)


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24"])
def test_damaged_streams_give_libsndfiles_outcome(subtype):
    """Whatever the damage, the decode path gives what libsndfile gives: its error (so the
    stages' rejects stay as they were) or its samples."""
    speech, _ = speechlike(3.0, seed=11)
    data = _flac(speech, 16000, subtype)
    fast_kinds = set()
    for kind, damaged in _mutations(data, np.random.default_rng(5)):
        expected = _outcome(_libsndfile, damaged)
        assert _outcome(reader.decode_member, damaged) == expected, kind
        if reader._decode_flac(damaged) is not None:
            fast_kinds.add(kind)
    assert 2 in fast_kinds  # Bytes no decoder reads (the MD5, say): still the fast path.
    assert 6 not in fast_kinds  # Trailing junk: dr_flac would cope, but it is not plain.


def test_without_miniaudio_libsndfile_decodes_everything_the_same(corpus_members, monkeypatch):
    sample = corpus_members[::3] + [_flac(tone(0.3, 16000), subtype="PCM_24")]
    fast = [_outcome(reader.decode_member, data) for data in sample]
    monkeypatch.setattr(reader, "_miniaudio", None)
    assert all(reader._decode_flac(data) is None for data in sample)
    assert [_outcome(reader.decode_member, data) for data in sample] == fast
    truncated = _flac(tone(1.0, 16000))[:-100]
    assert _outcome(reader.decode_member, truncated) is sf.LibsndfileError


def test_the_fast_decoder_is_what_the_reader_uses(tmp_path, monkeypatch):
    calls = []
    real = reader._decode_flac
    monkeypatch.setattr(reader, "_decode_flac", lambda data: calls.append(1) or real(data))
    members = _shard_locally(
        str(_librispeech(tmp_path)), str(tmp_path / "root"), ShardingOptions(layout="librispeech")
    )
    tars = sorted(glob.glob(str(tmp_path / "root" / "shards" / "*.tar")))
    samples = [s for t in tars for s in reader.iter_shard(t)]
    assert len(samples) == len(members) == len(calls) > 0
    for sample, data in zip(samples, members, strict=True):
        assert np.array_equal(sample.waveform, _libsndfile(data)[0])


def _librispeech(tmp_path):
    write_librispeech(str(tmp_path / "ls"), speakers=1, chapters=1, utterances=2)
    return tmp_path / "ls"
