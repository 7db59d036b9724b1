"""fairseq's own checks of a HuBERT label export, as its loaders run them."""

from __future__ import annotations


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
