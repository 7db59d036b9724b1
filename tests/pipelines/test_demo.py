"""``make demo`` (``python -m pipelines.demo``) end to end, on a smaller corpus."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


#: Enough generated speech for every target (k = 200, 300 pieces) and PNMI well above 0.3
#: (about 0.65 at 1.5 minutes); 3 minutes cost more and assert nothing more.
MINUTES = "1.5"
#: Printed between the demo's rerun and the hubert job's rerun, which share one process.
BETWEEN = "=== hubert report.phones=null ==="

#: The demo a second time, then ``pipelines.hubert`` on the config it wrote without
#: report.phones: two runs in one interpreter (one Python and Ray start-up, not two).
RERUN = f"""
import sys
from pipelines import demo, hubert
code = demo.main(sys.argv[1:3] + ["--minutes", "{MINUTES}"])
print("{BETWEEN}", flush=True)
sys.exit(code or hubert.main(["--config", sys.argv[3], "report.phones=null"]))
"""


def _run(argv):
    out = subprocess.run(
        [sys.executable, *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=REPO),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # Summaries and progress bars; no per-iteration log lines, no JSON dumps.
    assert "k-means iteration" not in out.stderr and "was_current_actor" not in out.stderr
    return out.stdout


def _demo(stdout):
    assert '"shards_written"' not in stdout and len(stdout.splitlines()) < 45
    return stdout


@pytest.mark.slow
def test_the_demo_runs_every_stage_and_reports_pnmi_against_its_alignments(tmp_path):
    stdout = _demo(_run(["-m", "pipelines.demo", "--workdir", str(tmp_path), "--minutes", MINUTES]))
    root = tmp_path / "root"
    utterances = len((tmp_path / "corpus" / "demo" / "phones.tsv").read_text().splitlines())
    assert "0 rejected" in stdout and "kmeans: k=100 on " in stdout
    assert f"label: labelled {utterances} utterances" in stdout
    assert "fairseq: {'train': " in stdout
    assert (root / "labels" / "mfcc100" / "fairseq" / "train.km").exists()
    metrics = json.loads((root / "reports" / "mfcc100" / "metrics.json").read_text())
    phones = metrics["phones"]
    shown = re.search(r"PNMI ([\d.]+), phone purity ([\d.]+), cluster purity ([\d.]+)", stdout)
    assert shown is not None, stdout
    assert [float(x) for x in shown.groups()] == [
        round(phones[k], 3) for k in ("pnmi", "phone_purity", "cluster_purity")
    ]
    assert phones["utterances"] == utterances and phones["missing_utterances"] == 0
    assert phones["frame_difference"] == 0 and 0.3 < phones["pnmi"] < 1
    assert f"report: {root / 'reports' / 'mfcc100' / 'report.html'}" in stdout
    assert (root / "reports" / "mfcc100" / "report.html").stat().st_size > 50_000
    record = json.loads((root / "runs" / "hubert-mfcc100.json").read_text())
    assert record["report"]["metrics"]["phones"] == phones
    assert f"record: {root / 'runs' / 'hubert-mfcc100.json'}" in stdout
    # The other targets on the same corpus, and one page that compares them.
    assert "label: mfcc50: " in stdout and "label: mfcc200: " in stdout
    bestrq = json.loads((root / "labels" / "bestrq" / "meta.json").read_text())
    assert bestrq["utterances"] == utterances and bestrq["frame_rate"] == 25.0
    pieces = json.loads((root / "pieces" / "ap300" / "meta.json").read_text())
    assert pieces["utterances"] == utterances
    compared = root / "reports" / "compare-mfcc100+mfcc50+mfcc200+bestrq"
    rows = json.loads((compared / "comparison.json").read_text())["rows"]
    assert [r["labels"] for r in rows] == ["mfcc100", "mfcc50", "mfcc200", "bestrq"]
    assert all(0 < r["pnmi"] < 1 for r in rows)
    assert f"compare: {compared / 'comparison.html'}" in stdout
    # The report people look at: three utterances on one time axis, and where the units
    # came from.
    html = (root / "reports" / "mfcc100" / "report.html").read_text()
    assert 'alt="utterances"' in html and "<h2>Lineage</h2>" in html
    kmeans = json.loads((root / "kmeans" / "mfcc100" / "kmeans.json").read_text())
    assert metrics["lineage"]["kmeans"]["fingerprint"] == kmeans["fingerprint"]
    for name in ("mfcc50", "mfcc200", "bestrq"):  # Each set the comparison page links to.
        assert (root / "reports" / name / "report.html").exists()
    # A second run finds every stage done and reports the same units; then the job again
    # without report.phones: the PNMI report stays (its phones are reused).
    config = str(tmp_path / "demo.yaml")
    rerun, between, job = _run(["-c", RERUN, "--workdir", str(tmp_path), config]).partition(BETWEEN)
    assert between and shown.group(0) in _demo(rerun)
    assert "== report" in job
    again = json.loads((root / "reports" / "mfcc100" / "metrics.json").read_text())
    assert (
        again["phones"] == phones
        and 'alt="phone_unit"' in (root / "reports" / "mfcc100" / "report.html").read_text()
    )
