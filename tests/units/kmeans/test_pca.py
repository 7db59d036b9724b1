"""PCA from float64 moments: numpy's answer, faiss's layout for wav2vec-U, any number of parts."""

from __future__ import annotations

import numpy as np
import pytest

from units.kmeans.parts import DataError, LocalParts
from units.kmeans.pca import PCA


def correlated(n=5000, d=12, seed=0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) * np.linspace(3, 0.1, d)
    return (rng.normal(size=(n, d)) @ mixing.T + rng.normal(5, 1, d)).astype(np.float32)


def test_equals_numpy_eigendecomposition_of_the_covariance():
    x = correlated()
    pca = PCA(5).fit(x)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(pca.mean_, x64.mean(0), rtol=1e-12)
    values, vectors = np.linalg.eigh(np.cov(x64, rowvar=False))
    order = np.argsort(values)[::-1][:5]
    np.testing.assert_allclose(pca.explained_variance_, values[order], rtol=1e-9)
    for got, want in zip(pca.components_, vectors[:, order].T, strict=True):
        sign = np.sign(want[np.abs(want).argmax()])
        np.testing.assert_allclose(got, sign * want, atol=1e-9)
    assert pca.total_variance_ == pytest.approx(np.trace(np.cov(x64, rowvar=False)))
    projected = pca.transform(x)
    np.testing.assert_allclose(projected.mean(0), 0, atol=1e-3)
    np.testing.assert_allclose(projected.var(0, ddof=1), pca.explained_variance_, rtol=1e-4)


def test_whitening_gives_unit_variance():
    x = correlated()
    projected = PCA(4, whiten=True).fit(x).transform(x)
    np.testing.assert_allclose(projected.var(0, ddof=1), 1.0, rtol=1e-4)


def test_the_same_bits_for_any_number_of_parts():
    x = correlated(n=7000)
    whole = PCA(6).fit(LocalParts.from_array(x, parts=1, block_rows=500))
    for parts in (2, 5):
        split = PCA(6).fit(LocalParts.from_array(x, parts=parts, block_rows=500))
        np.testing.assert_array_equal(split.components_, whole.components_)
        np.testing.assert_array_equal(split.mean_, whole.mean_)


@pytest.mark.parametrize("whiten", [False, True])
def test_wav2vec_u_files_apply_as_x_at_a_plus_b_like_faiss(tmp_path, whiten):
    import faiss

    x = correlated(d=16)
    pca = PCA(8, whiten=whiten).fit(x)
    paths = pca.save(str(tmp_path))
    a, b = np.load(tmp_path / "8_pca_A.npy"), np.load(tmp_path / "8_pca_b.npy")
    assert paths["wav2vec_u_A"].endswith("8_pca_A.npy")
    assert a.shape == (16, 8) and b.shape == (8,) and a.dtype == b.dtype == np.float32
    ours = x @ a + b  # What wav2vec-U's apply_pca.py does with the files.
    np.testing.assert_allclose(ours, pca.transform(x), rtol=1e-4, atol=1e-3)
    # faiss.PCAMatrix, as wav2vec-U's pca.py trains it, agrees up to each component's sign.
    reference = faiss.PCAMatrix(16, 8, -0.5 if whiten else 0.0)
    reference.train(x)
    theirs = reference.apply(x)
    if whiten:
        # faiss takes eigenvalues of the unnormalised scatter, so its whitened output has
        # variance 1/n; ours has unit variance (as scikit-learn's).
        theirs = theirs * np.sqrt(len(x))
    signs = np.sign((theirs * ours).sum(0))
    np.testing.assert_allclose(ours, theirs * signs, rtol=1e-3, atol=2e-3)
    loaded = PCA.load(str(tmp_path), whiten=whiten)
    np.testing.assert_array_equal(loaded.transform(x), pca.transform(x))


def test_bad_sizes_are_refused():
    x = correlated(d=4)
    with pytest.raises(DataError, match="n_components=5 must be between 1 and the dimension 4"):
        PCA(5).fit(x)
    with pytest.raises(DataError, match="at least 2 rows"):
        PCA(1).fit(x[:1])
    with pytest.raises(RuntimeError, match="not fitted"):
        PCA(2).transform(x)
    with pytest.raises(DataError, match="dimension 4"):
        PCA(2).fit(x).transform(np.zeros((2, 3)))
