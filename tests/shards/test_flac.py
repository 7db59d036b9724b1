import io

import numpy as np
import pytest
import soundfile as sf

from shards import flac
from tests.conftest import tone


def _flac(x, rate=16000, subtype="PCM_16"):
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="FLAC", subtype=subtype)
    return buf.getvalue()


@pytest.mark.parametrize("frames", [1, 400, 4095, 4096, 4097, 57_600])
@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24"])
@pytest.mark.parametrize("channels", [1, 2])
def test_streaminfo_matches_libsndfile_and_whole_files_pass(frames, subtype, channels):
    x = np.random.default_rng(frames).uniform(-0.5, 0.5, (frames, channels)).astype(np.float32)
    data = _flac(x, 44100, subtype)
    info, whole = flac.probe_bytes(data)
    ref = sf.info(io.BytesIO(data))
    assert (info.total_samples, info.sample_rate, info.channels, info.subtype) == (
        ref.frames,
        ref.samplerate,
        ref.channels,
        ref.subtype,
    )
    assert whole


def test_every_truncation_point_is_caught():
    data = _flac(tone(3.0, 16000))
    cuts = range(42, len(data) - 1, 37)
    assert not any(flac.probe_bytes(data[:cut])[1] for cut in cuts)


def test_non_flac_bytes_are_left_to_libsndfile():
    wav = io.BytesIO()
    sf.write(wav, tone(0.1, 16000), 16000, format="WAV")
    assert flac.probe_bytes(wav.getvalue()) == (None, False)
    assert flac.probe_bytes(b"fLaC") == (None, False)
