"""Rerunning a report: never a poorer one in place of a better, never a file of an earlier run
left beside a new page, never a half-written report.

The roots are written directly, as in ``test_report_streaming.py`` (a manifest, a label
shard, ``meta.json`` and 100 Hz phones): no audio and no Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipelines import report as cli
from shards.core import storage
from shards.core.outputs import StageError
from units.features.frames import MFCC, SAMPLE_RATE
from units.quality import lineage, report
from units.quality.phone_refs import fingerprint

PHONES = ["sil", "aa", "b", "s", "t"]
K = 8


def _write_labels(root: str, name: str, seed: int) -> None:
    """Label set ``name``: units that follow the phones of :func:`_write_root` (seeded),
    and a ``meta.json`` whose k-means fingerprint says which seed made them."""
    refs = _references(root)
    rng = np.random.default_rng(seed)
    units = {
        key: np.where(rng.random(len(p)) < 0.2, rng.integers(0, K, len(p)), p % K)
        for key, p in refs.items()
    }
    directory = os.path.join(root, "labels", name)
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(os.path.join(directory, "units"))
    table = pa.table(
        {"key": list(units), "units": pa.array([u.astype(np.uint16) for u in units.values()])}
    )
    pq.write_table(table, os.path.join(directory, "units", "000000.parquet"))
    meta = {
        "kmeans": "km",
        "kmeans_fingerprint": f"seed-{seed}",
        "k": K,
        "frame_rate": 100.0,
        "spec": {"extractor": "mfcc", "dim": 39, "window": 400, "hop": 160},
        "utterances": len(units),
        "frames": int(sum(len(u) for u in units.values())),
    }
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump(meta, f)


def _references(root: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    refs = {}
    for i in range(4):
        frames = MFCC.frames(int((1.0 + 0.25 * i) * SAMPLE_RATE))
        runs = rng.integers(4, 12, size=frames)
        refs[f"u{i}"] = np.repeat(rng.integers(0, len(PHONES), size=frames), runs)[:frames]
    return refs


@pytest.fixture
def root(tmp_path):
    """A root with label set ``km`` and its phones in ``phones.tsv`` beside it."""
    root = str(tmp_path / "root")
    refs = _references(root)
    os.makedirs(os.path.join(root, "manifest"))
    manifest = pa.table(
        {
            "key": list(refs),
            "duration": [MFCC.samples_for(len(p)) / SAMPLE_RATE for p in refs.values()],
            "speaker": ["s1"] * len(refs),
        }
    )
    pq.write_table(manifest, os.path.join(root, "manifest", "utterances.parquet"))
    with open(tmp_path / "phones.tsv", "w") as f:
        for key, ids in refs.items():
            f.write(f"{key}\t{','.join(PHONES[i] for i in ids)}\n")
    _write_labels(root, "km", seed=0)
    return root


def _files(directory: str) -> dict[str, bytes]:
    return {
        name: open(os.path.join(directory, name), "rb").read() for name in os.listdir(directory)
    }


def _siblings(directory: str) -> list[str]:
    parent, name = os.path.split(directory)
    return sorted(n for n in os.listdir(parent) if n != name and name in n)


def test_the_metrics_record_the_phones_used_and_their_sha256(root):
    phones = os.path.join(os.path.dirname(root), "phones.tsv")
    out = os.path.join(root, "reports", "km")
    done = report.update(root, "km", out, phones)
    saved = json.loads(open(done.paths["metrics"]).read())
    assert saved["phones"]["references"] == phones
    assert saved["phones"]["references_sha256"] == fingerprint(phones)
    meta = json.loads(open(os.path.join(root, "labels", "km", "meta.json")).read())
    assert saved["lineage"]["labels_fingerprint"] == lineage.labels_fingerprint(meta)
    page = open(done.paths["report"]).read()
    assert "<th>reference phones sha256</th>" in page and fingerprint(phones) in page
    assert "references_sha256" not in page and "labels_fingerprint" not in page  # Names, not keys.


def test_a_rerun_without_phones_reuses_those_of_the_report_there(root):
    phones = os.path.join(os.path.dirname(root), "phones.tsv")
    out = os.path.join(root, "reports", "km")
    first = report.update(root, "km", out, phones)
    again = report.update(root, "km", out)
    assert again.written and again.metrics["phones"]["references"] == phones
    assert again.metrics["phones"]["pnmi"] == first.metrics["phones"]["pnmi"] > 0
    assert "reusing" in again.note and phones in again.note
    assert os.path.exists(os.path.join(out, "phone_unit.png"))


@pytest.mark.parametrize("what", ["gone", "changed"])
def test_a_rerun_without_phones_keeps_the_report_when_its_phones_are_gone_or_changed(
    root, tmp_path, what
):
    phones = str(tmp_path / "copy.tsv")
    shutil.copy(tmp_path / "phones.tsv", phones)
    out = os.path.join(root, "reports", "km")
    report.update(root, "km", out, phones)
    before = _files(out)
    if what == "gone":
        os.remove(phones)
    else:
        with open(phones, "a") as f:
            f.write("u9\tsil,sil\n")
    kept = report.update(root, "km", out)
    assert not kept.written and f"are {what}" in kept.note and "kept" in kept.note
    assert _files(out) == before  # Not a byte changed, nothing added or removed.
    assert kept.metrics["phones"]["pnmi"] > 0 and kept.paths["report"].endswith("report.html")
    assert set(kept.paths) == {"report", "metrics", "usage", "phone_unit", "utterances", "corpus"}


def test_a_report_for_changed_labels_is_rebuilt_without_gone_phones(root, tmp_path):
    phones = str(tmp_path / "copy.tsv")
    shutil.copy(tmp_path / "phones.tsv", phones)
    out = os.path.join(root, "reports", "km")
    report.update(root, "km", out, phones)
    os.remove(phones)
    _write_labels(root, "km", seed=1)  # Another k-means labelled again: another meta.json.
    rebuilt = report.update(root, "km", out)
    assert rebuilt.written and "labels changed" in rebuilt.note
    assert "phones" not in rebuilt.metrics
    # The usage-only report has no P(phone | unit): its figure of the earlier run is gone.
    assert sorted(os.listdir(out)) == ["corpus.png", "metrics.json", "report.html", "usage.png"]


def test_a_stale_figure_and_stopped_writers_leftovers_are_gone_after_a_rerun(root):
    out = os.path.join(root, "reports", "km")
    report.update(root, "km", out)
    with open(os.path.join(out, "durations.png"), "wb") as f:  # A figure no run makes now.
        f.write(b"old")
    os.makedirs(os.path.join(root, "reports", ".km.tmp-1-deadbeef"))  # A killed writer's.
    report.update(root, "km", out)
    assert "durations.png" not in os.listdir(out)
    assert _siblings(out) == []


def test_a_write_that_fails_midway_leaves_the_earlier_report_whole(root):
    out = os.path.join(root, "reports", "km")
    report.update(root, "km", out)
    before = _files(out)
    # The second file is not bytes: the write fails after the first one was written.
    with pytest.raises(TypeError):
        report.replace_directory(out, {"report.html": b"new page", "usage.png": None})
    assert _files(out) == before and _siblings(out) == []


def test_a_report_left_aside_by_a_stopped_swap_is_put_back_before_anything_else(root):
    phones = os.path.join(os.path.dirname(root), "phones.tsv")
    out = os.path.join(root, "reports", "km")
    report.update(root, "km", out, phones)
    # Killed between its two renames: the earlier report aside, the new one not yet in place.
    os.rename(out, os.path.join(root, "reports", ".km.old-1-deadbeef"))
    os.makedirs(os.path.join(root, "reports", ".km.tmp-1-deadbeef"))
    again = report.update(root, "km", out)  # No phones: the report put back decides.
    assert again.written and again.metrics["phones"]["references"] == phones
    assert _siblings(out) == []


@pytest.fixture(scope="module")
def bucket(s3_server):
    pafs.S3FileSystem(endpoint_override=s3_server, allow_bucket_creation=True).create_dir("reports")
    return "s3://reports"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_replaced_report_holds_the_new_files_and_nothing_of_the_earlier_one(
    where, tmp_path, request
):
    base = str(tmp_path) if where == "local" else request.getfixturevalue("bucket")
    directory = storage.join(base, "reports/km")
    report.replace_directory(directory, {"report.html": b"one", "old.png": b"x", "a.png": b"y"})
    if where == "s3":  # No rename there: a file not a report's is left, not swept away.
        storage.write_bytes(storage.join(directory, "notes.txt"), b"kept")
    report.replace_directory(directory, {"report.html": b"two", "a.png": b"z"})
    names = storage.listdir(directory)
    assert [n for n in names if n != "notes.txt"] == ["a.png", "report.html"]
    assert storage.read_bytes(storage.join(directory, "report.html")) == b"two"
    assert storage.read_bytes(storage.join(directory, "a.png")) == b"z"
    if where == "s3":
        assert "notes.txt" in names
    else:
        assert _siblings(directory) == []


def test_a_directory_holding_other_files_is_not_replaced(root, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(StageError, match=r"holds files that are not a report's \(notes.txt\)"):
        report.update(root, "km", str(out))
    assert os.listdir(out) == ["notes.txt"]
    args = ["--root", root, "--labels", "km", "--out", str(out), "--record", str(tmp_path / "r")]
    assert cli.main(args) == 2


def test_the_cli_says_when_it_kept_a_report_and_the_comparison_links_each_report(
    root, tmp_path, capsys
):
    phones = str(tmp_path / "copy.tsv")
    shutil.copy(tmp_path / "phones.tsv", phones)
    _write_labels(root, "km2", seed=2)
    assert cli.main(["--root", root, "--labels", "km", "km2", "--phones", phones]) == 0
    os.remove(phones)
    capsys.readouterr()
    assert cli.main(["--root", root, "--labels", "km", "km2"]) == 0
    out = capsys.readouterr().out
    for name in ("km", "km2"):
        page = os.path.join(root, "reports", name, "report.html")
        assert f"report: {page} (kept as it was)" in out
        assert "PNMI" in open(page).read()
    comparison = os.path.join(root, "reports", "compare-km+km2", "comparison.html")
    html = open(comparison).read()
    for name in ("km", "km2"):  # Each name links its own report, which is there.
        assert f'<a href="../{name}/report.html">{name}</a>' in html
        assert os.path.exists(os.path.join(os.path.dirname(comparison), f"../{name}/report.html"))
    # A stage of the hubert pipeline: a kept report is work not done.
    args = argparse.Namespace(root=root, labels="km", phones=None, out=None)
    result = cli.run(args)
    assert result["written"] is False and "kept" in result["note"]
    assert "(kept as it was)" in cli.summarize(args, result)
