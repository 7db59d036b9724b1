"""fairseq's own checks of a HuBERT label export, as its loaders run them."""

from __future__ import annotations

import io
import os

import soundfile as sf


def fairseq_label_checks(tsv: str, km: str, dictionary: str, label_rate: float, tol=0.1):
    """What fairseq's HubertDataset does on load: ``load_audio`` reads the tsv (root line,
    then ``path<TAB>samples``), ``load_label`` asserts one label line per kept audio line,
    ``verify_label_lengths`` compares durations (here an error past ``tol`` seconds, where
    fairseq only warns), and ``Dictionary.load`` must know every unit."""
    lines = open(tsv).read().splitlines()[1:]
    sizes = [int(line.split("\t")[1]) for line in lines]
    labels = open(km).read().splitlines()
    assert len(labels) == len(sizes), (
        f"number of labels does not match ({len(labels)} != {len(sizes)})"
    )
    symbols = {line.split()[0] for line in open(dictionary).read().splitlines()}
    for i, (size, line) in enumerate(zip(sizes, labels, strict=True)):
        units = line.split()
        if label_rate > 0:  # fairseq checks no length of sequence labels (label_rate -1).
            duration = len(units) / label_rate
            assert abs(size / 16000 - duration) <= tol, f"line {i}: durations differ"
        assert set(units) <= symbols, f"line {i}: units missing from {dictionary}"
    return len(sizes)


def fairseq_parse_path(path):
    """fairseq.data.audio.audio_utils.parse_path for a ``FILE:OFFSET:LENGTH`` path."""
    _path, *slice_ptr = path.split(":")
    return _path, [int(i) for i in slice_ptr]


def fairseq_get_audio(audio_root: str, name: str):
    """HubertDataset.get_audio: ``root/name`` is a file, or ``FILE.zip:OFFSET:LENGTH``."""
    path, slice_ptr = fairseq_parse_path(os.path.join(audio_root, name))
    if not slice_ptr:
        return sf.read(path, dtype="float32"), None
    assert path.endswith(".zip")  # HubertDataset.get_audio asserts it.
    offset, length = slice_ptr
    with open(path, "rb") as f:  # read_from_stored_zip
        f.seek(offset)
        return sf.read(io.BytesIO(f.read(length)), dtype="float32"), (path, offset)
