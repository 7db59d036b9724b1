"""Label sets compared side by side (quality per target): the rows are the single reports'
numbers, rates from 100 to 25 Hz meet the same 100 Hz phones, and the CLI writes both.

The roots are written directly, as in ``test_report_streaming.py`` (a manifest, label shards
with :data:`units.schemas.LABELS`, ``meta.json``): no audio and no Ray.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import report as cli
from units.features.frames import MFCC, SAMPLE_RATE
from units.quality import compare, report
from units.quality.metrics import joint_counts, quality
from units.quality.phone_refs import read_phone_tsv
from units.schemas import LABELS

PHONES = ["sil", "aa", "b", "k", "iy", "s", "t", "n"]
SETS = ("km100", "hub50", "rq25")


def _write_manifest(root: str, durations: dict[str, float]) -> None:
    os.makedirs(os.path.join(root, "manifest"), exist_ok=True)
    table = pa.table(
        {
            "key": list(durations),
            "duration": list(durations.values()),
            "speaker": [f"s{i % 2}" for i in range(len(durations))],
        }
    )
    pq.write_table(table, os.path.join(root, "manifest", "utterances.parquet"))


def _write_labels(
    root: str, name: str, units: dict[str, np.ndarray], meta: dict, codebooks: int = 1
) -> None:
    """A label set as the label pass leaves it: two shards of :data:`LABELS` rows (and
    ``units_1`` ... for several codebooks), then ``meta.json``."""
    directory = os.path.join(root, "labels", name)
    os.makedirs(os.path.join(directory, "units"))
    schema = LABELS
    for c in range(1, codebooks):
        schema = schema.append(pa.field(f"units_{c}", pa.list_(pa.uint16()), nullable=False))
    keys = list(units)
    for shard, part in (("000000", keys[: len(keys) // 2]), ("000001", keys[len(keys) // 2 :])):
        columns = {
            "key": part,
            "shard": [shard] * len(part),
            "units": [units[k].astype(np.uint16) for k in part],
            "frames": [len(units[k]) for k in part],
            "frame_rate": [meta["frame_rate"]] * len(part),
        }
        for c in range(1, codebooks):
            columns[f"units_{c}"] = [(units[k][::-1] % meta["k"]).astype(np.uint16) for k in part]
        path = os.path.join(directory, "units", f"{shard}.parquet")
        pq.write_table(pa.table(columns, schema=schema), path)
    totals = {"utterances": len(units), "frames": int(sum(len(u) for u in units.values()))}
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump(dict(meta, **totals), f)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Twelve utterances with 100 Hz phones, labelled three ways: a 100 Hz k-means that
    mostly follows the phones, a 50 Hz k-means that follows them more closely, and a 25 Hz
    BEST-RQ codebook (two codebooks, no k-means) that follows them loosely."""
    root = str(tmp_path_factory.mktemp("root"))
    rng = np.random.default_rng(0)
    durations = {f"u{i:03d}": float(rng.uniform(1.0, 3.0)) for i in range(12)}
    _write_manifest(root, durations)
    refs = {}
    for key, seconds in durations.items():
        frames = MFCC.frames(int(round(seconds * SAMPLE_RATE)))
        runs = rng.integers(3, 15, size=frames)  # Phone segments of 30 to 150 ms.
        ids = np.repeat(rng.integers(0, len(PHONES), size=frames), runs)[:frames]
        refs[key] = ids
    phones = os.path.join(root, "phones.tsv")
    with open(phones, "w") as f:
        for key, ids in refs.items():
            f.write(f"{key}\t{','.join(PHONES[i] for i in ids)}\n")
    hyps = {
        "km100": {k: np.where(rng.random(len(p)) < 0.3, rng.integers(0, 16, len(p)), p * 2)
                  for k, p in refs.items()},
        "hub50": {k: p[::2] * 3 + (rng.random(len(p[::2])) < 0.5) for k, p in refs.items()},
        "rq25": {k: np.where(rng.random(len(p[::4])) < 0.5, rng.integers(0, 64, len(p[::4])),
                             p[::4] * 5) for k, p in refs.items()},
    }  # fmt: skip
    _write_labels(root, "km100", hyps["km100"], {"kmeans": "km", "k": 16, "frame_rate": 100.0})
    _write_labels(root, "hub50", hyps["hub50"], {"kmeans": "hub", "k": 32, "frame_rate": 50.0})
    bestrq = {"target": "bestrq", "bestrq": "rq", "k": 64, "codebooks": 2, "stack": 2}
    _write_labels(root, "rq25", hyps["rq25"], dict(bestrq, frame_rate=25.0), codebooks=2)
    os.makedirs(os.path.join(root, "kmeans", "km"))
    iterations = pa.table({"iteration": [0, 1, 2], "inertia": [9.0, 5.0, 4.5]})
    pq.write_table(iterations, os.path.join(root, "kmeans", "km", "iterations.parquet"))
    return root, phones, hyps


