"""``python:MODULE:CALLABLE``: any model that follows the extractor protocol feeds the stages."""

from __future__ import annotations

import hashlib
import os
import textwrap

import numpy as np
import pyarrow.dataset as ds
import pytest

import shards
from shards import synthetic
from shards.plan import ShardingOptions
from shards.ray_sharding import run as shard
from units.features.extractors import ExtractorError, ExtractorOptions, build, describe
from units.features.frames import MFCC
from units.features.sampling import SampleRequest
from units.features.stage import run as extract
from units.features.store import FeatureStore
from units.kmeans.estimator import KMeans
from units.kmeans.stage import StageOptions
from units.kmeans.stage import run as fit_kmeans
from units.labels.model import KMeansModel
from units.labels.stage import run as label

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "..", "examples")
HOOK = "python:librosa_logmel:build"


@pytest.fixture(scope="module")
def ray_with_examples():
    """Ray whose workers import from ``examples/``, as ``--working-dir`` would give them."""
    import ray

    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.abspath(EXAMPLES), saved]))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    if saved is None:
        os.environ.pop("PYTHONPATH")
    else:
        os.environ["PYTHONPATH"] = saved


@pytest.fixture
def examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(os.path.abspath(EXAMPLES))


def _hook_module(tmp_path, monkeypatch, name: str, body: str) -> str:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"python:{name}:build"


def test_a_hook_is_recorded_under_its_own_name_and_source_digest(examples_on_path):
    extractor = build(ExtractorOptions(HOOK))
    with open(os.path.join(EXAMPLES, "librosa_logmel.py"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    spec = extractor.spec
    assert (spec.extractor, spec.checkpoint, spec.checkpoint_sha256) == (
        "python", "librosa_logmel:build", digest
    )  # fmt: skip
    assert (spec.dim, spec.window, spec.hop, spec.frame_rate) == (40, 400, 160, 100.0)
    assert describe(ExtractorOptions(HOOK)) == spec
    # The spec names the hook, so a later stage rebuilds it from what the k-means recorded.
    assert ExtractorOptions.from_spec(spec).name == HOOK


def test_a_hooks_frames_keep_its_contract_on_odd_lengths(examples_on_path):
    extractor = build(ExtractorOptions(HOOK))
    rng = np.random.default_rng(0)
    waves = [rng.normal(0, 0.1, n).astype(np.float32) for n in (399, 400, 559, 560, 16_161)]
    for wav, feats in zip(waves, extractor(waves), strict=True):
        assert feats.shape == (MFCC.frames(len(wav)), 40) and feats.dtype == np.float32


@pytest.mark.parametrize(
    "name, message",
    [
        ("python:no_such_module_here:build", "cannot import 'no_such_module_here'"),
        ("python:librosa_logmel:nothing", "has no callable 'nothing'"),
        ("python:librosa_logmel", "python:MODULE:CALLABLE"),
    ],
)
def test_a_hook_that_cannot_be_found_says_what_to_give(examples_on_path, name, message):
    with pytest.raises(ExtractorError, match=message):
        build(ExtractorOptions(name))


def test_a_hook_that_returns_no_extractor_is_refused(tmp_path, monkeypatch):
    name = _hook_module(
        tmp_path, monkeypatch, "not_an_extractor", "def build(options):\n    return 3\n"
    )
    with pytest.raises(ExtractorError, match="returned int, which is not an extractor"):
        build(ExtractorOptions(name))


def test_a_hook_that_breaks_its_frame_contract_fails_on_the_call(tmp_path, monkeypatch):
    name = _hook_module(
        tmp_path,
        monkeypatch,
        "one_frame_short",
        """
        import numpy as np
        from units.features.extractor import FeatureSpec

        class Short:
            spec = FeatureSpec("python", dim=2, window=400, hop=160)

            def __call__(self, waveforms):
                return [np.zeros(((len(w) - 400) // 160, 2), np.float32) for w in waveforms]

        def build(options):
            return Short()
        """,
    )
    extractor = build(ExtractorOptions(name))
    with pytest.raises(ExtractorError, match=r"shape \(10, 2\) for 2000 samples.*\(11, 2\)"):
        extractor([np.zeros(2000, np.float32)])


@pytest.mark.slow
def test_features_kmeans_and_labels_run_on_a_hook_end_to_end(
    ray_with_examples, examples_on_path, tmp_path
):
    corpus = tmp_path / "corpus"
    synthetic.write_librispeech(
        str(corpus), speakers=2, chapters=1, utterances=3, seconds=(0.5, 1.5)
    )
    root = str(tmp_path / "root")
    shard([str(corpus)], root, ShardingOptions(max_samples=3))
    meta = extract(root, "logmel", ExtractorOptions(HOOK), SampleRequest(percent=100, seed=0))
    assert meta["spec"]["extractor"] == "python" and meta["spec"]["checkpoint"] == HOOK[7:]
    ours = build(ExtractorOptions(HOOK))
    index = shards.Index(root)
    for key, stored in FeatureStore(root, "logmel"):
        # Computed again here, alone: librosa's float32 STFT and mel product round the same
        # way on one machine; the store keeps float16 (half an ulp of its magnitude).
        want = ours([index.get(key).waveform])[0]
        assert stored.shape == want.shape
        np.testing.assert_allclose(stored, want, rtol=2**-11, atol=1e-3)
    fit_kmeans(root, "logmel", "km4", KMeans(4, seed=0, block_rows=256), StageOptions())
    # The label pass rebuilds the hook from the spec the k-means recorded, on the workers.
    labels = label(root, "km4", "km4")
    assert labels["rejects"] == 0 and labels["spec"]["extractor"] == "python"
    model = KMeansModel.load(root, "km4")
    table = ds.dataset(os.path.join(root, "labels", "km4", "units")).to_table().to_pylist()
    assert len(table) == labels["utterances"] == 6
    agree = total = 0
    for row in table:
        feats = ours([index.get(row["key"]).waveform])[0]
        assert row["frames"] == len(row["units"]) == len(feats)
        agree += int(np.sum(np.asarray(row["units"]) == model.units(feats)))
        total += len(feats)
    # The worker batched each shard's utterances; the units agree wherever float rounding
    # cannot swap two near-equidistant centroids (the contract's 99.99%, at this size all).
    assert agree / total >= 0.9999
