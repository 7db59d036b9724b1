"""The unit-quality report on a small demo corpus: files, figures and numbers that agree."""

from __future__ import annotations

import base64
import io
import json

import matplotlib.image
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from pipelines import report as cli
from pipelines.demo.corpus import write_demo_corpus
from shards import reader
from shards.plan import ShardingOptions
from shards.ray_sharding import run as shard
from units.features.extractors import ExtractorOptions
from units.features.sampling import SampleRequest
from units.features.stage import run as extract
from units.kmeans.estimator import KMeans
from units.kmeans.stage import run as fit_kmeans
from units.labels.stage import run as label
from units.quality import report, utterance_view
from units.quality.metrics import MetricsError, joint_counts, quality, usage
from units.quality.phone_refs import ReferenceError, read_phone_tsv

matplotlib.use("Agg")

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def demo(tmp_path_factory, ray_local):
    corpus = tmp_path_factory.mktemp("corpus")
    write_demo_corpus(str(corpus), minutes=1.0, speakers=3, seed=1)
    root = tmp_path_factory.mktemp("root")
    shard([str(corpus)], str(root), ShardingOptions(max_samples=6))
    extract(str(root), "mfcc", ExtractorOptions("mfcc"), SampleRequest(percent=50, seed=0))
    fit_kmeans(str(root), "mfcc", "km", KMeans(24, seed=0, block_rows=1024))
    label(str(root), "km", "km")
    return root, corpus / "phones.tsv"


def _labels(root):
    """The stored units by key, in the label shards' order."""
    table = ds.dataset(str(root / "labels" / "km" / "units")).to_table(columns=["key", "units"])
    return {r["key"]: r["units"] for r in table.to_pylist()}


def test_the_report_renders_and_its_numbers_are_the_metrics(demo, tmp_path):
    root, phones = demo
    assert cli.main(["--root", str(root), "--labels", "km", "--phones", str(phones)]) == 0
    out = root / "reports" / "km"
    saved = json.loads((out / "metrics.json").read_text())
    # The same numbers from the formulas on the raw files, computed here independently.
    want = quality(joint_counts(read_phone_tsv(str(phones)), _labels(root)))
    for name in ("pnmi", "phone_purity", "cluster_purity", "h_phone", "h_unit", "frames"):
        assert saved["phones"][name] == pytest.approx(want[name]), name
    assert saved["phones"]["frame_difference"] == 0  # The alignments have the MFCC frames.
    assert saved["phones"]["missing_utterances"] == 0 and 0.2 < saved["phones"]["pnmi"] < 1
    plain = usage(_labels(root), 24)
    for name in ("perplexity", "dead", "used", "mean_run_length", "dedup_ratio", "frames"):
        assert saved["usage"][name] == pytest.approx(plain[name]), name
    page = (out / "report.html").read_text()

    # A rejects panel only where there are rejects: no figure without data.
    assert (out / "rejects.png").exists() == bool(saved["rejects"])
    figures = ["usage", "phone_unit", "utterances", "inertia", "corpus"]
    figures += ["rejects"] * bool(saved["rejects"])
    for name in figures:
        png = (out / f"{name}.png").read_bytes()
        image = matplotlib.image.imread(io.BytesIO(png), format="png")
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image.std() > 0.01  # Not a blank canvas.
        assert base64.b64encode(png).decode() in page  # Embedded: one self-contained file.
    assert f"PNMI <b>{saved['phones']['pnmi']:.3f}</b>" in page
    assert f"{saved['usage']['perplexity']:.4f}" in page
    assert 'src="http' not in page and "<script" not in page


def test_without_phones_the_report_shows_usage_only(demo, tmp_path):
    root, _ = demo
    built = report.build(str(root), "km")
    paths = report.write(built, str(tmp_path / "plain"))
    assert "phones" not in built.metrics and "phone_unit" not in paths
    assert built.metrics["usage"]["used"] + built.metrics["usage"]["dead"] == 24
    assert len(built.inertia) >= 1 and built.inertia == sorted(built.inertia, reverse=True)
    # Per frame of the fit: the k-means's own final inertia over the frames it was fitted on.
    fitted = json.loads((root / "kmeans" / built.metrics["kmeans"] / "kmeans.json").read_text())
    assert built.inertia_frames == fitted["rows"] > 0
    assert built.inertia[-1] == pytest.approx(fitted["inertia"] / fitted["rows"])