def test_a_25_hz_label_covers_four_reference_frames():
    refs = {"u": ["a"] * 4 + ["b"] * 4 + ["c"] * 5}  # 13 frames at 100 Hz, 3 labels at 25 Hz.
    joint = joint_counts(refs, {"u": [7, 9, 9]}, ref_rate=100.0, hyp_rate=25.0)
    np.testing.assert_array_equal(joint.counts, [[4, 0], [0, 4], [0, 4]])
    assert joint.units == [7, 9] and joint.frames == 12 and joint.frame_difference == 1
    numbers = quality(joint)
    assert numbers["phone_purity"] == pytest.approx(8 / 12)
    assert numbers["cluster_purity"] == pytest.approx(1.0)
    # The same as labels at 100 Hz that repeat each 25 Hz label four times.
    same = quality(joint_counts(refs, {"u": np.repeat([7, 9, 9], 4)}))
    assert numbers["pnmi"] == pytest.approx(same["pnmi"])


def test_each_row_is_its_single_report(corpus):
    root, phones, hyps = corpus
    comparison = compare.compare(root, list(SETS), phones)
    assert comparison.labels == list(SETS) and [r["labels"] for r in comparison.rows] == list(SETS)
    refs = read_phone_tsv(phones)
    rates = {"km100": 100.0, "hub50": 50.0, "rq25": 25.0}
    for row in comparison.rows:
        alone = report.build(root, row["labels"], phones).metrics
        assert row["pnmi"] == alone["phones"]["pnmi"]
        assert row["phone_purity"] == alone["phones"]["phone_purity"]
        assert row["cluster_purity"] == alone["phones"]["cluster_purity"]
        assert row["perplexity"] == alone["usage"]["perplexity"]
        assert row["used"] == alone["usage"]["used"] and row["k"] == alone["k"]
        assert row["units_per_second"] == alone["units_per_second"]
        assert row["dedup_units_per_second"] == alone["dedup_units_per_second"]
        # And the formulas on the raw arrays, each rate repeated onto the 100 Hz phones.
        name = row["labels"]
        want = quality(joint_counts(refs, hyps[name], hyp_rate=rates[name]))
        assert row["pnmi"] == pytest.approx(want["pnmi"]) and 0 < row["pnmi"] < 1
        assert row["frame_rate"] == rates[name]
        # Units per second is about the label rate (a front end loses frames at the edges).
        assert rates[name] * 0.95 < row["units_per_second"] < rates[name]
    targets = [r["target"] for r in comparison.rows]
    assert targets == ["k-means km k=16", "k-means hub k=32", "BEST-RQ rq codebook 64 x2"]
    assert comparison.reports["rq25"].metrics["kmeans"] is None
    assert comparison.reports["rq25"].inertia == []  # No k-means, no iterations.
    lines = compare.headline(comparison)
    assert len(lines) == 3 and lines[2].startswith("rq25 (BEST-RQ rq codebook 64 x2): 25 Hz, PNMI")


def test_units_and_deduplicated_units_per_second_on_a_hand_made_root(tmp_path):
    root = str(tmp_path)
    # 1 s and 2 s of labelled audio; a 0.5 s utterance the label pass rejected.
    _write_manifest(root, {"a": 1.0, "b": 2.0, "gone": 0.5})
    units = {"a": np.array([1, 1, 2, 2, 2, 3]), "b": np.array([3, 3, 3, 3])}
    _write_labels(root, "x", units, {"target": "bestrq", "bestrq": "q", "k": 4, "frame_rate": 25})
    os.makedirs(os.path.join(root, "labels", "x", "rejects"))
    rejects = pa.table({"key": ["gone"], "reason": ["frames"]})
    pq.write_table(rejects, os.path.join(root, "labels", "x", "rejects", "000000.parquet"))
    (row,) = compare.compare(root, ["x"]).rows
    assert row["seconds"] == pytest.approx(3.0)
    assert row["units_per_second"] == pytest.approx(10 / 3)  # 10 labels in 3 s.
    # Runs: 1 1 | 2 2 2 | 3 in a, 3 3 3 3 in b (a new utterance starts a run): 4 in 3 s.
    assert row["dedup_units_per_second"] == pytest.approx(4 / 3)
    assert row["used"] == 3 and "pnmi" not in row
    built = report.build(root, "x")
    assert built.metrics["rejects"] == {"label: frames": 1} and built.inertia == []


def _image(png: bytes):
    import matplotlib.image

    return matplotlib.image.imread(io.BytesIO(png), format="png")


