"""GPU paths against their CPU twins. The CUDA tests run where a GPU is (they skip here);
the torch search path, used on GPUs without faiss-gpu, also runs on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from units.kmeans.estimator import KMeans
from units.kmeans.parts import Assigner, LocalParts

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _data(n, d, k, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)).astype(np.float32) * 3
    x = centres[rng.integers(k, size=n)] + rng.standard_normal((n, d)).astype(np.float32)
    # Centroids near the centres, as after a fit: nearest ones are not a rounding apart.
    return x, centres + 0.3 * rng.standard_normal((k, d)).astype(np.float32)


def _agrees(device, n, d, k):
    x, c = _data(n, d, k)
    want, want_d = Assigner(c)(x)
    got, got_d = Assigner(c, device=device)(x)
    # Equal labels wherever the best and second-best distances are not a rounding apart.
    exact = ((x[:, None, :] - c[None]) ** 2).sum(-1)
    two = np.sort(exact, 1)[:, :2]
    clear = (two[:, 1] - two[:, 0]) > 1e-3 * two[:, 1]
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(got[clear], want[clear])
    np.testing.assert_allclose(got_d, want_d, rtol=1e-4, atol=1e-3)
    labels_only, none = Assigner(c, device=device)(x, distances=False)
    assert none is None and np.array_equal(labels_only, got)


def test_the_torch_search_equals_the_numpy_gemm():
    _agrees("cpu:0", 3000, 39, 50)  # A torch device that is not "cpu": the torch path.


@cuda
@pytest.mark.parametrize("n, d, k", [(20000, 39, 100), (4000, 768, 500)])
def test_cuda_assignment_equals_cpu(n, d, k):
    _agrees("cuda", n, d, k)


@cuda
def test_kmeans_on_a_cuda_part_matches_cpu():
    x, _ = _data(20000, 39, 20, seed=1)
    cpu_parts = LocalParts.from_array(x, parts=2, block_rows=4096)
    cpu = KMeans(20, seed=0, max_iter=10, block_rows=4096).fit(cpu_parts)
    gpu_parts = LocalParts.from_array(x, parts=2, block_rows=4096, device="cuda")
    gpu = KMeans(20, seed=0, max_iter=10, block_rows=4096).fit(gpu_parts)
    assert gpu.inertia_ == pytest.approx(cpu.inertia_, rel=1e-5)
    np.testing.assert_allclose(gpu.cluster_centers_, cpu.cluster_centers_, atol=1e-3)


@cuda
def test_mfcc_on_cuda_matches_cpu():
    from units.features.kaldi import KaldiMFCC

    rng = np.random.default_rng(0)
    wavs = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (400, 12345, 48000)]
    cpu, gpu = KaldiMFCC()(wavs), KaldiMFCC(device="cuda")(wavs)
    for a, b in zip(cpu, gpu, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-2)
