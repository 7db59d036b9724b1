"""Small seeded corpora in the real layouts, for tests, benchmarks and the demo.

Audio is speech-like: voiced stretches (a few harmonics of a wandering pitch, with syllable
rate amplitude modulation) between pauses of faint noise, so voice-activity detection has
something real to find. A local generator is seeded per file; the global RNG is untouched.
"""

from __future__ import annotations

import json
import os

import numpy as np
import soundfile as sf

from .vad import Interval


def speechlike(
    seconds: float, rate: int = 16_000, seed: int = 0, pitch: float = 140.0
) -> tuple[np.ndarray, list[Interval]]:
    """Returns ``(audio, voiced intervals in seconds)`` of about ``seconds`` length."""
    rng = np.random.default_rng(seed)
    n = max(1, int(round(seconds * rate)))
    out = (rng.standard_normal(n) * 1e-3).astype(np.float32)
    intervals: list[Interval] = []
    t = rng.uniform(0.05, 0.3)
    while t < seconds - 0.2:
        length = min(rng.uniform(0.4, 2.5), seconds - t - 0.05)
        a, b = int(t * rate), int((t + length) * rate)
        time = np.arange(b - a) / rate
        f0 = pitch * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * time))
        phase = 2 * np.pi * np.cumsum(f0) / rate
        voice = sum(np.sin(k * phase) / k for k in range(1, 6))
        envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 6) * time) ** 2
        out[a:b] += (0.15 * voice * envelope).astype(np.float32)
        intervals.append((a / rate, b / rate))
        t += length + rng.uniform(0.3, 1.2)
    return out, intervals


def write_audio(
    path: str, audio: np.ndarray, rate: int, subtype: str = "PCM_16", fmt: str | None = None
) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    sf.write(path, audio, rate, subtype=subtype, format=fmt)


def write_librispeech(
    root: str,
    speakers: int = 2,
    chapters: int = 2,
    utterances: int = 3,
    seconds: tuple[float, float] = (1.0, 3.0),
    seed: int = 0,
) -> list[str]:
    """Writes ``SPEAKER/CHAPTER/SPEAKER-CHAPTER-UTT.flac`` plus ``*.trans.txt``; returns keys."""
    rng = np.random.default_rng(seed)
    made = []
    for s in range(speakers):
        speaker = str(100 + s * 7)
        for c in range(chapters):
            chapter = str(1000 + c * 13 + s)
            lines = []
            for u in range(utterances):
                key = f"{speaker}-{chapter}-{u:04d}"
                wav, _ = speechlike(
                    rng.uniform(*seconds), seed=int(rng.integers(1 << 31)), pitch=110 + 20 * s
                )
                write_audio(os.path.join(root, speaker, chapter, f"{key}.flac"), wav, 16_000)
                lines.append(f"{key} WORDS OF UTTERANCE {u} BY SPEAKER {speaker}")
                made.append(key)
            with open(
                os.path.join(root, speaker, chapter, f"{speaker}-{chapter}.trans.txt"), "w"
            ) as f:
                f.write("\n".join(lines) + "\n")
    return made


def write_librilight(
    root: str,
    speakers: int = 2,
    books: int = 1,
    files: int = 2,
    seconds: tuple[float, float] = (20.0, 40.0),
    seed: int = 0,
    subset: str = "small",
) -> list[str]:
    """Writes ``SUBSET/SPEAKER/BOOK/NAME.flac`` with ``NAME.json`` sidecars; returns paths."""
    rng = np.random.default_rng(seed)
    made = []
    for s in range(speakers):
        speaker = str(200 + s)
        for b in range(books):
            book = f"book_{b}_librivox"
            for i in range(files):
                name = f"chapter_{i:02d}_reader_64kb"
                wav, intervals = speechlike(
                    rng.uniform(*seconds), seed=int(rng.integers(1 << 31)), pitch=100 + 30 * s
                )
                path = os.path.join(root, subset, speaker, book, f"{name}.flac")
                write_audio(path, wav, 16_000)
                meta = {
                    "speaker": speaker,
                    "book_meta": {"id": str(b), "title": f"Book {b}"},
                    "snr": float(rng.uniform(10, 30)),
                    "voice_activity": [[round(a, 4), round(e, 4)] for a, e in intervals],
                }
                with open(path[: -len(".flac")] + ".json", "w") as f:
                    json.dump(meta, f)
                made.append(path)
    return made