def test_the_page_has_one_row_per_set_the_best_marked_and_no_empty_panel(corpus, tmp_path):
    root, phones, _ = corpus
    comparison = compare.compare(root, list(SETS), phones)
    paths = compare.write_comparison(comparison, str(tmp_path / "cmp"))
    page = open(paths["comparison"]).read()
    table = page[page.index("<table>") : page.index("</table>")]
    assert table.count("<tr>") == 1 + len(SETS)  # The header, then one row per set.
    for name in SETS:
        assert f"<th>{name}</th>" in table
    for title in ("PNMI", "phone purity", "cluster purity", "units per second", "perplexity"):
        assert f"<th>{title}</th>" in table
    best = comparison.best()
    pnmis = [r["pnmi"] for r in comparison.rows]
    assert best["pnmi"] == {int(np.argmax(pnmis))}
    assert best["units_per_second"] == {SETS.index("rq25")}
    assert table.count("★") == sum(len(rows) for rows in best.values())
    winner = table.split("<tr>")[2 + int(np.argmax(pnmis))]
    assert f"★ <b>{max(pnmis):.3f}</b>" in winner
    png = open(paths["figure"], "rb").read()
    assert base64.b64encode(png).decode() in page and "<script" not in page
    assert _image(png).std() > 0.01  # Not a blank canvas.
    saved = json.loads(open(paths["json"]).read())
    assert saved["rows"] == json.loads(json.dumps(comparison.rows))
    assert saved["labels"] == list(SETS) and saved["phones"] == phones
    # Each set's own report: no inertia panel without k-means iterations (BEST-RQ has no
    # k-means, "hub" left none), no rejects panel without rejects.
    for name, built in comparison.reports.items():
        written = report.write(built, str(tmp_path / name))
        assert ("inertia" in written) == (name == "km100")
        assert "rejects" not in written
        for figure in set(written) - {"metrics", "report"}:
            assert _image(open(written[figure], "rb").read()).std() > 0.01, (name, figure)
        own = open(written["report"]).read()
        assert "phones: " not in own and "usage: " not in own  # Readable names, not keys.
        assert "<th>PNMI</th>" in own and "<th>dead units</th>" in own
        assert "<th>deduplicated units per second</th>" in own


def test_without_phones_the_table_has_usage_only(corpus, tmp_path):
    root, _, _ = corpus
    comparison = compare.compare(root, ["km100", "rq25"])
    assert [c.key for c in comparison.columns()][-1] == "dedup_units_per_second"
    paths = compare.write_comparison(comparison, str(tmp_path / "cmp"))
    page = open(paths["comparison"]).read()
    assert "PNMI" not in page and "without reference phones" in page
    with pytest.raises(ValueError, match="more than once: km100"):
        compare.compare(root, ["km100", "km100"])


def test_the_cli_writes_each_report_and_the_comparison(corpus, capsys):
    root, phones, _ = corpus
    argv = ["--root", root, "--labels", *SETS, "--phones", phones]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    for name in SETS:
        assert os.path.exists(os.path.join(root, "reports", name, "report.html"))
        assert os.path.exists(os.path.join(root, "reports", name, "metrics.json"))
    directory = os.path.join(root, "reports", "compare-km100+hub50+rq25")
    page = open(os.path.join(directory, "comparison.html")).read()
    assert '<a href="../km100/report.html">km100</a>' in page  # Each name links its report.
    record_path = os.path.join(root, "runs", "report-km100+hub50+rq25.json")
    record = json.loads(open(record_path).read())
    assert record["labels"] == list(SETS) and set(record["reports"]) == set(SETS)
    assert record["paths"]["comparison"] == os.path.join(directory, "comparison.html")
    assert record["headline"] == compare.headline(compare.compare(root, list(SETS), phones))
    for line in record["headline"]:  # One line per set in the summary.
        assert f"  {line}\n" in out
    assert f"comparison: {directory}/comparison.html" in out
    assert len(re.findall(r"^  \S+ \(.*\): .*PNMI", out, re.M)) == len(SETS)

    # One label set: the report and record it always had; a name given as a string (the
    # hubert pipeline's Namespace) as well.
    assert cli.main(["--root", root, "--labels", "rq25", "--phones", phones]) == 0
    single = json.loads(open(os.path.join(root, "runs", "report-rq25.json")).read())
    assert single["labels"] == "rq25" and single["headline"].startswith("units: PNMI")
    args = argparse.Namespace(root=root, labels="hub50", phones=None, out=None)
    cli.check(args)
    assert cli.run(args)["paths"]["report"] == os.path.join(root, "reports", "hub50", "report.html")
    assert cli.record_path(args) == os.path.join(root, "runs", "report-hub50.json")
    assert cli.main(["--root", root, "--labels", "km100", "km100"]) == 2
    assert "--labels names km100 more than once" in capsys.readouterr().err
