"""The demo's second half: the other targets of the seed list on the same corpus, compared.

After the HuBERT iteration (MFCC, k = 100), on the same Ray instance and root:

- k-means of k = 50 and 200 on the same MFCC store, labelled together in one pass (one
  MFCC computation per batch for both: ``unitpipe label --kmeans A B --name A B``);
- BEST-RQ labels (80 log-mel filterbanks stacked to 25 Hz, 16-d projection, 8,192 codes:
  ``unitpipe bestrq``);
- HuBERT-AP acoustic pieces over the k = 100 units (``unitpipe pieces``);
- one page that compares the four label sets on the generated phone alignments
  (``unitpipe report --labels ...``).

Each step is the library call its command makes, so a rerun resumes and a finished step
does nothing.
"""

from __future__ import annotations

import os

#: The k-means of the main iteration, and those the demo adds.
MAIN = "mfcc100"
MORE_K = (50, 200)
BESTRQ = "bestrq"
PIECES = "ap300"


def run_targets(root: str, phones: str, progress: bool) -> dict:
    """Runs the steps above (Ray initialised, the main iteration done); returns each step's
    result and the comparison's paths."""
    from units.bestrq.stage import run as bestrq
    from units.kmeans.estimator import KMeans
    from units.kmeans.stage import StageOptions
    from units.kmeans.stage import run as fit_kmeans
    from units.labels.stage import run_many
    from units.pieces.stage import run as pieces
    from units.quality import compare, report

    names = [f"mfcc{k}" for k in MORE_K]
    for k, name in zip(MORE_K, names, strict=True):
        fit_kmeans(root, "mfcc", name, KMeans(k, seed=0), StageOptions(progress=progress))
    together = run_many(root, names, names, progress=progress)
    quantized = bestrq(root, BESTRQ, progress=progress)
    encoded = pieces(root, MAIN, PIECES, vocab_size=300, progress=progress)
    sets = [MAIN, *names, BESTRQ]
    comparison = compare.compare(root, sets, phones)
    for name in sets[1:]:  # The main set's report is the hubert job's; the page links them all.
        directory = os.path.join(root, "reports", name)
        report.update(root, name, directory, phones, built=comparison.reports[name])
    out = os.path.join(root, "reports", "compare-" + "+".join(sets))
    reports = {name: os.path.join(root, "reports", name, "report.html") for name in sets}
    paths = compare.write_comparison(comparison, out, reports)
    return {
        "labels": dict(zip(names, together, strict=True)),
        "bestrq": quantized,
        "pieces": encoded,
        "comparison": {"paths": paths, "headline": compare.headline(comparison)},
    }


def summary(root: str, result: dict) -> list[str]:
    """Lines for the demo's summary: what each step made and where."""
    lines = []
    for name, labels in result["labels"].items():
        lines.append(f"label: {name}: {labels['utterances']} utterances (one pass for both k)")
    quantized = result["bestrq"]
    lines.append(
        f"bestrq: {quantized['utterances']} utterances at {quantized['frame_rate']:g} Hz, "
        f"codebook of {quantized['k']}, in {root}/labels/{BESTRQ}"
    )
    encoded = result["pieces"]
    lines.append(
        f"pieces: {encoded['utterances']} utterances as {encoded['pieces']} pieces "
        f"({encoded['vocab_size']}-piece {encoded['model_type']}), in {root}/pieces/{PIECES}"
    )
    lines.append(f"compare: {result['comparison']['paths']['comparison']}")
    lines += ["  " + line for line in result["comparison"]["headline"]]
    return lines
