"""BEST-RQ's quantizer: the published algorithm, stacked-frame contract, portable matrices."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest

from units.bestrq.quantizer import (
    QuantizerConfig,
    RandomProjectionQuantizer,
    Statistics,
    random_matrices,
    stack_frames,
    stacked_contract,
)
from units.features.extractor import FBANK_SPEC
from units.features.frames import MFCC, SSL


@pytest.mark.parametrize("features", [MFCC, SSL])
@pytest.mark.parametrize("stack", [1, 2, 4, 6])
def test_stacked_labels_follow_their_own_framing_for_every_length(features, stack):
    contract = stacked_contract(features, stack)
    assert contract.rate == features.rate / stack
    for n in range(0, 6000):
        assert contract.frames(n) == features.frames(n) // stack, n


def test_fbank_stacked_by_four_is_the_25hz_contract():
    contract = stacked_contract(FBANK_SPEC.contract, 4)
    assert (contract.window, contract.hop, contract.rate) == (880, 640, 25.0)


def test_stacking_puts_consecutive_frames_side_by_side_and_drops_the_rest():
    f = np.arange(7 * 2, dtype=np.float32).reshape(7, 2)
    assert stack_frames(f, 3).tolist() == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]
    assert stack_frames(f[:2], 3).shape == (0, 6)


def test_the_random_matrices_of_a_seed_are_pinned_bit_for_bit():
    # Portable normals (units.bestrq.gaussian), a correctly rounded scale and a sequential
    # norm: the same quantizer for a seed on any machine, as the issue asks.
    config = QuantizerConfig(stack=2, dim=4, codebook_size=8, codebooks=2, seed=3)
    projection, codebooks = random_matrices(config, 6)
    digest = hashlib.sha256(projection.tobytes() + codebooks.tobytes()).hexdigest()
    assert digest == "3baa53f86c6a18fc4f472b1a79108d90c27db814068216ffad1a9c3476eed1ee"
    assert projection.shape == (6, 4) and codebooks.shape == (2, 8, 4)
    # float32 entries of unit vectors: lengths within float32 rounding of 1.
    assert np.allclose(np.linalg.norm(codebooks.astype(np.float64), axis=2), 1, atol=1e-6)


def test_the_projection_is_xavier_normal_and_codebooks_are_independent():
    config = QuantizerConfig(dim=16, codebook_size=4096, codebooks=2, seed=0)
    projection, codebooks = random_matrices(config, 320)
    expected = np.sqrt(2 / (320 + 16))  # 5,120 draws: the sample std within 5% of it.
    assert abs(projection.std() / expected - 1) < 0.05
    assert not np.array_equal(codebooks[0], codebooks[1])
    again, _ = random_matrices(dataclasses.replace(config, seed=1), 320)
    assert not np.array_equal(again, projection)


def _reference_labels(features: np.ndarray, q: RandomProjectionQuantizer) -> np.ndarray:
    """The published algorithm written out in float64 NumPy, frame by frame, from the
    quantizer's parameters only: stack, normalise, project, l2-normalise, nearest entry of
    the l2-normalised codebook. Returns the squared distances (frames, codebooks, entries)."""
    s = q.config.stack
    rows = [np.concatenate(features[i * s : (i + 1) * s]) for i in range(len(features) // s)]
    x = (np.array(rows, np.float64) - q.mean) / q.std.astype(np.float64)
    y = x @ q.projection.astype(np.float64)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    c = q.codebooks.astype(np.float64)
    c /= np.linalg.norm(c, axis=2, keepdims=True)
    return ((y[:, None, None, :] - c[None]) ** 2).sum(-1)


def test_labels_equal_a_direct_numpy_computation_of_the_published_algorithm():
    rng = np.random.default_rng(0)
    utterances = [rng.normal(size=(n, 80)).astype(np.float32) * 3 + 1 for n in (3, 9, 57, 130)]
    stats = Statistics(320)
    for f in utterances:
        stats.update(stack_frames(f, 4))
    config = QuantizerConfig(codebooks=2, seed=11)
    q = RandomProjectionQuantizer.create("q", FBANK_SPEC, config, stats)
    got = q.codes_of(utterances)
    assert [len(c) for c in got] == [0, 2, 14, 32]
    codes = np.concatenate(got)
    distances = np.concatenate([_reference_labels(f, q) for f in utterances if len(f) >= 4])
    ordered = np.sort(distances, axis=2)
    best, gap = ordered[..., 0], ordered[..., 1] - ordered[..., 0]
    ours = np.take_along_axis(distances, codes[..., None].astype(np.int64), 2)[..., 0]
    # float32 projections and search move a distance by ~1e-6: every label is the nearest
    # entry within that, and exactly the reference's wherever the two nearest are further
    # apart than it (nearly all frames: checked, so the comparison is not vacuous).
    assert np.all(ours - best <= 1e-5)
    clear = gap > 1e-5
    assert clear.mean() > 0.97
    assert np.array_equal(codes[clear], distances.argmin(2)[clear])
    # A label set stores every codebook; with one, the labels alone.
    assert all(np.array_equal(u, c) for u, c in zip(q.units_of(utterances), got, strict=True))
    one = RandomProjectionQuantizer.create("q1", FBANK_SPEC, QuantizerConfig(seed=11), stats)
    assert [u.shape for u in one.units_of(utterances)] == [(0,), (2,), (14,), (32,)]
    assert np.array_equal(one.units_of(utterances)[3], got[3][:, 0])  # Same first codebook.


def test_statistics_are_the_mean_and_deviation_and_a_constant_dimension_keeps_its_scale():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1000, 4)) * [1, 2, 3, 0] + [0, 1, 2, 5]
    parts = [Statistics(4), Statistics(4)]
    parts[0].update(x[:300])
    parts[1].update(x[300:])
    total = Statistics(4)
    for p in parts:
        total.add(Statistics.from_arrays(p.to_arrays()))
    mean, std = total.mean_std()
    assert np.allclose(mean, x.mean(0), atol=1e-6)
    assert np.allclose(std[:3], x.std(0)[:3], rtol=1e-5) and std[3] == 1.0
    with pytest.raises(ValueError, match="no feature frames"):
        Statistics(4).mean_std()


def test_a_saved_quantizer_loads_the_same_and_an_altered_copy_is_refused(tmp_path):
    stats = Statistics(160)
    stats.update(np.random.default_rng(2).normal(size=(50, 160)))
    q = RandomProjectionQuantizer.create(
        "q", FBANK_SPEC, QuantizerConfig(stack=2, codebook_size=64), stats
    )
    meta = q.save(str(tmp_path), {"features": "x"})
    loaded = RandomProjectionQuantizer.load(str(tmp_path), "q")
    assert loaded.fingerprint() == q.fingerprint() == meta["fingerprint"]
    assert meta["frame_rate"] == 50.0 and meta["lineage"] == {"features": "x"}
    feats = np.random.default_rng(3).normal(size=(40, 80)).astype(np.float32)
    assert np.array_equal(loaded.codes(feats), q.codes(feats))
    np.save(tmp_path / "mean.npy", q.mean + 1)
    with pytest.raises(ValueError, match="fingerprint"):
        RandomProjectionQuantizer.load(str(tmp_path), "q")
    with pytest.raises(FileNotFoundError):
        RandomProjectionQuantizer.load(str(tmp_path / "none"), "q")


@pytest.mark.parametrize(
    "bad", [{"codebook_size": 70000}, {"stack": 0}, {"dim": 0}, {"codebooks": 0}, {"seed": -1}]
)
def test_configs_the_labels_cannot_have_are_refused(bad):
    with pytest.raises(ValueError):
        QuantizerConfig(**bad).check()
