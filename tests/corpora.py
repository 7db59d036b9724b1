"""Corpora of bad and awkward inputs, each file named for what is wrong with it.

``EXPECTED`` maps each file to the reject reason it must get (``None``: it must be taken).
"""

from __future__ import annotations

import json
import os

import numpy as np
import soundfile as sf

from tests.conftest import tone

#: file name -> expected reject reason, or None when the file must end up in the shards.
EXPECTED = {
    "good_16k.flac": None,
    "truncated.flac": "truncated",
    "empty.flac": "empty_file",
    "header_only.wav": "no_samples",
    "text_named.flac": "not_audio",
    "broken_link.flac": "broken_symlink",
    "nan_float.wav": "non_finite",
    "inf_float.wav": "non_finite",
    "eight_channels.wav": None,
    "rate_8k.wav": None,
    "rate_44k1.flac": None,
    "rate_48k.wav": None,
    "tiny_300_samples.wav": "too_short",
    "exactly_400_samples.wav": None,
    "dup key.wav": None,  # key "dup_key": the first in path order wins...
    "dup_key.wav": "duplicate_key",  # ...and this one is rejected, never overwritten.
    "spaces and dots.v2.wav": None,
    "ünïcödé_名前.wav": None,
    "bad_sidecar.flac": "bad_sidecar",
    "corrupt_48k.flac": "corrupt",  # Transcoded, so decoded in full: corruption is found.
}


def write_bad_corpus(root: str) -> dict[str, str | None]:
    """Writes every case of :data:`EXPECTED` under ``root``; returns ``EXPECTED``."""
    os.makedirs(root, exist_ok=True)
    p = lambda name: os.path.join(root, name)  # noqa: E731
    sf.write(p("good_16k.flac"), tone(1.0, 16000), 16000, subtype="PCM_16")
    sf.write(p("truncated.flac"), tone(2.0, 16000, seed=1), 16000, subtype="PCM_16")
    data = open(p("truncated.flac"), "rb").read()
    open(p("truncated.flac"), "wb").write(data[: len(data) // 2])
    open(p("empty.flac"), "wb").close()
    sf.write(p("header_only.wav"), np.zeros(0, np.float32), 16000)
    with open(p("text_named.flac"), "w") as f:
        f.write("this is a text file, not FLAC\n" * 20)
    os.symlink(p("does_not_exist.flac"), p("broken_link.flac"))
    nan = tone(0.5, 16000)
    nan[1234] = np.nan
    sf.write(p("nan_float.wav"), nan, 16000, subtype="FLOAT")
    inf = tone(0.5, 16000)
    inf[100] = np.inf
    sf.write(p("inf_float.wav"), inf, 16000, subtype="FLOAT")
    sf.write(p("eight_channels.wav"), tone(0.5, 16000, channels=8), 16000)
    sf.write(p("rate_8k.wav"), tone(0.5, 8000), 8000)
    sf.write(p("rate_44k1.flac"), tone(0.5, 44100), 44100)
    sf.write(p("rate_48k.wav"), tone(0.5, 48000), 48000)
    sf.write(p("tiny_300_samples.wav"), tone(300 / 16000, 16000), 16000)
    sf.write(p("exactly_400_samples.wav"), tone(400 / 16000, 16000), 16000)
    sf.write(p("dup key.wav"), tone(0.3, 16000, seed=2), 16000)
    sf.write(p("dup_key.wav"), tone(0.3, 16000, seed=3), 16000)
    sf.write(p("spaces and dots.v2.wav"), tone(0.3, 16000, seed=4), 16000)
    sf.write(p("ünïcödé_名前.wav"), tone(0.3, 16000, seed=5), 16000)
    sf.write(p("bad_sidecar.flac"), tone(0.5, 16000), 16000)
    with open(p("bad_sidecar.json"), "w") as f:
        f.write('{"speaker": "1", "voice_activity": [[0.0, 0.4]')  # Cut short.
    sf.write(p("corrupt_48k.flac"), tone(3.0, 48000, seed=6), 48000)
    data = bytearray(open(p("corrupt_48k.flac"), "rb").read())
    mid = len(data) // 2
    data[mid : mid + 400] = bytes(400)
    open(p("corrupt_48k.flac"), "wb").write(bytes(data))
    return EXPECTED


def write_vad_corpus(root: str) -> None:
    """A Libri-light-like pair of files whose sidecars point outside the audio."""
    os.makedirs(root, exist_ok=True)
    sf.write(os.path.join(root, "late.flac"), tone(3.0, 16000), 16000)
    with open(os.path.join(root, "late.json"), "w") as f:
        json.dump({"voice_activity": [[0.5, 1.5], [2.5, 3.7], [5.0, 6.0]]}, f)
    sf.write(os.path.join(root, "elsewhere.flac"), tone(2.0, 16000), 16000)
    with open(os.path.join(root, "elsewhere.json"), "w") as f:
        json.dump({"voice_activity": [[10.0, 12.0]]}, f)
