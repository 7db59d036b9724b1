import io
import math
import tracemalloc

import numpy as np
import pytest
import soundfile as sf

from shards import audio
from shards.audio import AudioError, EncodedFile, iter_16k
from tests.conftest import tone


def _dominant_hz(x: np.ndarray, rate: int = 16000) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resampling_gives_ceil_of_the_rate_ratio_samples_and_keeps_pitch(tmp_path, rate):
    path = tmp_path / "x.wav"
    sf.write(path, tone(1.3, rate, freq=440.0), rate, subtype="FLOAT")
    out = np.concatenate(list(iter_16k(str(path), block_frames=4096)))
    assert len(out) == math.ceil(round(1.3 * rate) * 16000 / rate)
    assert abs(_dominant_hz(out) - 440.0) < 2.0


def test_16k_audio_is_not_resampled_and_16bit_samples_round_trip_exactly(tmp_path):
    x = tone(0.7, 16000)
    sf.write(tmp_path / "x.wav", x, 16000, subtype="PCM_16")
    stored, _ = sf.read(tmp_path / "x.wav", dtype="int16")
    out = np.concatenate(list(iter_16k(str(tmp_path / "x.wav"), block_frames=1000)))
    np.testing.assert_array_equal(audio.to_pcm16(out), stored)


def test_channels_are_averaged(tmp_path):
    x = tone(0.5, 16000, channels=8)
    sf.write(tmp_path / "x.wav", x, 16000, subtype="FLOAT")
    out = np.concatenate(list(iter_16k(str(tmp_path / "x.wav"))))
    np.testing.assert_allclose(out, x.mean(axis=1), atol=1e-6)


def test_nan_is_found_and_named_by_frame(tmp_path):
    x = tone(1.0, 16000)
    x[9000] = np.nan
    sf.write(tmp_path / "x.wav", x, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="frame 9000") as err:
        list(iter_16k(str(tmp_path / "x.wav"), block_frames=4096))
    assert err.value.reason.value == "non_finite"


def test_corrupt_flac_fails_to_decode_with_reason_corrupt(tmp_path):
    sf.write(tmp_path / "x.flac", tone(2.0, 16000, seed=1), 16000)
    data = bytearray((tmp_path / "x.flac").read_bytes())
    data[len(data) // 2 : len(data) // 2 + 300] = bytes(300)
    (tmp_path / "x.flac").write_bytes(bytes(data))
    with pytest.raises(AudioError) as err:
        audio.verify_decodes(str(tmp_path / "x.flac"))
    assert err.value.reason.value == "corrupt"


def test_encoded_streams_decode_back_to_what_was_written():
    a, b = tone(0.5, 16000, seed=1), tone(0.25, 16000, freq=880, seed=2)
    with EncodedFile() as enc:
        for x in (a, b):
            enc.begin()
            enc.write(x[:1000])
            enc.write(x[1000:])
            enc.end()
        for i, x in enumerate((a, b)):
            f, size = enc.open_stream(i)
            decoded, rate = sf.read(io.BytesIO(f.read(size)), dtype="int16")
            assert rate == 16000
            np.testing.assert_array_equal(decoded, audio.to_pcm16(x))


@pytest.mark.slow
def test_a_multi_hour_file_streams_in_bounded_memory(tmp_path):
    """Two hours at 8 kHz: the whole file as float32 at 16 kHz would be 460 MB."""
    rate, hours = 8000, 2
    path = tmp_path / "long.flac"
    with sf.SoundFile(path, "w", rate, 1, "PCM_16", format="FLAC") as f:
        block = tone(60.0, rate, amplitude=0.01)
        for _ in range(hours * 60):
            f.write(block)
    tracemalloc.start()
    total = 0
    with EncodedFile() as enc:
        enc.begin()
        for x in iter_16k(str(path)):
            total += len(x)
            enc.write(x)
        enc.end()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert total == hours * 3600 * 16000
    assert peak < 64 << 20, f"peak {peak / 2**20:.0f} MiB: the file was not streamed"


@pytest.mark.parametrize("rate,channels", [(16000, 1), (44100, 1), (16000, 2), (48000, 3)])
def test_16bit_files_read_as_int16_give_exactly_what_the_float_path_gives(tmp_path, rate, channels):
    x = tone(0.8, rate, channels=channels)
    sf.write(tmp_path / "int.wav", x, rate, subtype="PCM_16")
    as_int, _ = sf.read(tmp_path / "int.wav", dtype="int16")
    sf.write(tmp_path / "float.wav", as_int.astype(np.float32) / 32768, rate, subtype="FLOAT")
    fast = np.concatenate(list(iter_16k(str(tmp_path / "int.wav"), block_frames=5000)))
    slow = np.concatenate(list(iter_16k(str(tmp_path / "float.wav"), block_frames=5000)))
    assert fast.dtype == (np.int16 if (rate, channels) == (16000, 1) else np.float32)
    np.testing.assert_array_equal(audio.to_pcm16(fast), audio.to_pcm16(slow))


def test_a_decoder_failure_says_what_libsndfile_said_and_never_names_a_file_object():
    """Reject messages land in rejects.parquet: a file object's repr in them (soundfile's
    "Error opening <_io.BytesIO object at 0x...>") would differ from run to run."""
    garbage = b"not audio at all " * 64
    with pytest.raises(AudioError) as in_memory:
        audio.verify_decodes(io.BytesIO(garbage))
    with pytest.raises(AudioError) as again:
        audio.verify_decodes(io.BytesIO(garbage))
    assert in_memory.value.reason == "corrupt"
    assert str(in_memory.value) == "decoder failed: Format not recognised."
    assert str(again.value) == str(in_memory.value)