def test_bad_references_are_clear_errors(demo, tmp_path, capsys):
    root, phones = demo
    refs = read_phone_tsv(str(phones))
    half = tmp_path / "at50.tsv"  # Every second frame: a 50 Hz file.
    half.write_text("".join(f"{u}\t{','.join(p[::2])}\n" for u, p in refs.items()))
    with pytest.raises(ReferenceError, match=r"at50.tsv: the references have 4\d.\d frames"):
        report.build(str(root), "km", str(half))
    other = tmp_path / "other.tsv"
    other.write_text("".join(f"x{u}\t{','.join(p)}\n" for u, p in refs.items()))
    with pytest.raises(MetricsError, match="no utterance has both"):
        report.build(str(root), "km", str(other))
    partial = tmp_path / "partial.tsv"
    keep = sorted(refs)[: len(refs) // 2]
    partial.write_text("".join(f"{u}\t{','.join(refs[u])}\n" for u in keep) + "ghost\tsil,sil\n")
    built = report.build(str(root), "km", str(partial))
    assert built.metrics["phones"]["utterances"] == len(keep)  # Computed on the overlap,
    assert built.metrics["phones"]["missing_utterances"] == 1  # and the gap is reported.
    broken = tmp_path / "broken.tsv"
    broken.write_text("u1\tsil\n\n")
    argv = ["--root", str(root), "--labels", "km", "--phones", str(broken)]
    assert cli.main(argv) == 2
    assert "broken.tsv, line 2: empty line" in capsys.readouterr().err
    assert cli.main(["--root", str(root), "--labels", "nope"]) == 2
    assert np.isfinite(built.metrics["phones"]["pnmi"])


def test_the_utterance_view_draws_the_first_utterances_from_their_shards_and_units(demo, tmp_path):
    root, phones = demo
    stored, refs = _labels(root), read_phone_tsv(str(phones))
    built = report.build(str(root), "km", str(phones))
    shown = built.utterances
    # The first utterances of the label shards (every one has references here).
    assert [u.key for u in shown] == list(stored)[: utterance_view.COUNT]
    for utterance in shown:
        np.testing.assert_array_equal(utterance.units, stored[utterance.key])
        assert utterance.phones == refs[utterance.key]
        # The audio is the shard's member, read back independently by key.
        np.testing.assert_array_equal(
            utterance.waveform, reader.get(str(root), utterance.key).waveform
        )
        # The drawn unit boundaries are the stored units' changes: the runs give them back.
        runs = utterance_view.segments(utterance.units, utterance.contract)
        lengths = [round((r.end - r.start) * built.metrics["frame_rate"]) for r in runs]
        np.testing.assert_array_equal(np.repeat([r.label for r in runs], lengths), utterance.units)
        changes = np.flatnonzero(np.diff(utterance.units.astype(np.int64))) + 1
        assert len(runs) == len(changes) + 1
        assert runs[0].start == pytest.approx(0.0075)  # MFCC: 12.5 ms less half a hop.
    paths = report.write(built, str(tmp_path / "with"))
    page = (tmp_path / "with" / "report.html").read_text()
    png = open(paths["utterances"], "rb").read()
    assert base64.b64encode(png).decode() in page and "reference phones and the units" in page

    plain = report.build(str(root), "km")  # Without phones: spectrogram and units only.
    assert [u.key for u in plain.utterances] == [u.key for u in shown]
    assert all(u.phones is None and u.waveform is not None for u in plain.utterances)
    paths = report.write(plain, str(tmp_path / "without"))
    png = open(paths["utterances"], "rb").read()
    image = matplotlib.image.imread(io.BytesIO(png), format="png")
    assert image.std() > 0.01
    assert base64.b64encode(png).decode() in (tmp_path / "without" / "report.html").read_text()


def test_the_lineage_is_what_the_label_set_and_its_k_means_recorded(demo):
    root, _ = demo
    built = report.build(str(root), "km")
    made_from = built.metrics["lineage"]
    meta = json.loads((root / "labels" / "km" / "meta.json").read_text())
    fitted = json.loads((root / "kmeans" / "km" / "kmeans.json").read_text())
    summary = json.loads((root / "manifest" / "summary.json").read_text())
    assert made_from["labels"] == "km" and made_from["target"] == "kmeans"
    assert made_from["extractor"] == meta["spec"] and made_from["extractor"]["extractor"] == "mfcc"
    for key in ("frame_rate", "manifest_sha256", "hours", "utterances", "features"):
        assert made_from[key] == meta[key], key
    assert made_from["kmeans"]["name"] == meta["kmeans"] == "km"
    assert made_from["kmeans"]["fingerprint"] == meta["kmeans_fingerprint"] == fitted["fingerprint"]
    for key in ("k", "seed", "config", "rows", "iterations", "converged", "features_fingerprint"):
        assert made_from["kmeans"][key] == fitted[key], key
    assert made_from["kmeans"]["config"]["n_clusters"] == 24
    assert made_from["corpus"]["hours"] == summary["hours"]
    assert made_from["versions"]["labels"] == meta["version"]
    assert made_from["libraries"]["numpy"] == np.__version__
    assert made_from["libraries"]["pyarrow"] == pa.__version__
    page = report.render_html(built, {})
    lineage_section = page[page.index("<h2>Lineage</h2>") :]
    assert meta["kmeans_fingerprint"] in lineage_section and meta["manifest_sha256"] in page
    assert "<th>k-means frames fitted</th>" in lineage_section  # Names, not keys.
